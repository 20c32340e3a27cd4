"""Lingli next to llama.cpp: same model, same process, same thread count.

    python bench/compare_llamacpp.py smollm2 --threads 2
    python bench/compare_llamacpp.py tinyllama-random --threads 2 --ppl-tokens 1024

Needs llama-cpp-python (bench-only; `pip install llama-cpp-python==0.3.36`,
built as in /work/shared/reference/anchors.md §7).

1. The checkpoint is exported to an F16 GGUF (runtime.llamacpp_export) and
   quantized with llama.cpp's own quantizer (llama_model_quantize, default
   params) to Q8_0, Q4_0 and Q3_K_M, once, into cache_dir()/llamacpp/<model>/.
2. Pairs: Lingli fp16 vs F16, int8 vs Q8_0, int4 vs Q4_0, int3 vs Q3_K_M.
   For each pair both engines are loaded and measured alternately
   (A B A B ..., --repeats rounds, best of) at the same thread count:
   - decode tok/s: greedy, `--decode` tokens after an 8-token prompt; the
     time from the end of prefill to the end of the last step over the
     decode steps (each step = pick the argmax, run one token), both sides;
   - prefill tok/s: a `--prefill`-token prompt, logits of the last position
     only (llama.cpp: n_batch=512, logits_all=False);
   - perplexity of the same token ids with the same windows and arithmetic
     (runtime.eval.perplexity; llama.cpp's logits come from a logits_all=True
     context), and its increase over each engine's own F16 baseline.
3. File bytes of each GGUF, MB each engine reads per decoded token and
   bits/weight of those weights; the read bandwidth at the same thread count
   (best of before and after) and each decode's share of its limit.

A tokenizer-less checkpoint (tinyllama-random) scores the text's UTF-8 bytes
as its byte-piece ids (3 + byte, the dummy GGUF vocabulary's <0xNN> pieces).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from runtime.errors import LingliError

PAIRS = [("fp16", "F16"), ("int8", "Q8_0"), ("int4", "Q4_0"), ("int3", "Q3_K_M")]
FTYPE_NAMES = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
               "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M"}


def log(msg: str) -> None:
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise LingliError("the llama.cpp comparison needs llama-cpp-python: pip install "
                          "llama-cpp-python==0.3.36 (build flags: "
                          "/work/shared/reference/anchors.md section 7)"
                          f" [{e}]") from None
    return llama_cpp


# ------------------------------------------------------------------ GGUF files

def quantize_gguf(src: Path, dst: Path, kind: str, threads: int) -> Path:
    """llama.cpp's own quantizer (llama_model_quantize, default params) -> dst."""
    llama_cpp = require_llama_cpp()
    from llama_cpp._utils import suppress_stdout_stderr

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPE_NAMES[kind])
    params.nthread = threads
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    t0 = time.perf_counter()
    with suppress_stdout_stderr(disable=False):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(),
                                            ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise LingliError(f"llama_model_quantize({src} -> {kind}) failed with code {rc}")
    os.replace(tmp, dst)
    log(f"quantized {dst.name} in {time.perf_counter() - t0:.0f} s")
    return dst


def gguf_files(model_dir: Path, kinds, threads: int, refresh: bool = False) -> dict[str, Path]:
    from runtime.hub import cache_dir
    from runtime.llamacpp_export import export_gguf

    where = cache_dir() / "llamacpp" / model_dir.name
    where.mkdir(parents=True, exist_ok=True)
    files = {"F16": where / f"{model_dir.name}.F16.gguf"}
    if refresh or not files["F16"].is_file():
        t0 = time.perf_counter()
        export_gguf(model_dir, files["F16"], dtype="f16")
        log(f"exported {files['F16']} in {time.perf_counter() - t0:.0f} s")
    for kind in kinds:
        if kind == "F16":
            continue
        files[kind] = where / f"{model_dir.name}.{kind}.gguf"
        if refresh or not files[kind].is_file():
            quantize_gguf(files["F16"], files[kind], kind, threads)
    return files


def gguf_read_stats(path: Path) -> tuple[int, int]:
    """(bytes, elements) of the tensors one decode step reads: all but token_embd,
    unless there is no output.weight (tied: token_embd is the LM head)."""
    from gguf import GGUFReader

    r = GGUFReader(str(path), "r")
    names = {t.name for t in r.tensors}
    nbytes = nel = 0
    for t in r.tensors:
        if t.name == "token_embd.weight" and "output.weight" in names:
            continue
        nbytes += int(t.n_bytes)
        nel += int(t.n_elements)
    del r
    return nbytes, nel


