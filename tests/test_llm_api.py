"""The public API (DESIGN.md) on tiny random models with real tokenizers."""
from __future__ import annotations

import json

import numpy as np
import pytest

from runtime import LLM, SamplingParams
from runtime.errors import ContextLengthError, LingliError, TokenizerError
from runtime.safetensors_io import open_safetensors, save_safetensors
from tiny_model import make_tiny_llama


@pytest.fixture(scope="module", params=["sp", "bpe"])
def llm(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    return LLM(str(make_tiny_llama(root / request.param, request.param, root)))


def _free(llm) -> int:
    return llm.cache.allocator.num_free


def test_generate_shapes_and_reasons(llm):
    outs = llm.generate(["hello world", "你好"], SamplingParams(temperature=0, max_tokens=7,
                                                              ignore_eos=True))
    assert len(outs) == 2
    for o in outs:
        assert len(o.token_ids) == 7 and o.finish_reason == "length"
        assert o.text == llm.tokenizer.decode(o.token_ids) or o.text.strip() == \
            llm.tokenizer.decode(o.token_ids).strip()
    assert _free(llm) == llm.cache.num_blocks


def test_prompt_as_token_ids_equals_text(llm):
    ids = llm.tokenizer.encode("the quick brown fox")
    p = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    assert llm.generate([ids], p)[0].token_ids == llm.generate("the quick brown fox", p)[0].token_ids


def test_stream_equals_generate(llm):
    p = SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=20, ignore_eos=True)
    from runtime.llm import RequestOutput
    out = RequestOutput(prompt_token_ids=[])
    pieces = list(llm.stream("model language", p, output=out))
    full = llm.generate("model language", p)[0]
    assert "".join(pieces) == full.text == out.text
    assert out.token_ids == full.token_ids


def test_seed_reproduces_and_differs(llm):
    def run(seed):
        return llm.generate("apple", SamplingParams(temperature=1.0, seed=seed, max_tokens=24,
                                                    ignore_eos=True))[0].token_ids
    assert run(5) == run(5)
    assert run(5) != run(6)


def test_logits_equal_incremental_decode(llm):
    """All-position logits from one pass equal the last-position logits of each prefix."""
    ids = llm.tokenizer.encode("river mountain learning inference")
    full = llm.logits(ids)
    for n in (1, 3, len(ids)):
        np.testing.assert_allclose(llm.logits(ids[:n])[-1], full[n - 1], rtol=1e-4, atol=1e-4)


def test_stop_string_cuts_text(llm):
    p = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    base = llm.generate("the", p)[0]
    text = base.text
    assert len(text) > 6
    stop = text[3:6]
    cut = llm.generate("the", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                             stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == text[:text.index(stop)]


def test_stop_token_ids(llm):
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    base = llm.generate("banana", p)[0].token_ids
    stop_at = base[4]
    first = base.index(stop_at)
    out = llm.generate("banana", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                stop_token_ids=[stop_at]))[0]
    assert out.token_ids == base[:first + 1] and out.finish_reason == "stop"


def test_prompt_longer_than_context(tmp_path):
    m = LLM(str(make_tiny_llama(tmp_path / "m", "sp", tmp_path, max_positions=16)))
    long_ids = list(range(3, 40))
    with pytest.raises(ContextLengthError, match="37 tokens.*16"):
        m.generate([long_ids])
    with pytest.raises(ContextLengthError):
        m.logits(long_ids)
    # A prompt that fits generates until the window is full, then stops with "length".
    out = m.generate([list(range(3, 13))], SamplingParams(temperature=0, max_tokens=100,
                                                          ignore_eos=True))[0]
    assert len(out.token_ids) == 16 - 10 and out.finish_reason == "length"
    assert _free(m) == m.cache.num_blocks


