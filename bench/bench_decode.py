"""Decode tokens/s of a model next to its bandwidth limit, measured in the same run.

    python bench/bench_decode.py [--model smollm2] [--quant fp32 fp16] [--threads 1 2]

For each (weight dtype, thread count): decode N tokens after a short prompt
(greedy, EOS ignored), then compare with the limit a memory-bound decode can
reach: read bandwidth (STREAM-like probe, same thread count, same run)
divided by the weight bytes one decode step reads.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def decode_rate(llm, prompt_ids: list[int], n: int, repeats: int) -> float:
    """Best decode tokens/s over `repeats` runs; prefill is left out of the timing."""
    from runtime import SamplingParams
    from runtime.llm import RequestOutput

    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    best = 0.0
    for _ in range(repeats):
        # _run yields once per generated token, then once for the detokenizer's flush;
        # the first yield comes right after prefill, so n tokens span n-1 decode steps.
        stamps = [time.perf_counter() for _ in llm._run(prompt_ids, params,
                                                         RequestOutput(prompt_token_ids=[]))]
        steps = len(stamps) - 2
        if steps > 0:
            best = max(best, steps / (stamps[-2] - stamps[0]))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--quant", nargs="+", default=["fp32", "fp16"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--probe-mib", type=int, default=1024)
    a = ap.parse_args()

    from runtime import LLM, _C

    rows = []
    for quant in a.quant:
        llm = LLM(a.model, quant=quant, max_model_len=2048)
        wbytes = llm.model.weight_bytes_per_token()
        prompt = llm.tokenizer.encode("The history of the city begins")
        for threads in a.threads:
            _C.set_num_threads(threads)
            bw = _C.read_bandwidth(a.probe_mib << 20, 5)
            rate = decode_rate(llm, prompt, a.tokens, a.repeats)
            bw_after = _C.read_bandwidth(a.probe_mib << 20, 5)
            bw = max(bw, bw_after)   # the probe's best, before and after: the limit
            limit = bw * 1e9 / wbytes
            rows.append((quant, threads, wbytes / 1e6, rate, bw, limit, rate / limit))
        del llm
    print(f"model={a.model} isa={_C.isa()} tokens={a.tokens}")
    print("| weights | threads | MB read/token | decode tok/s | read GB/s | limit tok/s | share |")
    print("|---|---|---|---|---|---|---|")
    for q, t, mb, r, bw, lim, share in rows:
        print(f"| {q} | {t} | {mb:.0f} | {r:.1f} | {bw:.1f} | {lim:.1f} | {share:.0%} |")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
