"""`lingli eval ppl`: sliding-window perplexity of a model on a text file.

    from runtime.eval import perplexity, windows
    ppl, n = perplexity(llm, ids, ctx=512, stride=256)

The standard method for fixed-length models (Hugging Face's "Perplexity of
fixed-length models"): windows of `ctx` tokens advance by `stride`; each
window scores only the tokens the previous window did not score, so every
scored token sees at least ctx - stride tokens of context (the first window
scores all its tokens but the first). A window cannot score its own first
token, so consecutive windows always share at least one token: with
stride == ctx the windows advance by ctx - 1 and each scores ctx - 1 new
tokens. Every token after the first is scored exactly once.

NLL comes from the log-softmax of the logits in float64, over the tokenizer's
real vocabulary only (checkpoint padding rows excluded). ppl = exp(mean NLL).

`perplexity` needs only `.logits(ids) -> [T, V]` (and optionally
`.sample_vocab`), so bench/compare_llamacpp.py feeds llama.cpp through the
very same windows and arithmetic.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import LingliError, TokenizerError

__all__ = ["DEFAULT_TEXT", "windows", "window_nll", "perplexity", "read_text", "add_parser"]

DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"


def windows(n_tokens: int, ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows over n_tokens as (begin, end, first_scored): input ids[begin:end],
    targets ids[first_scored:end] (each predicted from the logits one position earlier)."""
    if ctx < 2:
        raise LingliError(f"ctx must be at least 2 tokens, got {ctx}")
    if stride < 1 or stride > ctx:
        raise LingliError(f"stride must be in [1, ctx={ctx}], got {stride} "
                          "(a stride larger than the window would skip tokens)")
    if n_tokens < 2:
        raise LingliError(f"perplexity needs at least 2 tokens, got {n_tokens}")
    step = min(stride, ctx - 1)
    out = []
    begin, prev_end = 0, 1            # token 0 is never scored
    while True:
        end = min(begin + ctx, n_tokens)
        out.append((begin, end, prev_end))
        prev_end = end
        if end >= n_tokens:
            return out
        begin += step


def window_nll(logits: np.ndarray, targets: np.ndarray, vocab: int | None = None) -> np.ndarray:
    """-log p(target) per row, in float64: log-softmax of logits[:, :vocab] at each target."""
    lg = np.asarray(logits)
    if vocab is not None:
        lg = lg[:, :vocab]
    targets = np.asarray(targets, dtype=np.int64)
    if targets.size and (targets.min() < 0 or targets.max() >= lg.shape[1]):
        bad = int(targets[(targets < 0) | (targets >= lg.shape[1])][0])
        raise LingliError(f"token id {bad} is outside the scored vocabulary [0, {lg.shape[1]})")
    out = np.empty(len(targets), dtype=np.float64)
    for s in range(0, len(targets), 64):          # bound the float64 copy's size
        x = lg[s:s + 64].astype(np.float64)
        m = x.max(axis=1, keepdims=True)
        lse = np.log(np.exp(x - m).sum(axis=1)) + m[:, 0]
        out[s:s + 64] = lse - x[np.arange(len(x)), targets[s:s + 64]]
    return out


def _vocab_of(model) -> int | None:
    v = getattr(model, "sample_vocab", None)
    return int(v) if v else None


def perplexity(llm, ids: Sequence[int], ctx: int = 512, stride: int = 256,
               progress: Callable[[int, int], None] | None = None) -> tuple[float, int]:
    """(perplexity, number of tokens scored) of `ids` under `llm` (anything with
    .logits(ids) -> float [T, V]; its .sample_vocab, if any, bounds the vocabulary)."""
    ids = [int(t) for t in ids]
    vocab = _vocab_of(llm)
    spans = windows(len(ids), ctx, stride)
    total, n = 0.0, 0
    for k, (begin, end, first) in enumerate(spans):
        logits = llm.logits(ids[begin:end])
        if logits.shape[0] != end - begin:
            raise LingliError(f"the model returned {logits.shape[0]} rows of logits for "
                              f"{end - begin} tokens")
        rows = logits[first - 1 - begin:end - 1 - begin]
        nll = window_nll(rows, np.asarray(ids[first:end]), vocab)
        total += float(nll.sum())
        n += len(nll)
        if progress is not None:
            progress(k + 1, len(spans))
    return math.exp(total / n), n


