"""Lingli's fp32 CPU forward against transformers' LlamaForCausalLM, logits and greedy tokens."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_checkpoints import CONFIGS, make_checkpoint  # noqa: E402

from runtime import LLM, SamplingParams  # noqa: E402

PROMPT_LEN = 32


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_checkpoint(request.param, path)
    return hf, LLM(str(path)), request.param


def _prompt(vocab: int, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, PROMPT_LEN).tolist()


def test_logits_match(pair):
    hf, llm, name = pair
    ids = _prompt(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    ours = llm.logits(ids)
    assert ours.shape == ref.shape == (PROMPT_LEN, hf.config.vocab_size)
    err = np.abs(ours - ref).max()
    assert err <= 1e-4 * np.abs(ref).max(), f"{name}: max |diff| {err} vs max |logit| " \
                                            f"{np.abs(ref).max()}"


def test_greedy_continuation_matches(pair):
    hf, llm, name = pair
    ids = _prompt(hf.config.vocab_size, seed=2)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=32))[0]
    assert out.token_ids == ref, name
    assert out.finish_reason == "length"


def test_single_thread_same_logits(pair):
    """Thread count changes the split of rows, never the numbers beyond rounding."""
    hf, llm, name = pair
    ids = _prompt(hf.config.vocab_size, seed=3)[:8]
    a = llm.logits(ids)
    llm.backend._C.set_num_threads(1)
    try:
        b = llm.logits(ids)
    finally:
        llm.backend._C.set_num_threads(llm.backend.num_threads)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(a).max())
