"""The triton backend end to end, in Triton's interpreter on the CPU: a tiny random
LLaMA gives the same greedy tokens (and nearly the same logits) as the CPU backend,
through the same model code, paged KV cache and engine.

The interpreter backend computes in float32; the CPU backend quantizes activations
to int8 blocks for the quantized formats, so logits agree to the activation
quantization error there and to float rounding for fp32 weights.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from runtime import LLM, SamplingParams  # noqa: E402
from tiny_model import make_tiny_llama  # noqa: E402

PROMPTS = ["hello world", "the quick brown fox", "你好"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-triton")
    return make_tiny_llama(root / "m", "sp", root, weight_std=0.1)


def _pair(path, quant):
    cpu = LLM(str(path), quant=quant, progress=False, max_model_len=64,
              kv_cache_dtype="float32")   # as the interpreter's float32 cache
    gpu = LLM(str(path), quant=quant, backend="triton", progress=False, max_model_len=64)
    return cpu, gpu


@pytest.mark.parametrize("quant, rtol", [(None, 1e-4), ("int8", 2e-2), ("int4", 5e-2), ("int3", 5e-2)])
def test_triton_backend_matches_cpu(tiny, quant, rtol):
    cpu, gpu = _pair(tiny, quant)
    assert gpu.backend.name == "triton" and gpu.backend.device.type == "cpu"
    # Greedy generation of a batch of prompts (prefill, then batched decode with
    # paged attention over several sequences) on both backends.
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = [o.token_ids for o in cpu.generate(PROMPTS, p)]
    got = [o.token_ids for o in gpu.generate(PROMPTS, p)]
    assert gpu.cache.allocator.num_free == gpu.cache.num_blocks
    if quant is None:
        assert got == want          # float weights: the same arithmetic up to rounding
        return
    # Quantized: the CPU backend also quantizes activations (int8 blocks), so
    # a step whose top two logits are closer than the backends' difference may
    # flip. Teacher-forced on the CPU's tokens, every step with a clear margin
    # must pick the same token, and most steps must have one.
    checked = 0
    for prompt, toks in zip(PROMPTS, want):
        ids = cpu.tokenizer.encode(prompt) + toks
        a, b = cpu.logits(ids), gpu.logits(ids)
        assert np.abs(a - b).max() <= rtol * np.abs(a).max(), (quant, np.abs(a - b).max())
        err = np.abs(a - b).max(axis=1)
        for row in range(len(ids) - len(toks) - 1, len(ids)):
            top2 = np.sort(a[row])[-2:]
            if top2[1] - top2[0] > 2 * err[row]:
                assert b[row].argmax() == a[row].argmax(), (quant, prompt, row)
                checked += 1
    assert checked >= len(PROMPTS) * 4, f"only {checked} steps had a clear margin"


def test_triton_backend_weights_live_on_the_device(tiny):
    from kernels.quant_gemm import PackedWeight

    gpu = LLM(str(tiny), quant="int4", backend="triton", progress=False, max_model_len=64)
    layer = gpu.model.layers[0]
    assert isinstance(layer.w_down, PackedWeight)
    assert isinstance(gpu.cache.k[0], torch.Tensor) and gpu.cache.k[0].dtype == torch.float32
    gpu.cache.commit()                  # what `lingli serve` does: a no-op on device tensors
    assert not gpu.cache.k[0].any()
    assert gpu.model.weight_bytes_per_token() > 0
