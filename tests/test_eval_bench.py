"""Perplexity, `lingli eval` / `lingli bench`, synthetic checkpoints and the llama.cpp GGUF export.

Fast and untimed: tiny random models only (speed is measured by the benchmarks).
"""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from runtime import LLM
from runtime import bench as bench_mod
from runtime import eval as eval_mod
from runtime.errors import LingliError
from runtime.eval import perplexity, windows
from runtime.safetensors_io import open_safetensors
from tiny_model import make_tiny_llama

TEXT = ("The river ran past the old mill, and the miller counted sacks of grain while "
        "the children watched the water wheel turn. 伶荔 tastes sweet in summer. ") * 6


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalbench")
    return make_tiny_llama(root / "sp", "sp", root, pad_rows=5, max_positions=256)


@pytest.fixture(scope="module")
def tiny_llm(tiny_dir):
    return LLM(str(tiny_dir), quant="fp32", num_threads=1)


def run_cli(argv) -> int:
    """The subcommands as runtime.cli wires them (add_parser + func), errors as exit code 2."""
    p = argparse.ArgumentParser(prog="lingli")
    sub = p.add_subparsers(dest="command", required=True)
    eval_mod.add_parser(sub)
    bench_mod.add_parser(sub)
    a = p.parse_args([str(x) for x in argv])
    return a.func(a)


# ------------------------------------------------------------------ windows

@pytest.mark.parametrize("n,ctx,stride", [(100, 16, 8), (100, 16, 16), (100, 16, 1), (100, 16, 15),
                                          (10, 16, 8), (16, 16, 16), (17, 16, 16), (2, 2, 2),
                                          (257, 32, 7)])
def test_windows_score_every_token_after_the_first_exactly_once(n, ctx, stride):
    spans = windows(n, ctx, stride)
    scored = []
    prev_begin = -1
    for begin, end, first in spans:
        assert 0 <= begin < first <= end <= n      # never its own first token
        assert end - begin <= ctx
        assert begin > prev_begin
        prev_begin = begin
        scored.extend(range(first, end))
    assert scored == list(range(1, n))
    if stride < ctx:                                  # HF's windows exactly: begins at k*stride
        assert [b for b, _, _ in spans] == [k * stride for k in range(len(spans))]


@pytest.mark.parametrize("n,ctx,stride", [(10, 8, 9), (10, 1, 1), (10, 8, 0), (1, 8, 4)])
def test_windows_reject_bad_arguments(n, ctx, stride):
    with pytest.raises(LingliError):
        windows(n, ctx, stride)


# ------------------------------------------------------------------ perplexity

def _log_softmax64(row: np.ndarray) -> np.ndarray:
    x = row.astype(np.float64)
    return x - (np.log(np.sum(np.exp(x - x.max()))) + x.max())


@pytest.mark.parametrize("ctx,stride", [(16, 8), (16, 16), (64, 64)])
def test_perplexity_matches_token_by_token_numpy(tiny_llm, ctx, stride):
    ids = tiny_llm.tokenizer.encode(TEXT)[:40]
    vocab = tiny_llm.sample_vocab
    assert vocab < tiny_llm.config.vocab_size          # padding rows exist and must be ignored
    # each scored token t, predicted from its own window's context ids[begin:t]
    nll = []
    for begin, end, first in windows(len(ids), ctx, stride):
        for t in range(first, end):
            row = tiny_llm.logits(ids[begin:t])[-1][:vocab]
            nll.append(-_log_softmax64(row)[ids[t]])
    ppl, n = perplexity(tiny_llm, ids, ctx, stride)
    assert n == len(ids) - 1 == len(nll)
    assert ppl == pytest.approx(math.exp(np.mean(nll)), rel=1e-5)


def test_perplexity_single_window_and_padding_excluded(tiny_llm):
    ids = tiny_llm.tokenizer.encode(TEXT)[:50]
    logits = tiny_llm.logits(ids)
    vocab = tiny_llm.sample_vocab
    ref = np.mean([-_log_softmax64(logits[t - 1][:vocab])[ids[t]] for t in range(1, len(ids))])
    ppl, n = perplexity(tiny_llm, ids, ctx=64, stride=32)
    assert n == 49 and ppl == pytest.approx(math.exp(ref), rel=1e-6)
    with_pad = np.mean([-_log_softmax64(logits[t - 1])[ids[t]] for t in range(1, len(ids))])
    assert not math.isclose(with_pad, ref, rel_tol=1e-9)


