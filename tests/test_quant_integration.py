"""Quantized models end to end: quantize at load vs a written Lingli checkpoint, CLI, errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from runtime import LLM, SamplingParams
from runtime.cli import main
from runtime.errors import LingliError
from runtime.quant.api import quantize_checkpoint
from runtime.model import RowStack
from runtime.quant.formats import QuantizedTensor
from tiny_model import make_tiny_llama


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("qint")
    # K = 64 hidden is below the largest group size; use a wider model so groups matter.
    return make_tiny_llama(root / "f", "sp", root, pad_rows=5)


@pytest.mark.parametrize("quant, group_size, method", [
    ("int8", 32, "rtn"), ("int4", 64, "search"), ("int3", 32, "search"), ("int4", 128, "rtn"),
])
def test_checkpoint_logits_bit_identical_to_quantize_at_load(float_dir, tmp_path, quant,
                                                             group_size, method):
    at_load = LLM(str(float_dir), quant=quant, group_size=group_size, quant_method=method,
                  progress=False)
    out = quantize_checkpoint(float_dir, tmp_path / "q", bits=int(quant[3:]),
                              group_size=group_size, method=method, progress=False)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (cfg["bits"], cfg["group_size"], cfg["method"]) == (int(quant[3:]), group_size, method)
    stored = LLM(str(out))
    assert stored.quant == quant
    # int3 keeps k_proj at int4 (default_mix): its fused q/k/v is a RowStack of three.
    qkv = stored.model.layers[0].wqkv
    parts = qkv.parts if isinstance(qkv, RowStack) else [qkv]
    assert all(isinstance(p, QuantizedTensor) for p in parts)
    assert [p.bits for p in parts] == ([3, 4, 3] if quant == "int3" else [int(quant[3:])])
    assert isinstance(stored.model.embed, QuantizedTensor)
    ids = at_load.tokenizer.encode("the quick brown fox 你好")
    a, b = at_load.logits(ids), stored.logits(ids)
    assert np.array_equal(a, b)
    p = SamplingParams(temperature=0.9, seed=3, max_tokens=12, ignore_eos=True)
    assert at_load.generate("hello", p)[0].token_ids == stored.generate("hello", p)[0].token_ids


# Random Gaussian weights are the worst case for low bits (no structure to exploit);
# SmolLM2 perplexity (tests/test_quant_quality.py) is the real quality check.
@pytest.mark.parametrize("quant, rel", [("int8", 0.03), ("int4", 0.3), ("int3", 0.5)])
def test_quantized_logits_close_to_float(tmp_path, quant, rel):
    d = make_tiny_llama(tmp_path / "calm", "sp", tmp_path, weight_std=0.05)
    f = LLM(str(d))
    q = LLM(str(d), quant=quant, progress=False)
    ids = f.tokenizer.encode("river mountain learning inference")
    a, b = f.logits(ids), q.logits(ids)
    assert np.abs(a - b).max() <= rel * np.abs(a).max()
    assert q.model.weight_bytes_per_token() < f.model.weight_bytes_per_token()


def test_quantized_checkpoint_refuses_other_quant(float_dir, tmp_path):
    out = quantize_checkpoint(float_dir, tmp_path / "q4", bits=4, group_size=32, progress=False)
    with pytest.raises(LingliError, match="int4 checkpoint"):
        LLM(str(out), quant="int8")
    assert LLM(str(out), quant="int4").quant == "int4"


def test_quantize_refuses_quantized_source_and_bad_args(float_dir, tmp_path):
    out = quantize_checkpoint(float_dir, tmp_path / "q", bits=8, group_size=32, progress=False)
    with pytest.raises(LingliError, match="already quantized"):
        quantize_checkpoint(out, tmp_path / "again", bits=4)
    with pytest.raises(LingliError, match="group size"):
        quantize_checkpoint(float_dir, tmp_path / "g", bits=4, group_size=48)
    with pytest.raises(LingliError, match="bit width"):
        quantize_checkpoint(float_dir, tmp_path / "b", bits=5)
    with pytest.raises(LingliError, match="quant_method"):
        LLM(str(float_dir), quant="int4", quant_method="magic")


def test_quantize_cli(float_dir, tmp_path, capsys):
    rc = main(["quantize", str(float_dir), str(tmp_path / "cli"), "--bits", "3",
               "--group-size", "32", "--method", "rtn"])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    rc = main(["generate", "-m", str(tmp_path / "cli"), "hello", "--max-tokens", "3",
               "--temperature", "0", "--ignore-eos"])
    err = capsys.readouterr().err
    assert rc == 0 and "int3" in err
    # Writing over a non-empty directory is refused without --overwrite.
    rc = main(["quantize", str(float_dir), str(tmp_path / "cli"), "--bits", "4"])
    assert rc == 2 and "lingli: error:" in capsys.readouterr().err


def test_mixed_format_products_match_one_product_per_part(float_dir, monkeypatch):
    """The int3 mix's q/k/v (int3, int4, int3) runs as one qlinear_parts call: the same
    outputs, and the same logits, as one product per part placed side by side."""
    llm = LLM(str(float_dir), quant="int3", group_size=32, quant_method="search", progress=False)
    be = llm.model.backend if hasattr(llm.model, "backend") else llm.backend
    stacks = [lw.wqkv for lw in llm.model.layers if isinstance(lw.wqkv, RowStack)]
    assert stacks and [p.bits for p in stacks[0].parts] == [3, 4, 3]
    rng = np.random.default_rng(0)
    for m in (1, 4):
        x = rng.standard_normal((m, stacks[0].parts[0].shape[1])).astype(np.float32)
        want = np.concatenate([be.linear(x, p) for p in stacks[0].parts], axis=1)
        assert np.array_equal(be.linear_stack(x, stacks[0].parts), want)
    ids = llm.tokenizer.encode("the quick brown fox 你好")
    llm.model.run_layers = llm.model.layer_loop         # the Python loop calls linear_stack
    fused = llm.logits(ids)
    monkeypatch.setattr(type(be), "linear_stack", lambda self, x, parts, prefetch=None: np.concatenate(
        [self.linear(x, p, prefetch=prefetch if i == 0 else None) for i, p in enumerate(parts)], axis=1))
    assert np.array_equal(llm.logits(ids), fused)
