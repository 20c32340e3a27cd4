"""Fused elementwise Triton kernels (RMSNorm, RoPE, SiLU gate) against unfused torch.

    python bench/bench_triton_fused.py [--json results.json]

LLaMA-7B sizes (hidden 4096, MLP 11008, 32 heads x 128), fp16 activations,
at T = 1, 16 and 512 tokens. These kernels are memory-bound, so the figure of
merit is bytes moved / time, shown as a share of the bandwidth of a plain
device-to-device copy measured in the same run. The torch column runs the
``*_ref`` functions (several kernels and fp32 temporaries each). At T = 1
every op is launch-bound and its GB/s is small whatever the kernel does.

Without CUDA (or under TRITON_INTERPRET=1) it prints one line and exits 0.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.gpu_common import start  # noqa: E402

H, F, HEADS, DH = 4096, 11008, 32, 128
TOKENS = (1, 16, 512)
MAX_POS = 4096
COPY_BYTES = 512 << 20  # far above L2, so the probe measures DRAM/HBM
DEV = "cuda"


def cases(T: int):
    """(name, bytes moved, triton fn, torch fn, check) for one token count."""
    from kernels.activation import silu_mul, silu_mul_ref
    from kernels.norm import rms_norm, rms_norm_ref
    from kernels.rope import rope_, rope_ref

    dev, f16 = DEV, torch.float16
    x = torch.randn(T, H, device=dev, dtype=f16)
    w = torch.randn(H, device=dev, dtype=f16)
    out = torch.empty_like(x)
    yield ("rms_norm", 2 * x.nbytes + w.nbytes,
           lambda: rms_norm(x, w, 1e-5, out=out), lambda: rms_norm_ref(x, w, 1e-5),
           lambda: (rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5)))

    ang = torch.arange(MAX_POS, device=dev)[:, None] * torch.rand(DH // 2, device=dev)[None, :]
    cos, sin = ang.cos(), ang.sin()
    q = torch.randn(T, HEADS, DH, device=dev, dtype=f16)
    pos = torch.randint(0, MAX_POS, (T,), device=dev, dtype=torch.int32)
    rope_bytes = 2 * q.nbytes + 2 * T * (DH // 2) * 4 + pos.nbytes
    # Rotating q over and over is fine for timing: the values stay bounded.
    for il in (False, True):
        name = "rope_ interleaved" if il else "rope_ rotate-half"
        yield (name, rope_bytes,
               lambda il=il: rope_(q, pos, cos, sin, il, check_positions=False),
               lambda il=il: rope_ref(q, pos, cos, sin, il),
               lambda il=il: _rope_pair(q, pos, cos, sin, il))
    # The position range check costs a host sync; this row shows how much.
    yield ("rope_ +range check", rope_bytes, lambda: rope_(q, pos, cos, sin, False),
           lambda: rope_ref(q, pos, cos, sin, False), None)

    gu = torch.randn(T, 2 * F, device=dev, dtype=f16)
    gate, up = gu[:, :F], gu[:, F:]  # the halves of one fused gate_up output
    o = torch.empty(T, F, device=dev, dtype=f16)
    yield ("silu_mul", 3 * T * F * 2,
           lambda: silu_mul(gate, up, out=o), lambda: silu_mul_ref(gate, up),
           lambda: (silu_mul(gate, up), silu_mul_ref(gate, up)))


def _rope_pair(q, pos, cos, sin, il):
    from kernels.rope import rope_, rope_ref

    want = rope_ref(q, pos, cos, sin, il)
    got = q.clone()
    rope_(got, pos, cos, sin, il)
    return got, want


def main(argv: list[str] | None = None) -> int:
    started = start("bench_triton_fused", __doc__, argv, COPY_BYTES)
    if started is None:
        return 0
    args, copy_gbps = started

    from triton.testing import do_bench
    rows = []
    for T in TOKENS:
        for name, nbytes, fused, unfused, check in cases(T):
            if check is not None:
                got, want = check()
                torch.testing.assert_close(got.float(), want.float(), rtol=2e-3, atol=2e-3)
            t_tr = do_bench(fused, return_mode="median") * 1e-3
            t_to = do_bench(unfused, return_mode="median") * 1e-3
            rows.append(dict(op=name, T=T, bytes=nbytes,
                             triton_us=t_tr * 1e6, triton_gbps=nbytes / t_tr / 1e9,
                             triton_copy_share=nbytes / t_tr / 1e9 / copy_gbps,
                             torch_us=t_to * 1e6, torch_gbps=nbytes / t_to / 1e9,
                             speedup=t_to / t_tr))

    gpu = torch.cuda.get_device_name() if DEV == "cuda" else DEV
    print(f"{gpu}: device copy probe {copy_gbps:.0f} GB/s (read + write of {COPY_BYTES >> 20} MiB), fp16\n")
    print("| op | T | bytes | triton us | GB/s | % of copy | torch us | torch GB/s | speedup |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['op']} | {r['T']} | {r['bytes']:,} | {r['triton_us']:.1f} | {r['triton_gbps']:.1f} | "
              f"{100 * r['triton_copy_share']:.0f}% | {r['torch_us']:.1f} | {r['torch_gbps']:.1f} | "
              f"{r['speedup']:.1f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=gpu, copy_gbps=copy_gbps, dtype="float16", rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
