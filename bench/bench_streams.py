"""Aggregate decode throughput of the continuous-batching engine vs concurrent streams,
and the KV cache's waste under a mixed-length workload.

    python bench/bench_streams.py smollm2 --quant int4 --threads 2 --png streams.png
    python bench/bench_streams.py tinyllama-random --streams 1 4 16

For each stream count S: S requests (random prompt ids of --prompt tokens,
greedy, --decode tokens each, EOS ignored) are submitted at once and the
engine is stepped until all finish (the KV pool committed up front, as
`lingli serve` does). Decode tok/s counts only the steps in
which every running request decodes (no prefill in the batch): tokens
produced / time of those steps. The ratio to S=1 is the batching gain (one
weight read serves S tokens). Best of --repeats.

KV waste: --mixed requests with prompt lengths uniform in [8, 400] and output
lengths uniform in [8, 256] run with max_num_seqs 16; after every step the
reserved-but-empty share of the running requests' slots is sampled; the
report gives the slot-weighted mean (blocks of 16 tokens: the only waste is
each sequence's partly filled last block).

Batched decode steps are compute-bound and a single stream is not, so the
ratio depends on how much arithmetic the threads really have: before and after
the stream runs the int8 dot-product rate of 1 and of --threads threads is
measured (`_C.vnni_peak`, AVX-512 VNNI CPUs) and printed with the table. A VM's
vCPUs may be SMT siblings sharing one core's vector pipes; then --threads
threads get about one thread's rate and the ratio reads low.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.bench import load_llm, set_threads  # noqa: E402
from runtime.eval import resolve  # noqa: E402
from runtime.hub import resolve_model  # noqa: E402
from runtime.sampler import SamplingParams  # noqa: E402


def _ids(rng, vocab: int, n: int) -> list[int]:
    return [int(t) for t in rng.integers(3, vocab, n)]


def decode_throughput(llm, streams: int, prompt: int, decode: int, seed: int = 0) -> dict:
    eng = llm.engine()
    rng = np.random.default_rng(seed)
    params = SamplingParams(temperature=0, max_tokens=decode, ignore_eos=True)
    for i in range(streams):
        eng.add_request(f"s{streams}-{i}", _ids(rng, llm.sample_vocab, prompt), params)
    t_dec = 0.0
    n_dec = 0
    t0 = time.perf_counter()
    while eng.has_unfinished_requests():
        pure_decode = not eng.scheduler.waiting and all(
            not r.prefilling for r in eng.scheduler.running)
        t = time.perf_counter()
        outs = eng.step()
        dt = time.perf_counter() - t
        if pure_decode:
            t_dec += dt
            n_dec += len(outs)
    return {"streams": streams, "decode_tok_s": n_dec / t_dec if t_dec else 0.0,
            "decode_tokens": n_dec, "wall_s": time.perf_counter() - t0}


def kv_waste(llm, n: int, seed: int = 1) -> dict:
    eng = llm.engine()
    eng.scheduler.max_num_seqs = 16
    rng = np.random.default_rng(seed)
    for i in range(n):
        p = int(rng.integers(8, 401))
        out = int(rng.integers(8, 257))
        eng.add_request(f"mix-{i}", _ids(rng, llm.sample_vocab, p),
                        SamplingParams(temperature=0, max_tokens=out, ignore_eos=True))
    reserved = filled = 0
    peak_used = 0
    while eng.has_unfinished_requests():
        eng.step()
        st = eng.blocks.stats([r.kv for r in eng.scheduler.running])
        reserved += st.reserved_slots
        filled += st.filled_slots
        peak_used = max(peak_used, st.used)
    st = eng.stats()
    return {"requests": n, "waste": 1 - filled / reserved if reserved else 0.0,
            "peak_blocks_used": peak_used, "blocks_total": st.kv_blocks_total,
            "preemptions": st.preemptions_total}


def pipe_rates(threads: int) -> dict | None:
    """The int8 dot-product rate (GOP/s) of 1 and of `threads` threads, measured now;
    None where the CPU has no AVX-512 VNNI."""
    from runtime import _C

    one = _C.vnni_peak(1)
    if one <= 0:
        return None
    many = _C.vnni_peak(threads)
    return {"one": one, "all": many, "scaling": many / one}


def pipes_line(before: dict | None, after: dict | None, threads: int) -> str | None:
    """The report's line on the measured arithmetic (see the module docstring)."""
    if before is None or after is None:
        return None
    line = (f"int8 dot-product rate, 1 / {threads} threads: {before['one']:.0f} / "
            f"{before['all']:.0f} GOP/s before the runs ({before['scaling']:.2f}x), "
            f"{after['one']:.0f} / {after['all']:.0f} after ({after['scaling']:.2f}x)")
    if min(before["scaling"], after["scaling"]) < 0.75 * threads:
        line += (f"; the {threads} threads got less than {0.75 * threads:.2f}x one thread's "
                 "arithmetic (vector pipes shared: SMT siblings or a busy host), so the "
                 "batched rows and their ratio read low")
    return line


