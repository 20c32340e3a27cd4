"""What every kernel file shares: the interpreter switch, the device, autotune."""
from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device() -> torch.device:
    """Where kernel tensors live: CUDA, or the CPU under the interpreter."""
    if torch.cuda.is_available() and not interpreting():
        return torch.device("cuda")
    if interpreting():
        return torch.device("cpu")
    raise RuntimeError("the Triton kernels need a CUDA GPU (torch.cuda.is_available() is False); "
                       "set TRITON_INTERPRET=1 before importing triton to run them on the CPU interpreter")


def autotune(configs: list, key: list[str], **kw):
    """triton.autotune, but with only the first config under the interpreter
    (its autotuner cannot benchmark several: "0 active drivers"). Put a
    small, test-friendly config first."""
    return triton.autotune(configs=configs[:1] if interpreting() else configs, key=key, **kw)


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def out_buffer(op: str, out: "torch.Tensor | None", shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """`out` if it is a usable [shape] buffer of like's dtype with unit stride along
    the last dim, a new one if out is None; else a ValueError naming `op`."""
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or out.stride(-1) != 1:
        raise ValueError(f"{op}: out must be {list(shape)} {like.dtype} with unit column stride, "
                         f"got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
    return out