# ------------------------------------------------------------------ llama.cpp side

class LlamaCppEngine:
    """Timed prefill/decode and all-position logits through llama-cpp-python."""

    def __init__(self, path: Path, threads: int, n_ctx: int, logits_all: bool = False,
                 sample_vocab: int | None = None) -> None:
        llama_cpp = require_llama_cpp()
        self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, n_batch=512, n_ubatch=512,
                                   logits_all=logits_all, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.sample_vocab = sample_vocab or self.n_vocab   # read by runtime.eval.perplexity

    def _last_logits(self) -> np.ndarray:
        ptr = self.llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def _argmax(self) -> int:
        return int(np.argmax(self._last_logits()[:self.sample_vocab]))

    def prefill(self, ids) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(list(ids))
        dt = time.perf_counter() - t0
        return len(ids) / dt

    def decode(self, prompt, n: int) -> float:
        self.llm.reset()
        self.llm.eval(list(prompt))
        t0 = time.perf_counter()
        tok = self._argmax()
        for _ in range(n - 1):
            self.llm.eval([tok])
            tok = self._argmax()
        dt = time.perf_counter() - t0
        return (n - 1) / dt

    def logits(self, ids) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.asarray(self.llm.scores[:len(ids)])

    def close(self) -> None:
        try:
            self.llm.close()
        except AttributeError:
            pass
        self.llm = None


# ------------------------------------------------------------------ the comparison

def text_ids(llm, text: str) -> list[int]:
    if llm.tokenizer is not None:
        return llm.tokenizer.encode(text)
    if llm.config.vocab_size < 259:
        raise LingliError("a tokenizer-less model needs >= 259 vocabulary rows to score text bytes")
    return [3 + b for b in text.encode("utf-8")]