def plot(rows: list[dict], path: str, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    s = [r["streams"] for r in rows]
    y = [r["decode_tok_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot(s, y, "o-", label="Lingli engine")
    ax.plot(s, [y[0] * k / s[0] for k in s], "--", color="gray", label="linear in streams")
    ax.set_xscale("log", base=2)
    ax.set_xticks(s, [str(k) for k in s])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate decode tok/s")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per stream")
    ap.add_argument("--decode", type=int, default=64, help="tokens decoded per stream")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mixed", type=int, default=64, help="requests in the KV waste workload (0: skip)")
    ap.add_argument("--png", default=None, help="draw the curve into this PNG")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    model_dir = Path(resolve_model(str(resolve(a.model))))
    max_len = max(a.prompt + a.decode, 660) + 8
    llm = load_llm(model_dir, a.quant, a.threads, max_len)
    set_threads(llm, a.threads)
    llm.cache.commit()      # as `lingli serve` does at startup: no first-touch page faults
    for s in a.streams:                                      # warm-up: every batch shape once
        decode_throughput(llm, s, 8, 8)
    # Rounds go over every stream count in turn, so a slow or fast phase of a
    # shared host lands on all of them alike instead of on one row's repeats.
    runs: dict[int, list[dict]] = {s: [] for s in a.streams}
    before = pipe_rates(a.threads)
    for r in range(a.repeats):
        for s in a.streams:
            runs[s].append(decode_throughput(llm, s, a.prompt, a.decode, seed=r))
    after = pipe_rates(a.threads)
    rows = [max(runs[s], key=lambda r: r["decode_tok_s"]) for s in a.streams]
    base = rows[0]["decode_tok_s"]
    print(f"model={model_dir.name} quant={a.quant} threads={a.threads} prompt={a.prompt} "
          f"decode={a.decode} (best of {a.repeats})")
    print("| streams | aggregate decode tok/s | per stream | x one stream |")
    print("|---|---|---|---|")
    for r in rows:
        r["x_first"] = r["decode_tok_s"] / base if base else 0.0
        print(f"| {r['streams']} | {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / r['streams']:.1f} "
              f"| {r['x_first']:.2f}x |")
    res = {"model": model_dir.name, "quant": a.quant, "threads": a.threads, "rows": rows,
           "pipe_rates": {"before": before, "after": after}}
    line = pipes_line(before, after, a.threads)
    if line:
        print(line)
    if a.mixed:
        w = kv_waste(llm, a.mixed)
        res["kv_waste"] = w
        print(f"KV waste, {w['requests']} mixed-length requests (prompts 8-400, outputs 8-256, "
              f"16 at a time): {100 * w['waste']:.2f}% of reserved slots empty; peak "
              f"{w['peak_blocks_used']} of {w['blocks_total']} blocks; "
              f"{w['preemptions']} preemptions")
    if a.png:
        plot(rows, a.png, f"{model_dir.name} {a.quant}, {a.threads} threads")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