# ------------------------------------------------------------------ eval CLI

def test_eval_cli_prints_tokens_and_ppl(tiny_dir, tiny_llm, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    out_json = tmp_path / "ppl.json"
    assert run_cli(["eval", "ppl", tiny_dir, text, "--quant", "fp32", "--ctx", 32, "--stride", 16,
                    "--max-tokens", 80, "--threads", 1, "--json", out_json, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "tokens scored: 79" in out
    row = json.loads(out_json.read_text())
    ids = tiny_llm.tokenizer.encode(TEXT)[:80]
    ppl, n = perplexity(tiny_llm, ids, 32, 16)
    assert row["tokens_scored"] == n == 79
    assert row["ppl"] == pytest.approx(ppl, rel=1e-6)
    assert f"perplexity: {ppl:.4f}" in out


def test_eval_cli_invalid_utf8_is_a_clear_error(tiny_dir, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(LingliError, match=r"latin1\.txt.*UTF-8"):
        run_cli(["eval", "ppl", tiny_dir, bad])
    with pytest.raises(LingliError, match="not found"):
        run_cli(["eval", "ppl", tiny_dir, tmp_path / "missing.txt"])


def test_eval_help_mentions_default_text(capsys):
    with pytest.raises(SystemExit):
        run_cli(["eval", "ppl", "--help"])
    assert "/usr/share/common-licenses/GPL-3" in capsys.readouterr().out


# ------------------------------------------------------------------ bench CLI

def test_bench_cli_prints_a_table(tiny_dir, tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    assert run_cli(["bench", tiny_dir, "--quant", "fp32", "f16", "--threads", 1, "--prefill", 16,
                    "--decode", 4, "--repeats", 1, "--probe-mib", 8, "--json", out_json]) == 0
    out = capsys.readouterr().out
    assert "| model | weights | threads |" in out
    rows = json.loads(out_json.read_text())
    assert [r["quant"] for r in rows] == ["fp32", "fp16"]
    for r in rows:
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["limit_tok_s"] > 0
    assert rows[0]["bits_per_weight"] == pytest.approx(32, rel=0.01)
    assert rows[1]["bits_per_weight"] == pytest.approx(16, rel=0.05)


def test_bench_rejects_unknown_quant(tiny_dir):
    with pytest.raises(LingliError, match="int5"):
        run_cli(["bench", tiny_dir, "--quant", "int5"])


# ------------------------------------------------------------------ synthetic

def test_make_random_llama_tiny_loads(tmp_path):
    from runtime.synthetic import make_random_llama, resolve_synthetic

    d = make_random_llama(tmp_path / "rand", shape="tiny", seed=3)
    llm = LLM(str(d), num_threads=1)
    assert llm.tokenizer is None and llm.config.vocab_size == 320
    logits = llm.logits([1, 5, 9, 300])
    assert logits.shape == (4, 320) and np.isfinite(logits).all()
    assert 0.05 < float(logits.std()) < 50            # neither dead nor exploding
    out = llm.generate([[1, 5, 9]], bench_mod_params(4))[0]
    assert len(out.token_ids) == 4
    again = make_random_llama(tmp_path / "rand2", shape="tiny", seed=3)
    with open_safetensors(next(d.glob("*00002*.safetensors"))) as a, \
            open_safetensors(next(again.glob("*00002*.safetensors"))) as b:
        for k in a.keys():
            assert np.array_equal(a.get(k), b.get(k))
    with pytest.raises(LingliError):
        make_random_llama(d, shape="tiny")             # not empty
    assert resolve_synthetic("smollm2") is None


def bench_mod_params(n):
    from runtime import SamplingParams
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


# ------------------------------------------------------------------ GGUF export

def _tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with open_safetensors(f) as st:
            for k in st.keys():
                out[k] = np.array(st.get(k))
    return out


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_export_then_convert_round_trips(tiny_dir, tmp_path, dtype):
    from runtime.gguf_convert import convert_gguf
    from runtime.llamacpp_export import export_gguf
    from runtime.tokenizer import Tokenizer

    g = export_gguf(tiny_dir, tmp_path / "m.gguf", dtype=dtype)
    back = convert_gguf(g, tmp_path / "back", dtype="fp32" if dtype == "f32" else "fp16")
    a, b = _tensors(tiny_dir), _tensors(back)
    assert set(a) == set(b)
    for k in a:
        want = a[k] if (dtype == "f32" or a[k].ndim == 1) else a[k].astype(np.float16)
        assert b[k].dtype == want.dtype and np.array_equal(b[k], want), k
    t0, t1 = Tokenizer.from_dir(tiny_dir), Tokenizer.from_dir(back)
    assert t0.encode(TEXT) == t1.encode(TEXT)


def test_export_bpe_tokenizer_round_trips(tmp_path):
    from runtime.gguf_convert import convert_gguf
    from runtime.llamacpp_export import export_gguf
    from runtime.tokenizer import Tokenizer

    d = make_tiny_llama(tmp_path / "bpe", "bpe", tmp_path)
    back = convert_gguf(export_gguf(d, tmp_path / "b.gguf", dtype="f32"), tmp_path / "back")
    assert Tokenizer.from_dir(d).encode(TEXT) == Tokenizer.from_dir(back).encode(TEXT)
    a, b = _tensors(d), _tensors(back)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_export_tokenizerless_model_writes_dummy_vocab(tmp_path):
    from gguf import GGUFReader

    from runtime.gguf_convert import convert_gguf
    from runtime.llamacpp_export import export_gguf
    from runtime.synthetic import make_random_llama

    d = make_random_llama(tmp_path / "rand", shape="tiny", dtype="fp16")
    g = export_gguf(d, tmp_path / "r.gguf")
    r = GGUFReader(str(g))
    assert r.fields["tokenizer.ggml.model"].contents() == "llama"
    toks = r.fields["tokenizer.ggml.tokens"].contents()
    assert len(toks) == 320 and toks[:3] == ["<unk>", "<s>", "</s>"] and toks[3] == "<0x00>"
    del r
    a, b = _tensors(d), _tensors(convert_gguf(g, tmp_path / "back", dtype="fp16"))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ llama.cpp (optional)

def _llama_logits(path, ids):
    from llama_cpp import Llama

    m = Llama(str(path), n_ctx=64, n_threads=1, n_batch=64, logits_all=True, verbose=False)
    try:
        m.eval(ids)
        return np.array(m.scores[:len(ids)])
    finally:
        m.close()


def test_llamacpp_runs_the_export_like_lingli(tiny_dir, tiny_llm, tmp_path):
    pytest.importorskip("llama_cpp")
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "bench"))
    from compare_llamacpp import quantize_gguf

    from runtime.llamacpp_export import export_gguf

    from runtime.gguf_convert import convert_gguf

    ids = tiny_llm.tokenizer.encode(TEXT)[:12]
    V = tiny_llm.sample_vocab
    ref = tiny_llm.logits(ids)[:, :V]
    f16 = export_gguf(tiny_dir, tmp_path / "t.f16.gguf")
    q8 = quantize_gguf(f16, tmp_path / "t.q8_0.gguf", "Q8_0", 1)
    # Lingli f32 on llama.cpp's own Q8_0 weights (dequantized back): the same function
    deq = LLM(str(convert_gguf(q8, tmp_path / "q8_back")), quant="fp32", num_threads=1)
    ref_q8 = deq.logits(ids)[:, :V]

    def rel_err(got, want):
        return float(np.sqrt(np.mean((got - want) ** 2) / np.mean(want ** 2)))

    got = _llama_logits(f16, ids)[:, :V]
    assert got.shape == ref.shape and rel_err(got, ref) < 0.005
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9
    # Q8_0 also quantizes the activations to 8 bits, which this random model (weights with
    # std 0.3, so every layer amplifies) turns into a few % of logit error (measured 3%)
    got = _llama_logits(q8, ids)[:, :V]
    assert rel_err(got, ref_q8) < 0.08
    assert (got.argmax(1) == ref_q8.argmax(1)).mean() >= 0.75


def test_prefill_measured_twice_on_one_model(tiny_dir):
    """The same prompt timed again must be computed again, not served by the prefix cache."""
    llm = bench_mod.load_llm(tiny_dir, None, 1, 200)
    ids = list(range(5, 69))
    assert bench_mod.measure_prefill(llm, ids) > 0
    assert bench_mod.measure_prefill(llm, ids) > 0
    assert llm.engine().stats().prefix_cache_hit_tokens == 0


def test_bench_streams_runs_and_reports(tiny_dir, tmp_path, capsys):
    """bench/bench_streams.py end to end on a tiny model: one table row per stream
    count, the KV waste line, and the measured arithmetic in the JSON."""
    from bench import bench_streams

    out = tmp_path / "streams.json"
    assert bench_streams.main([str(tiny_dir), "--quant", "fp32", "--threads", "1",
                               "--streams", "1", "3", "--prompt", "5", "--decode", "6",
                               "--repeats", "1", "--mixed", "4", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["streams"] for r in res["rows"]] == [1, 3]
    assert all(r["decode_tok_s"] > 0 for r in res["rows"])
    assert res["rows"][0]["x_first"] == 1.0
    assert 0.0 <= res["kv_waste"]["waste"] < 1.0
    printed = capsys.readouterr().out
    assert "| 3 |" in printed and "KV waste, 4 mixed-length requests" in printed
    from runtime import _C

    for rates in res["pipe_rates"].values():
        if _C.vnni_peak(1) > 0:          # measured on AVX-512 VNNI CPUs, else None
            assert rates["one"] > 0 and rates["scaling"] == rates["all"] / rates["one"]
        else:
            assert rates is None
    assert ("int8 dot-product rate, 1 / 1 threads" in printed) == (rates is not None)


@pytest.mark.parametrize("scaling, flagged", [(2.0, False), (1.6, False), (1.45, True), (1.0, True)])
def test_bench_streams_flags_shared_vector_pipes(scaling, flagged):
    from bench import bench_streams

    fine = {"one": 900.0, "all": 1800.0, "scaling": 2.0}
    seen = {"one": 900.0, "all": 900.0 * scaling, "scaling": scaling}
    line = bench_streams.pipes_line(fine, seen, 2)
    assert line.startswith("int8 dot-product rate, 1 / 2 threads: 900 / 1800 GOP/s")
    assert ("vector pipes shared" in line) == flagged
    assert bench_streams.pipes_line(None, None, 2) is None


def test_compare_reports_the_median_of_paired_rounds():
    """compare_llamacpp's 'L/C med': each round's Lingli / llama.cpp ratio, the median
    over rounds (a host that speeds one engine up for a round moves the bests, not it)."""
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "bench"))
    from compare_llamacpp import format_report, paired_median

    assert paired_median([2.0, 3.0, 10.0], [1.0, 1.0, 1.0]) == 3.0
    assert paired_median([1.0, 4.0], [1.0, 2.0]) == 1.5
    assert paired_median([0.0, 6.0], [1.0, 2.0]) == 3.0          # a round Lingli did not run
    assert paired_median([], []) is None
    row = {"lingli": "int4", "llamacpp": "Q4_0", "gguf_bytes": 10, "lingli_decode_tok_s": 10.0,
           "llamacpp_decode_tok_s": 4.0, "decode_ratio_median": 1.25, "prefill_ratio_median": 0.75,
           "lingli_prefill_tok_s": 3.0, "llamacpp_prefill_tok_s": 4.0}
    rep = format_report({"model": "m", "threads": 2, "read_gb_s": 1.0, "decode_tokens": 4,
                         "prefill_tokens": 8, "repeats": 3, "rows": [row]})
    line = [ln for ln in rep.splitlines() if ln.startswith("| int4")][0]
    assert "| 10.00 | 4.00 | 2.50 | 1.25 |" in line and line.endswith("| 0.75 | 0.75 |")
