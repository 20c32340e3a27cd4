"""Weight-only quantized GEMM (kernels/quant_gemm.py) against torch fp16 at LLaMA-7B shapes.

    python bench/bench_triton_quant_gemm.py [--json results.json]
    python bench/bench_triton_quant_gemm.py --model [--bandwidth-gbs 4800]

Shapes are (N, K) with w [N, K]: 4096x4096 (attention), 11008x4096 (MLP up),
4096x11008 (MLP down), 12288x4096 (fused q/k/v), at M = 1, 4, 16, 64, 512
tokens, for int8 / int4 / int3 at G = 128 and 32 and torch fp16
(x @ w.T). Decode (small M) streams every weight byte once, so its figure of
merit is bytes moved (packed weights + scales/mins + x + y; see
quant_gemm.bytes_moved) / time, as a share of the bandwidth of a plain
device-to-device copy measured in the same run. triton.testing.do_bench
clears L2 before every call, so weights come from HBM as in real decode.
Large M is compute-bound: see the TFLOP/s column.

--model needs no GPU: for each format and shape at M = 1 it prints the bytes
one call moves and the time that implies at --bandwidth-gbs (4800 for an
H200, 3350 for an H100), the bound the kernels are judged against.

Without CUDA (or under TRITON_INTERPRET=1) the timing run prints one line and exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.gpu_common import copy_bandwidth, skip_reason  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (12288, 4096)]
MS = (1, 4, 16, 64, 512)
FORMATS = [(8, 128), (4, 128), (3, 128), (8, 32), (4, 32), (3, 32)]
COPY_BYTES = 1 << 30  # far above L2, so the probe measures HBM
DEV = "cuda"


def packed_weight(n: int, k: int, bits: int, g: int, dev: str):
    """A PackedWeight of random codes (speed does not depend on values); dev='meta' allocates nothing."""
    from kernels.quant_gemm import PackedWeight, packed_shapes
    from runtime.quant.formats import padded_k

    t = {}
    for name, (shape, dtype) in packed_shapes(n, k, bits, g).items():
        if dev == "meta":
            t[name] = torch.empty(shape, dtype=dtype, device=dev)
        elif dtype == torch.float16:  # small scales, negative mins: y stays finite
            t[name] = (torch.rand(shape, device=dev) * (0.01 if name == "scales" else -0.1)).half()
        else:
            nbytes = shape[0] * shape[1] * (1 if dtype == torch.int8 else 4)
            t[name] = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=dev).view(dtype).view(shape)
    return PackedWeight(bits, g, n, k, padded_k(k, g), **t)


def fp16_bytes(n: int, k: int, m: int) -> int:
    return 2 * (n * k + m * (n + k))


def model(bandwidth_gbs: float) -> None:
    from kernels.quant_gemm import bytes_moved

    print(f"Bandwidth bound at M=1 for {bandwidth_gbs:g} GB/s (bytes moved / bandwidth)\n")
    print("| N x K | format | MB moved | µs at bound | x fp16 |")
    print("|---|---|---|---|---|")
    for n, k in SHAPES:
        f16 = fp16_bytes(n, k, 1)
        rows = [("fp16", f16)] + [(f"int{b} g{g}", bytes_moved(packed_weight(n, k, b, g, "meta"), 1))
                                  for b, g in FORMATS]
        for name, b in rows:
            print(f"| {n}x{k} | {name} | {b / 1e6:.2f} | {b / bandwidth_gbs / 1e3:.2f} | {f16 / b:.2f} |")


def run(json_path: str | None) -> None:
    from triton.testing import do_bench

    from kernels.quant_gemm import bytes_moved, quant_matmul, quant_matmul_ref

    copy_gbs = copy_bandwidth(COPY_BYTES)
    name = torch.cuda.get_device_name()
    print(f"{name}: device-to-device copy {copy_gbs:.0f} GB/s\n")
    print("| N x K | M | format | µs | GB/s | TFLOP/s | x fp16 | % copy bw |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    gen = torch.Generator(device=DEV).manual_seed(0)
    for n, k in SHAPES:
        w16 = torch.randn(n, k, device=DEV, dtype=torch.float16, generator=gen) * 0.02
        pws = {(b, g): packed_weight(n, k, b, g, DEV) for b, g in FORMATS}
        for m in MS:
            x = torch.randn(m, k, device=DEV, dtype=torch.float16, generator=gen)
            t16 = do_bench(lambda: x @ w16.T, return_mode="median")
            cases = [("fp16", t16, fp16_bytes(n, k, m))]
            for (b, g), pw in pws.items():
                y = quant_matmul(x, pw)  # autotunes on first use of this shape
                err = (y.float() - quant_matmul_ref(x, pw).float()).abs().max().item()
                scale = y.float().abs().max().item()
                if not err <= 1e-2 * max(scale, 1.0):
                    print(f"WARNING int{b} g{g} {n}x{k} M={m}: max error {err:.3g} (|y| max {scale:.3g})")
                t = do_bench(lambda: quant_matmul(x, pw), return_mode="median")
                cases.append((f"int{b} g{g}", t, bytes_moved(pw, m)))
            for fmt, ms, nbytes in cases:
                gbs = nbytes / (ms * 1e-3) / 1e9
                tflops = 2 * m * n * k / (ms * 1e-3) / 1e12
                row = dict(n=n, k=k, m=m, format=fmt, us=ms * 1e3, gbs=gbs, tflops=tflops,
                           x_fp16=t16 / ms, share_copy_bw=gbs / copy_gbs)
                rows.append(row)
                print(f"| {n}x{k} | {m} | {fmt} | {row['us']:.1f} | {gbs:.0f} | {tflops:.2f} | "
                      f"{row['x_fp16']:.2f} | {100 * row['share_copy_bw']:.0f}% |")
    if json_path:
        Path(json_path).write_text(json.dumps(dict(device=name, copy_gbs=copy_gbs, rows=rows), indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--model", action="store_true", help="print the bandwidth bound at M=1 (no GPU needed)")
    ap.add_argument("--bandwidth-gbs", type=float, default=4800.0,
                    help="bandwidth for --model, GB/s (H200 4800, H100 3350)")
    a = ap.parse_args()
    if a.model:
        model(a.bandwidth_gbs)
        return
    reason = skip_reason()
    if reason:
        print(f"bench_triton_quant_gemm: skipped ({reason}; --model prints the bandwidth bound without one)")
        return
    run(a.json)


if __name__ == "__main__":
    main()