def test_padded_vocab_never_sampled(tmp_path):
    """Rows past the tokenizer's pieces exist in the checkpoint but are never chosen."""
    d = make_tiny_llama(tmp_path / "pad", "sp", tmp_path, pad_rows=37)
    st = open_safetensors(d / "model.safetensors")
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    st.close()
    n = json.loads((d / "config.json").read_text())["vocab_size"] - 37
    tensors["lm_head.weight"][n:] *= 50.0   # make the padding rows dominate
    save_safetensors(d / "model.safetensors", tensors)
    m = LLM(str(d))
    logits = m.logits([1, 5, 9])
    assert logits.shape[1] == n + 37 and logits[-1].argmax() >= n  # padding would win
    for params in (SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                   SamplingParams(temperature=1.5, seed=0, max_tokens=10, ignore_eos=True)):
        out = m.generate([[1, 5, 9]], params)[0]
        assert max(out.token_ids) < n


def test_abandoned_stream_frees_blocks(llm):
    gen = llm.stream("hello", SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    next(gen)
    assert _free(llm) < llm.cache.num_blocks
    gen.close()
    assert _free(llm) == llm.cache.num_blocks


def test_fp16_weights(tmp_path):
    d = make_tiny_llama(tmp_path / "h", "bpe", tmp_path)
    a, b = LLM(str(d)), LLM(str(d), quant="fp16")
    assert b.model.layers[0].wqkv.dtype == np.float16
    ids = a.tokenizer.encode("hello world")
    la, lb = a.logits(ids), b.logits(ids)
    assert np.abs(la - lb).max() <= 1e-2 * np.abs(la).max()


@pytest.mark.parametrize("kwargs, match", [
    (dict(quant="int4", group_size=48), "group size"),
    (dict(quant="int5"), "unknown quant"),
    (dict(backend="tpu"), "unknown backend"),
    (dict(kv_cache_dtype="int8"), r"unknown kv_cache_dtype 'int8'; choose one of auto, float16, float32"),
    (dict(backend="triton", kv_cache_dtype="float32"), r"backend='triton' keeps its KV cache"),
])
def test_bad_options(tmp_path, kwargs, match):
    d = make_tiny_llama(tmp_path / "x", None, tmp_path)
    with pytest.raises(LingliError, match=match):
        LLM(str(d), **kwargs)


def test_triton_backend_without_cuda(tmp_path, monkeypatch):
    """No GPU and the interpreter not asked for: a clear error, not a kernel crash."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    d = make_tiny_llama(tmp_path / "x", None, tmp_path)
    with pytest.raises(LingliError, match="backend='triton': the Triton kernels need a CUDA GPU"):
        LLM(str(d), backend="triton")


def test_bad_prompts(llm):
    with pytest.raises(LingliError, match="empty"):
        llm.generate([[]])
    with pytest.raises(LingliError, match="not in the vocabulary"):
        llm.generate([[1, 10 ** 6]])
    with pytest.raises(TokenizerError, match="UTF-8"):
        llm.generate("bad \ud800 text")


def test_no_tokenizer_checkpoint_takes_ids(tmp_path):
    m = LLM(str(make_tiny_llama(tmp_path / "n", None, tmp_path)))
    assert m.tokenizer is None
    assert len(m.generate([[1, 2, 3]], SamplingParams(max_tokens=3, ignore_eos=True))[0]
               .token_ids) == 3
    with pytest.raises(LingliError, match="no tokenizer"):
        m.generate("text")


def test_missing_model_dir(tmp_path):
    with pytest.raises(LingliError):
        LLM(str(tmp_path / "does-not-exist"))


def test_cpu_path_imports_no_torch(tmp_path):
    """Loading, quantizing and generating on the CPU backend never imports torch,
    triton or kernels/ (DESIGN.md: the phone path has no PyTorch)."""
    import subprocess
    import sys

    d = make_tiny_llama(tmp_path / "m", "sp", tmp_path)
    code = ("import sys; from runtime import LLM, SamplingParams\n"
            f"llm = LLM({str(d)!r}, quant='int4', progress=False)\n"
            "llm.generate(['hello', 'world'], SamplingParams(max_tokens=4))\n"
            "print(sorted(m for m in ('torch', 'triton', 'kernels') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
