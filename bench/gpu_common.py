"""What the GPU benchmarks share: when to skip, and the copy-bandwidth probe."""
from __future__ import annotations

import os


def skip_reason() -> str | None:
    """Why a Triton benchmark cannot time anything here, or None on a GPU."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device; the Triton kernels are only timed on a GPU"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set; the interpreter's timings mean nothing"
    return None


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy (each byte read once and written once); nbytes
    far above L2, so the probe measures HBM."""
    import torch
    from triton.testing import do_bench

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def start(name: str, doc: str, argv: list[str] | None, copy_bytes: int = 1 << 30):
    """The shared opening of a GPU benchmark's main(): parse --json, print why it
    skips and return None without a GPU; else seed torch and return (args, copy
    GB/s measured now)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--json", metavar="F", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    reason = skip_reason()
    if reason:
        print(f"{name}: skipped ({reason})")
        return None
    import torch

    torch.manual_seed(0)
    return args, copy_bandwidth(copy_bytes)
