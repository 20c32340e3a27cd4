"""A real pretrained model: SmolLM2-135M-Instruct, GGUF from PyPI -> converted -> Lingli vs transformers."""
from __future__ import annotations

import numpy as np
import pytest

from runtime import LLM, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n   ",
    "Once upon a time, in a small village,",
]


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    # float32 KV: the comparisons with transformers below are the exact fp32 path's
    # (test_parity_transformers bounds the float16 cache's error).
    return LLM(str(smollm2_dir), kv_cache_dtype="float32")


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(
        smollm2_dir, dtype=torch.float32, attn_implementation="eager").eval()
    return model


def test_capital_of_france(llm):
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=4))[0]
    assert out.text.startswith(" Paris"), repr(out.text)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_transformers(llm, hf_model, prompt):
    import torch

    ids = llm.tokenizer.encode(prompt)
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    ours = llm.generate([ids], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    assert ours.token_ids == ref


def test_logits_match_transformers(llm, hf_model):
    import torch

    ids = llm.tokenizer.encode(PROMPTS[2])
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].numpy()
    ours = llm.logits(ids)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_chat_template_reply_streams(llm):
    from runtime.chat import ChatSession

    session = ChatSession(llm, SamplingParams(temperature=0, max_tokens=24))
    pieces = list(session.send("What is the capital of France?"))
    reply = "".join(pieces)
    assert "Paris" in reply, reply
    assert "<|im_end|>" not in reply and "\ufffd" not in reply
    assert session.turns[-1] == {"role": "assistant", "content": reply.strip()}


def test_fp16_weights_close_to_fp32(llm, smollm2_dir):
    ids = llm.tokenizer.encode(PROMPTS[0])
    half = LLM(str(smollm2_dir), quant="fp16")
    a, b = llm.logits(ids), half.logits(ids)
    assert np.abs(a - b).max() <= 2e-2 * np.abs(a).max()
    assert half.generate([ids], SamplingParams(temperature=0, max_tokens=4))[0].text \
        .startswith(" Paris")