def run(a: argparse.Namespace) -> dict:
    from runtime.bench import bench_ids, decode_params, load_llm, measure_decode, \
        measure_prefill, read_bandwidth, set_threads
    from runtime.eval import perplexity, read_text, resolve, windows

    require_llama_cpp()
    T = a.threads
    from runtime.hub import resolve_model
    model_dir = Path(resolve_model(str(resolve(a.model))))
    pairs = [(lq, lc) for lq, lc in PAIRS if lq in a.pairs or lc in a.pairs]
    if not pairs:
        raise LingliError(f"--pairs {a.pairs} names none of {PAIRS}")
    files = gguf_files(model_dir, [lc for _, lc in pairs], T, a.refresh)
    text = read_text(a.text)
    stride = a.stride or a.ctx // 2
    max_len = max(a.prefill, 8 + a.decode, a.ctx) + 8

    # the token ids both engines see (from the checkpoint's tokenizer, no model needed)
    from types import SimpleNamespace
    from runtime.config import ModelConfig
    from runtime.llm import _load_tokenizer
    cfg = ModelConfig.from_dir(model_dir)
    tok = _load_tokenizer(model_dir)
    shim = SimpleNamespace(tokenizer=tok, config=cfg, sample_vocab=min(
        tok.vocab_size, cfg.vocab_size) if tok else cfg.vocab_size)
    sample_vocab = shim.sample_vocab
    pre_ids, dec_ids = bench_ids(shim, a.prefill), bench_ids(shim, 8, seed=1)
    ids = text_ids(shim, text)[:a.ppl_tokens]

    bw = [read_bandwidth(T, a.probe_mib)]
    rows = []
    for lq, lc in pairs:
        row = {"lingli": lq, "llamacpp": lc, "threads": T,
               "gguf_bytes": files[lc].stat().st_size}
        gb, ge = gguf_read_stats(files[lc])
        row.update(lc_mb_per_token=gb / 1e6, lc_bits_per_weight=8.0 * gb / ge)
        llm = None
        t0 = time.perf_counter()
        try:
            llm = load_llm(model_dir, lq, T, max_len, method=a.method, log=log)
            log(f"Lingli {lq} loaded in {time.perf_counter() - t0:.0f} s")
        except LingliError as e:
            log(f"Lingli {lq} cannot run here ({e}); measuring llama.cpp {lc} only")
        lc_eng = LlamaCppEngine(files[lc], T, n_ctx=max_len, sample_vocab=sample_vocab)
        if llm is not None:
            wbytes = llm.model.weight_bytes_per_token()
            row.update(lingli_mb_per_token=wbytes / 1e6,
                       lingli_bits_per_weight=8.0 * wbytes / decode_params(llm.config))
        # warm-up both, then alternate A B A B
        if llm is not None:
            set_threads(llm, T)
            measure_decode(llm, dec_ids, 4)
        lc_eng.decode(dec_ids, 4)
        # Each round's pair ran back to back; the host's speed drifts between rounds
        # (and sometimes favours one engine), so the median of the rounds' own
        # ratios is reported beside the ratio of the bests.
        runs = {"l_dec": [], "c_dec": [], "l_pre": [], "c_pre": []}
        for r in range(a.repeats):
            if llm is not None:
                set_threads(llm, T)
                runs["l_dec"].append(measure_decode(llm, dec_ids, a.decode))
            runs["c_dec"].append(lc_eng.decode(dec_ids, a.decode))
            if llm is not None:
                set_threads(llm, T)
                runs["l_pre"].append(measure_prefill(llm, pre_ids))
            runs["c_pre"].append(lc_eng.prefill(pre_ids))
            last = {k: v[-1] if v else 0.0 for k, v in runs.items()}
            log(f"{lq}/{lc} round {r + 1}: decode {last['l_dec']:.2f} vs {last['c_dec']:.2f}, "
                f"prefill {last['l_pre']:.1f} vs {last['c_pre']:.1f} tok/s")
        lc_eng.close()
        best = {k: max(v, default=0.0) for k, v in runs.items()}
        row.update(lingli_decode_tok_s=best["l_dec"] or None, llamacpp_decode_tok_s=best["c_dec"],
                   lingli_prefill_tok_s=best["l_pre"] or None, llamacpp_prefill_tok_s=best["c_pre"],
                   rounds={k: [round(x, 3) for x in v] for k, v in runs.items()})
        if llm is not None:
            row.update(decode_ratio_median=paired_median(runs["l_dec"], runs["c_dec"]),
                       prefill_ratio_median=paired_median(runs["l_pre"], runs["c_pre"]))
        if a.ppl_tokens >= 2:
            n_win = len(windows(len(ids), a.ctx, stride))
            lc_ppl = LlamaCppEngine(files[lc], T, n_ctx=a.ctx, logits_all=True,
                                    sample_vocab=sample_vocab)
            t0 = time.perf_counter()
            row["llamacpp_ppl"], n = perplexity(lc_ppl, ids, a.ctx, stride)
            t1 = time.perf_counter()
            lc_ppl.close()
            if llm is not None:
                set_threads(llm, T)
                row["lingli_ppl"], n2 = perplexity(llm, ids, a.ctx, stride)
                assert n2 == n
            t2 = time.perf_counter()
            row["ppl_tokens_scored"] = n
            log(f"{lq}/{lc} ppl over {n} tokens ({n_win} windows): lingli "
                f"{row.get('lingli_ppl', float('nan')):.4f} ({t2 - t1:.0f} s), llama.cpp "
                f"{row['llamacpp_ppl']:.4f} ({t1 - t0:.0f} s)")
        rows.append(row)
        del llm
        gc.collect()
    bw.append(read_bandwidth(T, a.probe_mib))
    gbs = max(bw)
    base = rows[0] if rows and rows[0]["lingli"] == "fp16" else None
    for row in rows:
        for side in ("lingli", "llamacpp"):
            mb = row.get(f"{'lc' if side == 'llamacpp' else 'lingli'}_mb_per_token")
            dec = row.get(f"{side}_decode_tok_s")
            if mb and dec:
                row[f"{side}_share"] = dec / (gbs * 1e3 / mb)
            if base and row.get(f"{side}_ppl") and base.get(f"{side}_ppl"):
                row[f"{side}_ppl_increase"] = row[f"{side}_ppl"] / base[f"{side}_ppl"] - 1
    return {"model": str(a.model), "model_dir": str(model_dir), "threads": T,
            "read_gb_s": gbs, "read_gb_s_runs": bw, "decode_tokens": a.decode,
            "prefill_tokens": a.prefill, "ppl_ctx": a.ctx, "ppl_stride": stride,
            "text": str(a.text), "repeats": a.repeats, "rows": rows}


def paired_median(a: list[float], b: list[float]) -> float | None:
    """The median over rounds of a[i] / b[i] (rounds where both ran)."""
    r = sorted(x / y for x, y in zip(a, b) if x and y)
    if not r:
        return None
    return r[len(r) // 2] if len(r) % 2 else (r[len(r) // 2 - 1] + r[len(r) // 2]) / 2


def _f(x, fmt="{:.2f}") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) and x is not None else "n/a"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a and b else "n/a"