def read_text(path) -> str:
    """A text file's contents; a clear error naming it when missing or not UTF-8."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise LingliError(f"{p}: text file not found") from None
    except OSError as e:
        raise LingliError(f"{p}: cannot read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise TokenizerError(f"{p}: not valid UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                             f"{e.start}, line {line}); convert it first, e.g. "
                             f"iconv -f GB18030 -t UTF-8") from None


def resolve(model: str):
    """A model argument as LLM takes it; synthetic names ("tinyllama-random") made on demand."""
    from .synthetic import resolve_synthetic

    return resolve_synthetic(model) or model


# ---------------------------------------------------------------------- CLI

def cmd_ppl(a: argparse.Namespace) -> int:
    from .bench import load_llm
    from .hub import resolve_model

    if a.ctx < 2:
        raise LingliError(f"--ctx must be at least 2, got {a.ctx}")
    stride = a.stride if a.stride is not None else max(1, a.ctx // 2)
    windows(2, a.ctx, stride)                         # validate before loading anything
    text = read_text(a.textfile)
    t0 = time.perf_counter()
    llm = load_llm(resolve_model(str(resolve(a.model))), a.quant, a.threads, a.ctx,
                   method=a.method)
    if llm.tokenizer is None:
        raise LingliError(f"{llm.path} has no tokenizer, so text cannot be scored")
    ids = llm.tokenizer.encode(text)
    if a.max_tokens is not None:
        if a.max_tokens < 2:
            raise LingliError(f"--max-tokens must be at least 2, got {a.max_tokens}")
        ids = ids[:a.max_tokens]
    if len(ids) < 2:
        raise LingliError(f"{a.textfile}: the text has {len(ids)} tokens; need at least 2")
    n_win = len(windows(len(ids), a.ctx, stride))
    print(f"[lingli] {llm.path} quant={a.quant or 'checkpoint'} threads="
          f"{llm.backend.num_threads}: {len(ids)} tokens, {n_win} windows of {a.ctx} "
          f"(stride {stride})", file=sys.stderr)
    t1 = time.perf_counter()

    def progress(k: int, total: int) -> None:
        if not a.quiet:
            print(f"\r[lingli] window {k}/{total}", end="" if k < total else "\n",
                  file=sys.stderr, flush=True)

    ppl, n = perplexity(llm, ids, a.ctx, stride, progress)
    dt = time.perf_counter() - t1
    print(f"tokens scored: {n}")
    print(f"perplexity: {ppl:.4f}")
    print(f"[lingli] {dt:.1f} s ({n_win * a.ctx / dt if dt else 0:.0f} tok/s evaluated; "
          f"load {t1 - t0:.1f} s)", file=sys.stderr)
    if a.json:
        row = {"model": str(llm.path), "quant": a.quant or "checkpoint", "text": str(a.textfile),
               "tokens": len(ids), "tokens_scored": n, "ctx": a.ctx, "stride": stride,
               "ppl": ppl, "nll_mean": math.log(ppl), "seconds": dt,
               "threads": llm.backend.num_threads}
        Path(a.json).write_text(json.dumps(row, indent=2) + "\n", encoding="utf-8")
    return 0


def add_parser(subparsers) -> None:
    """Register `lingli eval` (with its `ppl` subcommand)."""
    e = subparsers.add_parser(
        "eval", help="evaluate a model (perplexity)",
        description="Evaluate a model. `lingli eval ppl MODEL TEXTFILE` prints sliding-window "
                    "perplexity.")
    sub = e.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    p = sub.add_parser(
        "ppl", help="sliding-window perplexity on a UTF-8 text file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Sliding-window perplexity (Hugging Face's method for fixed-length models):\n"
            "windows of --ctx tokens advance by --stride tokens; each window scores only\n"
            "the tokens the previous one did not (the first window scores all but its first\n"
            "token), so every token after the first is scored exactly once with at least\n"
            "ctx - stride tokens of context. NLL is the float64 log-softmax over the\n"
            "tokenizer's real vocabulary. Prints the tokens scored and the perplexity.\n\n"
            f"The project's default evaluation text is {DEFAULT_TEXT} (on every Debian):\n"
            f"    lingli eval ppl smollm2 {DEFAULT_TEXT} --quant int4\n\n"
            "Compare perplexities only for the same text, tokenizer, --ctx and --stride."))
    p.add_argument("model", help="checkpoint directory, .gguf file, a known name (smollm2) or a "
                                 "Lingli quantized checkpoint directory")
    p.add_argument("textfile", help=f"UTF-8 text file to score (project default: {DEFAULT_TEXT})")
    p.add_argument("--quant", default=None, choices=["fp32", "fp16", "int8", "int4", "int3"],
                   help="weight format to evaluate (default: the checkpoint's own dtype)")
    p.add_argument("--method", default=None, choices=["rtn", "search", "gptq"],
                   help="quantizer for int8/int4/int3 (default: Lingli's per bit width); the "
                        "quantized checkpoint is cached in <cache>/quantized/ and reused")
    p.add_argument("--ctx", type=int, default=512,
                   help="window length in tokens (default %(default)s)")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens each window advances, 1..ctx (default ctx/2 = 256 for ctx 512); "
                        "smaller is slower and gives each token more context")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="score only the first N tokens of the text (default: all)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: all cores, or $LINGLI_NUM_THREADS)")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="also write the result as JSON to FILE")
    p.add_argument("--quiet", action="store_true", help="no per-window progress on stderr")
    p.set_defaults(func=cmd_ppl)
