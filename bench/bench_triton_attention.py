"""Triton paged attention (kernels/attention.py) at LLaMA-7B attention shapes.

    python bench/bench_triton_attention.py [--json results.json]

32 query heads x Dh 128 with 32 kv heads (MHA, LLaMA-7B) and 8 kv heads (GQA
32/8), fp16, block size 16, blocks shuffled across the pool as a real cache
would be. Decode: batch 1, 16, 64 at context 512 and 2048 (one new token per
sequence). Prefill: one 512-token prompt from position 0.

Decode is memory-bound: the figure of merit is the K/V bytes read (each
sequence's context, K and V, once per kv head) / time, shown as a share of the
bandwidth of a plain device-to-device copy measured in the same run. Prefill
is compute-bound at this length and also gets TFLOP/s (causal QK^T and PV).
Times are of the whole paged_attention call, host checks and planning (a few
syncs) included, so small decode batches show launch and host cost.

Without CUDA (or under TRITON_INTERPRET=1) it prints one line and exits 0.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.gpu_common import start  # noqa: E402

HQ, DH, BS = 32, 128, 16
KV_HEADS = (32, 8)
DECODE = [(b, ctx) for ctx in (512, 2048) for b in (1, 16, 64)]
PREFILL_TOKENS = 512
COPY_BYTES = 1 << 30
DEV = "cuda"


def make_batch(hkv: int, lens: list[int], new: list[int]):
    """Caches holding len keys per sequence and the query args for its last `new` tokens."""
    f16 = torch.float16
    nbs = [-(-L // BS) for L in lens]
    perm = torch.randperm(sum(nbs), device=DEV).to(torch.int32)
    tables = torch.zeros(len(lens), max(nbs), dtype=torch.int32, device=DEV)
    used = 0
    for i, nb in enumerate(nbs):
        tables[i, :nb] = perm[used:used + nb]
        used += nb
    k_cache = torch.randn(sum(nbs), hkv, BS, DH, device=DEV, dtype=f16)
    v_cache = torch.randn_like(k_cache)
    pos = torch.cat([torch.arange(L - n, L, dtype=torch.int32) for L, n in zip(lens, new)]).to(DEV)
    sid = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(new)]).to(DEV)
    q = torch.randn(pos.numel(), HQ, DH, device=DEV, dtype=f16)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=tables, positions=pos,
                scale=DH ** -0.5, seq_ids=sid)


def cases():
    """(kind, hkv, batch, context, args, K/V bytes read, flops)."""
    for hkv in KV_HEADS:
        for b, ctx in DECODE:
            a = make_batch(hkv, [ctx] * b, [1] * b)
            yield "decode", hkv, b, ctx, a, 2 * b * ctx * hkv * DH * 2, 4 * b * ctx * HQ * DH
        n = PREFILL_TOKENS
        a = make_batch(hkv, [n], [n])
        yield "prefill", hkv, 1, n, a, 2 * n * hkv * DH * 2, 4 * HQ * DH * n * (n + 1) // 2


def main(argv: list[str] | None = None) -> int:
    started = start("bench_triton_attention", __doc__, argv, COPY_BYTES)
    if started is None:
        return 0
    args, copy_gbps = started

    from triton.testing import do_bench

    from kernels.attention import paged_attention, paged_attention_ref
    rows = []
    for kind, hkv, b, ctx, a, kv_bytes, flops in cases():
        if b * ctx <= 16 * 2048:  # the reference gathers [T, L, Hq, Dh] in fp32: keep it small
            torch.testing.assert_close(paged_attention(**a), paged_attention_ref(**a), rtol=1e-2, atol=1e-2)
        t = do_bench(lambda: paged_attention(**a), return_mode="median") * 1e-3
        rows.append(dict(kind=kind, hq=HQ, hkv=hkv, batch=b, context=ctx, kv_bytes=kv_bytes,
                         us=t * 1e6, kv_gbps=kv_bytes / t / 1e9, copy_share=kv_bytes / t / 1e9 / copy_gbps,
                         tflops=flops / t / 1e12))
        del a
        torch.cuda.empty_cache()

    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: device copy probe {copy_gbps:.0f} GB/s (read + write of {COPY_BYTES >> 20} MiB), "
          f"fp16, Hq {HQ}, Dh {DH}, block size {BS}\n")
    print("| kind | Hq/Hkv | batch | context | K/V MiB | us | K/V GB/s | % of copy | TFLOP/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} | {r['hq']}/{r['hkv']} | {r['batch']} | {r['context']} | "
              f"{r['kv_bytes'] / 2**20:.1f} | {r['us']:.1f} | {r['kv_gbps']:.0f} | "
              f"{100 * r['copy_share']:.0f}% | {r['tflops']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=gpu, copy_gbps=copy_gbps, dtype="float16", block_size=BS, rows=rows),
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