def format_report(res: dict) -> str:
    rows = res["rows"]
    out = [f"model={res['model']} threads={res['threads']} read bandwidth "
           f"{res['read_gb_s']:.1f} GB/s (best of before/after); decode {res['decode_tokens']} "
           f"tokens after 8, prefill {res['prefill_tokens']}, best of {res['repeats']} "
           f"alternating rounds (L/C med: the median of each round's own ratio)", "",
           "| Lingli | llama.cpp | GGUF bytes | bits/w L | bits/w C | MB/tok L | MB/tok C | "
           "decode L | decode C | L/C | L/C med | share L | share C | prefill L | prefill C | L/C | "
           "L/C med |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {r['lingli']} | {r['llamacpp']} | {r['gguf_bytes']:,} | "
            f"{_f(r.get('lingli_bits_per_weight'))} | {_f(r.get('lc_bits_per_weight'))} | "
            f"{_f(r.get('lingli_mb_per_token'), '{:.0f}')} | {_f(r.get('lc_mb_per_token'), '{:.0f}')} | "
            f"{_f(r.get('lingli_decode_tok_s'))} | {_f(r.get('llamacpp_decode_tok_s'))} | "
            f"{_ratio(r.get('lingli_decode_tok_s'), r.get('llamacpp_decode_tok_s'))} | "
            f"{_f(r.get('decode_ratio_median'))} | "
            f"{_f(r.get('lingli_share'), '{:.0%}')} | {_f(r.get('llamacpp_share'), '{:.0%}')} | "
            f"{_f(r.get('lingli_prefill_tok_s'), '{:.1f}')} | "
            f"{_f(r.get('llamacpp_prefill_tok_s'), '{:.1f}')} | "
            f"{_ratio(r.get('lingli_prefill_tok_s'), r.get('llamacpp_prefill_tok_s'))} | "
            f"{_f(r.get('prefill_ratio_median'))} |")
    if any("llamacpp_ppl" in r for r in rows):
        n = rows[0].get("ppl_tokens_scored")
        out += ["", f"perplexity on {res['text']} ({n} tokens scored, ctx {res['ppl_ctx']}, "
                f"stride {res['ppl_stride']}; same ids and windows for both engines)", "",
                "| Lingli | llama.cpp | ppl L | ppl C | increase over F16, L | increase over F16, C |",
                "|---|---|---|---|---|---|"]
        for r in rows:
            out.append(f"| {r['lingli']} | {r['llamacpp']} | {_f(r.get('lingli_ppl'), '{:.4f}')} | "
                       f"{_f(r.get('llamacpp_ppl'), '{:.4f}')} | "
                       f"{_f(r.get('lingli_ppl_increase'), '{:+.2%}')} | "
                       f"{_f(r.get('llamacpp_ppl_increase'), '{:+.2%}')} |")
    return "\n".join(out)


def main(argv=None) -> int:
    from runtime.eval import DEFAULT_TEXT

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", nargs="?", default="smollm2",
                    help="smollm2, tinyllama-random, or a float HF checkpoint dir (default smollm2)")
    ap.add_argument("--threads", type=int, default=2, help="threads for both engines (default 2)")
    ap.add_argument("--pairs", nargs="+", default=[p for p, _ in PAIRS],
                    help="which pairs, by Lingli or llama.cpp name (default: all four)")
    ap.add_argument("--decode", type=int, default=128, help="tokens decoded (default 128)")
    ap.add_argument("--prefill", type=int, default=512, help="prefill prompt tokens (default 512)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds, best of (default 3)")
    ap.add_argument("--text", default=DEFAULT_TEXT, help="perplexity text (default %(default)s)")
    ap.add_argument("--ppl-tokens", type=int, default=4096,
                    help="score the first N tokens of the text; 0 skips perplexity (default 4096)")
    ap.add_argument("--ctx", type=int, default=512, help="perplexity window (default 512)")
    ap.add_argument("--stride", type=int, default=None, help="perplexity stride (default ctx/2)")
    ap.add_argument("--probe-mib", type=int, default=1024, help="bandwidth probe MiB (default 1024)")
    ap.add_argument("--method", default=None, choices=["rtn", "search", "gptq"],
                    help="Lingli's quantizer (default: its per-bit-width default, cached)")
    ap.add_argument("--refresh", action="store_true", help="re-export and re-quantize the GGUFs")
    ap.add_argument("--json", default=None, help="write the results as JSON to this file")
    a = ap.parse_args(argv)
    try:
        res = run(a)
    except LingliError as e:
        print(f"compare_llamacpp: error: {e}", file=sys.stderr)
        return 2
    print(format_report(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
