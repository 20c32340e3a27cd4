"""`lingli bench`: prefill and decode speed per weight format and thread count,
next to the bandwidth limit measured in the same run.

    lingli bench smollm2 --quant fp16 int8 int4 int3 --threads 1 2

For each (format, threads):
- prefill tok/s: a --prefill-token prompt, the time of the model forwards that
  prefill it (logits of the last position only, as a real request does);
- decode tok/s: greedy, EOS ignored, --decode tokens after a short prompt;
  steps / (time from the end of prefill to the end of the last step), so
  each step's sampling counts and prefill does not;
- the limit a memory-bound decode can reach: read bandwidth (runtime._C's
  STREAM-like probe, same thread count, best of before and after the run)
  divided by the weight bytes one decode step reads; share = decode / limit.
Best of --repeats for every rate.

The measuring functions here (`measure_prefill`, `measure_decode`,
`bench_ids`, `read_bandwidth`) are shared with bench/compare_llamacpp.py.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import LingliError

__all__ = ["QUANT_ALIASES", "normalize_quant", "bench_ids", "measure_prefill", "measure_decode",
           "read_bandwidth", "decode_params", "prepare_lingli", "load_llm", "bench_model", "format_table", "add_parser"]

QUANT_ALIASES = {"f16": "fp16", "fp16": "fp16", "f32": "fp32", "fp32": "fp32",
                 "int8": "int8", "q8": "int8", "int4": "int4", "q4": "int4",
                 "int3": "int3", "q3": "int3", "none": None, "checkpoint": None}

_FALLBACK_TEXT = (
    "The history of the city begins with a small settlement on the river, where traders "
    "met to exchange grain, salt and cloth. Over the centuries the market grew into a town, "
    "the town into a city, and the city into the capital of a wide and varied province. ")


def normalize_quant(q: str | None) -> str | None:
    if q is None:
        return None
    key = str(q).lower()
    if key not in QUANT_ALIASES:
        raise LingliError(f"unknown quant {q!r}; choose from fp32, fp16, int8, int4, int3")
    return QUANT_ALIASES[key]


# ---------------------------------------------------------------- prompts

def bench_ids(llm, n: int, seed: int = 0) -> list[int]:
    """n deterministic prompt ids: the tokenized default text (repeated as needed) when
    the model has a tokenizer, else seeded random ids of its vocabulary (no specials)."""
    if n < 1:
        raise LingliError(f"a prompt needs at least 1 token, got {n}")
    tok = getattr(llm, "tokenizer", None)
    if tok is not None:
        from .eval import DEFAULT_TEXT
        try:
            text = Path(DEFAULT_TEXT).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            text = _FALLBACK_TEXT * 8
        ids = tok.encode(text)
        while len(ids) < n:
            ids = ids + ids
        return ids[:n]
    vocab = int(getattr(llm, "sample_vocab", 0) or llm.config.vocab_size)
    rng = np.random.default_rng(seed)
    return rng.integers(min(3, vocab - 1), vocab, size=n).tolist()


# ---------------------------------------------------------------- timing

class _ForwardTimer:
    """Record (tokens, start, end) of every model forward while active."""

    def __init__(self, llm) -> None:
        self.model = llm.model
        self.calls: list[tuple[int, float, float]] = []

    def __enter__(self) -> "_ForwardTimer":
        orig = self.model.forward
        calls = self.calls

        def timed(tokens, *args, **kwargs):
            t0 = time.perf_counter()
            out = orig(tokens, *args, **kwargs)
            calls.append((len(tokens), t0, time.perf_counter()))
            return out

        self.model.forward = timed
        return self

    def __exit__(self, *exc) -> None:
        try:
            del self.model.forward          # the class's method again
        except AttributeError:
            pass


def _timed_generate(llm, ids: Sequence[int], max_tokens: int):
    """Run one greedy request; return (prefill seconds, decode steps, decode seconds)."""
    from .sampler import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    with _ForwardTimer(llm) as timer:
        llm.generate([list(ids)], params)
    calls = timer.calls
    k, seen = 0, 0
    while k < len(calls) and seen < len(ids):
        seen += calls[k][0]
        k += 1
    if seen != len(ids) or k == 0:
        raise LingliError(f"internal: could not find the prefill forwards "
                          f"({seen} of {len(ids)} prompt tokens in {len(calls)} calls)")
    prefill_s = calls[k - 1][2] - calls[0][1]
    decode = calls[k:]
    decode_s = decode[-1][2] - calls[k - 1][2] if decode else 0.0
    return prefill_s, len(decode), decode_s


def measure_prefill(llm, ids: Sequence[int]) -> float:
    """Prefill tokens/s of one request with prompt `ids` (one forward per 512-token chunk)."""
    prefill_s, _, _ = _timed_generate(llm, ids, 1)
    return len(ids) / prefill_s


def measure_decode(llm, prompt: Sequence[int], n: int) -> float:
    """Decode tokens/s generating n tokens after `prompt` (n - 1 decode steps timed)."""
    if n < 2:
        raise LingliError(f"decode needs at least 2 tokens to time a step, got {n}")
    _, steps, decode_s = _timed_generate(llm, prompt, n)
    if steps == 0 or decode_s <= 0:
        raise LingliError("internal: no decode step was timed")
    return steps / decode_s


def read_bandwidth(threads: int, mib: int = 1024, repeats: int = 5) -> float:
    """Read bandwidth in GB/s with `threads` threads (runtime._C's probe)."""
    from . import _C

    _C.set_num_threads(threads)
    return float(_C.read_bandwidth(int(mib) << 20, repeats))


def set_threads(llm, threads: int) -> None:
    from . import _C

    _C.set_num_threads(threads)
    try:
        llm.backend.num_threads = threads
    except AttributeError:
        pass


def decode_params(config) -> int:
    """Weights one decode step reads, in elements: every layer matrix, norm and bias,
    the final norm and the LM head (the embedding lookup reads one row only)."""
    total = 0
    for name, shape in config.weight_shapes().items():
        if name != "model.embed_tokens.weight":
            total += int(np.prod(shape))
    if config.tie_word_embeddings:
        total += config.vocab_size * config.hidden_size
    return total


# ---------------------------------------------------------------- loading

def _log(msg: str) -> None:
    print(f"[lingli] {msg}", file=sys.stderr, flush=True)


def prepare_lingli(model_dir, quant: str | None, method: str | None = None,
                   group_size: int | None = None, fresh: bool = False, log=_log):
    """(path, quant argument for LLM) to run `model_dir` as `quant`.

    int8/int4/int3 are quantized once into the cache (runtime.hub.quantized_copy)
    and loaded from there, so a benchmark does not repeat GPTQ on every run.
    """
    from .config import ModelConfig
    from .hub import quantized_copy

    d = Path(model_dir)
    if quant not in ("int8", "int4", "int3"):
        return d, quant
    if ModelConfig.from_dir(d).quantization_config:
        return d, None
    return quantized_copy(d, quant, group_size, method, fresh=fresh), None


def load_llm(model_dir, quant: str | None, threads: int, max_model_len: int,
             method: str | None = None, fresh: bool = False, log=_log):
    """A runtime.LLM for `quant` (quantized checkpoints cached, see prepare_lingli)."""
    import inspect

    from .llm import LLM

    path, q = prepare_lingli(model_dir, quant, method, fresh=fresh, log=log)
    params = inspect.signature(LLM).parameters
    kw = {"progress": False} if "progress" in params else {}
    if "enable_prefix_caching" in params:     # the same prompt is timed again and again
        kw["enable_prefix_caching"] = False
    return LLM(path, quant=q, num_threads=threads, max_model_len=max_model_len, **kw)


# ---------------------------------------------------------------- the bench

def bench_model(model, quants: Sequence[str | None], threads: Sequence[int], prefill: int,
                decode: int, repeats: int, decode_prompt: int = 8, probe_mib: int = 1024,
                method: str | None = None, fresh: bool = False, log=None) -> list[dict]:
    """Rows of measurements (see the module docstring); quants that this build cannot
    run are reported through `log` and skipped."""
    from . import _C
    from .config import ModelConfig
    from .eval import resolve
    from .hub import resolve_model

    log = log or _log
    rows = []
    target = Path(resolve_model(str(resolve(str(model)))))
    if ModelConfig.from_dir(target).quantization_config and list(quants) != [None]:
        log(f"{target} is a quantized checkpoint: measuring it as stored")
        quants = [None]
    max_len = max(prefill, decode_prompt + decode) + 8
    for q in quants:
        try:
            llm = load_llm(target, q, threads[0], max_len, method, fresh, log)
        except LingliError as e:
            if q in ("int8", "int4", "int3") and "not available" in str(e):
                log(f"skipping {q}: {e}")
                continue
            raise
        wbytes = llm.model.weight_bytes_per_token()
        nparams = decode_params(llm.config)
        pre_ids = bench_ids(llm, prefill)
        dec_ids = bench_ids(llm, decode_prompt, seed=1)
        for t in threads:
            set_threads(llm, t)
            bw0 = read_bandwidth(t, probe_mib)
            set_threads(llm, t)
            measure_decode(llm, dec_ids, min(decode, 4))              # warm-up
            best_p = best_d = 0.0
            for _ in range(repeats):
                best_p = max(best_p, measure_prefill(llm, pre_ids))
                best_d = max(best_d, measure_decode(llm, dec_ids, decode))
            bw = max(bw0, read_bandwidth(t, probe_mib))
            limit = bw * 1e9 / wbytes
            row = {"model": str(model), "quant": q or "checkpoint", "threads": t,
                   "isa": _C.isa(), "weight_mb_per_token": wbytes / 1e6,
                   "bits_per_weight": 8.0 * wbytes / nparams,
                   "prefill_tokens": prefill, "prefill_tok_s": best_p,
                   "decode_tokens": decode, "decode_tok_s": best_d,
                   "read_gb_s": bw, "limit_tok_s": limit, "share": best_d / limit}
            rows.append(row)
            log(f"{q or 'checkpoint'} x{t}: prefill {best_p:.1f} tok/s, decode {best_d:.2f} tok/s"
                f" ({row['share']:.0%} of {limit:.1f})")
        del llm
        gc.collect()
    return rows


def format_table(rows: Sequence[dict]) -> str:
    lines = ["| model | weights | threads | bits/weight | MB read/token | prefill tok/s | "
             "decode tok/s | read GB/s | limit tok/s | share |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['quant']} | {r['threads']} | {r['bits_per_weight']:.2f} "
                     f"| {r['weight_mb_per_token']:.0f} | {r['prefill_tok_s']:.1f} | "
                     f"{r['decode_tok_s']:.2f} | {r['read_gb_s']:.1f} | {r['limit_tok_s']:.1f} | "
                     f"{r['share']:.0%} |")
    return "\n".join(lines)


def cmd_bench(a: argparse.Namespace) -> int:
    from . import _C

    quants = [normalize_quant(q) for q in a.quant]
    if any(t < 1 for t in a.threads):
        raise LingliError(f"--threads must be >= 1, got {a.threads}")
    for opt, v, lo in (("--prefill", a.prefill, 1), ("--decode", a.decode, 2),
                       ("--repeats", a.repeats, 1), ("--decode-prompt", a.decode_prompt, 1)):
        if v < lo:
            raise LingliError(f"{opt} must be at least {lo}, got {v}")
    rows = bench_model(a.model, quants, a.threads, a.prefill, a.decode, a.repeats,
                       decode_prompt=a.decode_prompt, probe_mib=a.probe_mib,
                       method=a.method, fresh=a.requantize)
    if not rows:
        raise LingliError("nothing was measured: none of the requested formats can run here")
    print(f"model={a.model} isa={_C.isa()} cpus={os.cpu_count()} prefill={a.prefill} "
          f"decode={a.decode} (after a {a.decode_prompt}-token prompt) best of {a.repeats}")
    print(format_table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


def add_parser(subparsers) -> None:
    """Register `lingli bench`."""
    p = subparsers.add_parser(
        "bench", help="prefill/decode tok/s per weight format vs the bandwidth limit",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Measure prefill and decode speed for each weight format and thread count,\n"
            "and the limit a memory-bound decode can reach on this machine: read bandwidth\n"
            "(measured in the same run, same threads) / weight bytes read per token.\n"
            "Prints a markdown table: bits/weight, MB read per token, prefill tok/s, decode\n"
            "tok/s, read GB/s, limit tok/s and decode's share of the limit.\n\n"
            "    lingli bench smollm2 --quant fp16 int8 int4 int3 --threads 1 2\n"
            "    lingli bench tinyllama-random      # random TinyLlama-1.1B shape, 2.2 GB, made once"))
    p.add_argument("model", help="checkpoint directory, .gguf file, a known name (smollm2), "
                                 "'tinyllama-random' (random weights of TinyLlama-1.1B's shape, "
                                 "written to the cache on first use) or a Lingli quantized checkpoint")
    p.add_argument("--quant", nargs="+", default=["fp16", "int8", "int4", "int3"],
                   help="weight formats to measure (fp32 fp16 int8 int4 int3; f16/f32 accepted; "
                        "default: %(default)s)")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2],
                   help="thread counts to measure (default: %(default)s)")
    p.add_argument("--prefill", type=int, default=512,
                   help="prompt tokens for the prefill measurement (default %(default)s)")
    p.add_argument("--decode", type=int, default=128,
                   help="tokens to generate for the decode measurement, greedy, EOS ignored "
                        "(default %(default)s)")
    p.add_argument("--decode-prompt", type=int, default=8,
                   help="prompt tokens before the decode measurement (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs per measurement; the best counts (default %(default)s)")
    p.add_argument("--probe-mib", type=int, default=1024,
                   help="MiB the bandwidth probe reads per pass (default %(default)s)")
    p.add_argument("--method", default=None, choices=["rtn", "search", "gptq"],
                   help="quantizer for int8/int4/int3 (default: Lingli's per bit width: search "
                        "for int8, gptq for int4/int3; search when there is no tokenizer). "
                        "Speed does not depend on it")
    p.add_argument("--requantize", action="store_true",
                   help="quantize again instead of reusing the quantized checkpoint cached in "
                        "<cache>/quantized/")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the rows as JSON")
    p.set_defaults(func=cmd_bench)
