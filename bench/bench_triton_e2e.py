"""End-to-end decode and prefill tokens/s on the triton backend (a CUDA GPU).

    python bench/bench_triton_e2e.py tinyllama-random --quant fp16 int8 int4 int3

For each format: prefill tok/s of a --prefill-token prompt and greedy decode
tok/s of --decode tokens (runtime.bench's timers: model forwards only, best
of --repeats), the weight bytes one decode step reads, and the share of the
decode bound that the GPU's copy bandwidth (measured in the same run) sets.
Without CUDA it says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_common import copy_bandwidth, skip_reason  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="tinyllama-random")
    ap.add_argument("--quant", nargs="+", default=["fp16", "int8", "int4", "int3"])
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    reason = skip_reason()
    if reason:
        print(f"bench_triton_e2e: skipped ({reason})")
        return 0
    import torch

    from runtime.bench import bench_ids, measure_decode, measure_prefill, normalize_quant, prepare_lingli
    from runtime.eval import resolve
    from runtime.hub import resolve_model
    from runtime.llm import LLM

    target = Path(resolve_model(str(resolve(a.model))))
    bw = copy_bandwidth()
    rows = []
    for q in (normalize_quant(x) for x in a.quant):
        path, quant = prepare_lingli(target, q)
        llm = LLM(path, quant=quant, backend="triton", max_model_len=a.prefill + a.decode + 16,
                  progress=False, enable_prefix_caching=False)
        pre, dec = bench_ids(llm, a.prefill), bench_ids(llm, 8, seed=1)
        measure_decode(llm, dec, 4)                                     # compile and warm up
        best_p = max(measure_prefill(llm, pre) for _ in range(a.repeats))
        best_d = max(measure_decode(llm, dec, a.decode) for _ in range(a.repeats))
        wbytes = llm.model.weight_bytes_per_token()
        limit = bw * 1e9 / wbytes
        rows.append({"quant": q, "weight_mb_per_token": wbytes / 1e6, "prefill_tok_s": best_p,
                     "decode_tok_s": best_d, "copy_gb_s": bw, "limit_tok_s": limit,
                     "share": best_d / limit})
        print(f"[e2e] {q}: prefill {best_p:.0f} tok/s, decode {best_d:.1f} tok/s "
              f"({best_d / limit:.0%} of {limit:.0f})", file=sys.stderr)
        del llm
        torch.cuda.empty_cache()
    print(f"model={a.model} device={torch.cuda.get_device_name()} copy bandwidth {bw:.0f} GB/s\n")
    print("| weights | MB read/token | prefill tok/s | decode tok/s | limit tok/s | share |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['quant']} | {r['weight_mb_per_token']:.0f} | {r['prefill_tok_s']:.0f} | "
              f"{r['decode_tok_s']:.1f} | {r['limit_tok_s']:.0f} | {r['share']:.0%} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
