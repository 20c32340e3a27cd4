"""The Lingli quantized checkpoint: save -> load is bit-identical; bad files fail clearly."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from runtime.config import ModelConfig
from runtime.errors import CheckpointError
from runtime.loader import load_weights
from runtime.quant.checkpoint import (is_quantized_checkpoint, load_quantized, part_shapes,
                                      save_quantized)
from runtime.quant.formats import QuantizedTensor
from runtime.quant.quantize_model import quantize_weights
from runtime.safetensors_io import open_safetensors, save_safetensors
from tiny_model import make_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("qckpt")
    path = make_tiny_llama(root / "m", None, root, max_positions=64)
    (path / "tokenizer_config.json").write_text("{}")
    cfg = ModelConfig.from_dir(path)
    return path, cfg, load_weights(path, cfg, "fp32")


def _save(tmp_path, tiny, bits, group_size=32, name="q", encoding=None):
    src, cfg, weights = tiny
    q = quantize_weights(weights, cfg, bits, group_size, "search", progress=False,
                         encoding=encoding)
    out = save_quantized(tmp_path / name, src, q, cfg,
                         {"bits": bits, "group_size": group_size, "method": "search"})
    return out, q


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_round_trip_bit_identical(tmp_path, tiny, bits):
    src, cfg, _ = tiny
    out, q = _save(tmp_path, tiny, bits)
    cfg2 = ModelConfig.from_dir(out)
    assert is_quantized_checkpoint(cfg2) and not is_quantized_checkpoint(cfg)
    qc = cfg2.quantization_config
    assert qc["quant_method"] == "lingli" and qc["format_version"] == 2
    assert (qc["bits"], qc["group_size"], qc["method"]) == (bits, 32, "search")
    assert qc["quantized_embeddings"] is True
    assert set(qc["modules"]) == {n for n, s in cfg.weight_shapes().items() if len(s) == 2}
    assert (out / "tokenizer_config.json").is_file()
    src_cfg = json.loads((src / "config.json").read_text())
    out_cfg = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in out_cfg.items() if k != "quantization_config"} == src_cfg

    loaded = load_quantized(out, cfg2)
    assert list(loaded) == list(q)
    for name, t in q.items():
        got = loaded[name]
        if isinstance(t, QuantizedTensor):
            assert isinstance(got, QuantizedTensor)
            assert (got.bits, got.group_size, got.shape) == (t.bits, t.group_size, t.shape)
            for part, arr in t.arrays().items():
                g = got.arrays()[part]
                assert g.dtype == arr.dtype and g.tobytes() == arr.tobytes(), (name, part)
                assert not g.flags.writeable           # a view of the memory map
        else:
            assert got.dtype == t.dtype and got.tobytes() == t.tobytes()
    st = open_safetensors(out / "model.safetensors")
    shapes = json.loads(st.metadata["lingli.shapes"])
    assert shapes["model.layers.0.mlp.down_proj.weight"] == [64, 96]


def test_refuses_to_overwrite(tmp_path, tiny):
    out, _ = _save(tmp_path, tiny, 4)
    with pytest.raises(CheckpointError, match="not empty"):
        _save(tmp_path, tiny, 4)
    src, cfg, weights = tiny
    q = quantize_weights(weights, cfg, 8, 64, "rtn", progress=False)
    save_quantized(out, src, q, cfg, {"bits": 8, "group_size": 64, "method": "rtn"},
                   overwrite=True)
    assert ModelConfig.from_dir(out).quantization_config["bits"] == 8
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp leftovers


def _rewrite(out, change_tensors=None, change_qc=None):
    """Edit a saved checkpoint in place: tensors dict -> dict, quantization_config -> dict."""
    if change_tensors:
        st = open_safetensors(out / "model.safetensors")
        tensors = {n: np.array(st.get(n)) for n in st.keys()}
        meta = dict(st.metadata or {})
        st.close()
        change_tensors(tensors)
        save_safetensors(out / "model.safetensors", tensors, metadata=meta)
    if change_qc:
        d = json.loads((out / "config.json").read_text())
        change_qc(d["quantization_config"])
        (out / "config.json").write_text(json.dumps(d))
    return ModelConfig.from_dir(out)


Q0 = "model.layers.0.self_attn.q_proj.weight"


def test_wrong_group_size_in_config(tmp_path, tiny):
    out, _ = _save(tmp_path, tiny, 4, group_size=32)
    cfg = _rewrite(out, change_qc=lambda qc: qc.update(group_size=64))
    with pytest.raises(CheckpointError, match=r"scales' is U8 \[\d+, 2\], expected U8 \[\d+, 1\]") as e:
        load_quantized(out, cfg)
    assert "group size 64" in str(e.value)


def test_truncated_packed_tensor(tmp_path, tiny):
    out, _ = _save(tmp_path, tiny, 3)

    def cut(t):
        t[Q0 + ".q"] = t[Q0 + ".q"][:, :-4]
    cfg = _rewrite(out, change_tensors=cut)
    with pytest.raises(CheckpointError, match=rf"{Q0}\.q.*U8 \[64, 12\], expected U8 \[64, 16\]"):
        load_quantized(out, cfg)


def test_wrong_dtype_of_part(tmp_path, tiny):
    out, _ = _save(tmp_path, tiny, 4)

    def f32(t):
        t[Q0 + ".scales"] = t[Q0 + ".scales"].astype(np.float32)
    cfg = _rewrite(out, change_tensors=f32)
    with pytest.raises(CheckpointError, match=rf"{Q0}\.scales.*F32.*expected U8"):
        load_quantized(out, cfg)


def test_missing_row_scale(tmp_path, tiny):
    out, q = _save(tmp_path, tiny, 3, encoding="codes")
    assert q[Q0].coded
    cfg = _rewrite(out, change_tensors=lambda t: t.pop(Q0 + ".row_scale"))
    with pytest.raises(CheckpointError, match=rf"missing tensor '{Q0}\.row_scale'.*int3"):
        load_quantized(out, cfg)


def test_version_1_checkpoints_still_load(tmp_path, tiny):
    """Version 1 knew only f16 group parameters; they are still a valid encoding."""
    src, cfg0, weights = tiny
    q = quantize_weights(weights, cfg0, 4, 32, "search", progress=False, encoding="f16")
    out = save_quantized(tmp_path / "v1", src, q, cfg0,
                         {"bits": 4, "group_size": 32, "method": "search"})
    cfg = _rewrite(out, change_qc=lambda qc: qc.update(format_version=1))
    got = load_quantized(out, cfg)
    assert not got[Q0].coded and got[Q0].scales.dtype == np.float16
    np.testing.assert_array_equal(got[Q0].dequantize(), q[Q0].dequantize())


def test_unsupported_bits(tmp_path, tiny):
    out, _ = _save(tmp_path, tiny, 4)
    cfg = _rewrite(out, change_qc=lambda qc: qc.update(bits=5))
    with pytest.raises(CheckpointError, match="unsupported bit width 5"):
        load_quantized(out, cfg)


def test_unsupported_group_size_and_version(tmp_path, tiny):
    out, _ = _save(tmp_path, tiny, 4)
    cfg = _rewrite(out, change_qc=lambda qc: qc.update(group_size=48))
    with pytest.raises(CheckpointError, match="unsupported group size 48"):
        load_quantized(out, cfg)
    cfg = _rewrite(out, change_qc=lambda qc: qc.update(group_size=32, format_version=3))
    with pytest.raises(CheckpointError, match="format_version 3"):
        load_quantized(out, cfg)


def test_missing_scales(tmp_path, tiny):
    out, _ = _save(tmp_path, tiny, 8)
    cfg = _rewrite(out, change_tensors=lambda t: t.pop(Q0 + ".scales"))
    with pytest.raises(CheckpointError, match=rf"missing tensor '{Q0}\.scales'"):
        load_quantized(out, cfg)


def test_missing_float_tensor(tmp_path, tiny):
    out, _ = _save(tmp_path, tiny, 8)
    cfg = _rewrite(out, change_tensors=lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match="missing tensor 'model.norm.weight'"):
        load_quantized(out, cfg)


def test_int3_qh_missing_and_stray_parts(tmp_path, tiny):
    out, _ = _save(tmp_path, tiny, 3)
    cfg = _rewrite(out, change_tensors=lambda t: t.pop(Q0 + ".qh"))
    with pytest.raises(CheckpointError, match=rf"missing tensor '{Q0}\.qh'"):
        load_quantized(out, cfg)
    out4, _ = _save(tmp_path, tiny, 4, name="q4")
    cfg = _rewrite(out4, change_tensors=lambda t: t.update({Q0 + ".qh": np.zeros((64, 4), np.uint8)}))
    with pytest.raises(CheckpointError, match=r"\.qh' does not belong to an int4"):
        load_quantized(out4, cfg)


def test_quant_method_not_lingli(tmp_path, tiny):
    out, _ = _save(tmp_path, tiny, 4)
    cfg = _rewrite(out, change_qc=lambda qc: qc.update(quant_method="gptq"))
    assert not is_quantized_checkpoint(cfg)
    with pytest.raises(CheckpointError, match="quant_method is 'gptq'"):
        load_quantized(out, cfg)


def test_config_mismatch_shape(tmp_path, tiny):
    out, _ = _save(tmp_path, tiny, 4)
    d = json.loads((out / "config.json").read_text())
    d["intermediate_size"] = 128
    (out / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"gate_proj\.weight' has logical shape \[96, 64\] "
                                              r"in the metadata, expected \[128, 64\]"):
        load_quantized(out, ModelConfig.from_dir(out))
    # without the metadata the packed arrays themselves disagree
    st = open_safetensors(out / "model.safetensors")
    tensors = {n: np.array(st.get(n)) for n in st.keys()}
    st.close()
    save_safetensors(out / "model.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"gate_proj\.weight\.q' is U8 \[96, 32\], "
                                              r"expected U8 \[128, 32\]"):
        load_quantized(out, ModelConfig.from_dir(out))


def test_part_shapes_table():
    assert part_shapes(3, 64, 10, 100, coded=True) == {
        "q": ("U8", (10, 32)), "scales": ("U8", (10, 2)), "mins": ("I8", (10, 2)),
        "row_scale": ("F32", (10,)), "qh": ("U8", (10, 16))}
    assert part_shapes(3, 64, 10, 100) == {"q": ("U8", (10, 32)), "scales": ("F16", (10, 2)),
                                           "mins": ("F16", (10, 2)), "qh": ("U8", (10, 16))}
    assert part_shapes(8, 128, 4, 576) == {"q": ("I8", (4, 640)), "scales": ("F16", (4, 5))}


def test_unquantized_modules_stay_float(tmp_path, tiny):
    src, cfg, weights = tiny
    q = quantize_weights(weights, cfg, 4, 64, "rtn", progress=False)
    q["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"]   # keep it float
    out = save_quantized(tmp_path / "mixed", src, q, cfg,
                         {"bits": 4, "group_size": 64, "method": "rtn"})
    cfg2 = ModelConfig.from_dir(out)
    assert cfg2.quantization_config["quantized_embeddings"] is False
    loaded = load_quantized(out, cfg2)
    assert isinstance(loaded["model.embed_tokens.weight"], np.ndarray)
    assert isinstance(loaded["lm_head.weight"], QuantizedTensor)
    shutil.rmtree(out)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_model_end_to_end(tmp_path, tiny, method):
    from runtime.quant.quantize_model import quantize_model

    src, cfg, weights = tiny
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, 256)
    out = quantize_model(src, tmp_path / method, 4, 32, method, calibration_texts=ids,
                         n_tokens=256, window=64, progress=False)
    cfg2 = ModelConfig.from_dir(out)
    qc = cfg2.quantization_config
    assert (qc["bits"], qc["group_size"], qc["method"]) == (4, 32, method)
    loaded = load_quantized(out, cfg2)
    w = weights["model.layers.1.mlp.down_proj.weight"]
    got = loaded["model.layers.1.mlp.down_proj.weight"].dequantize()
    assert np.linalg.norm(got - w) / np.linalg.norm(w) < 0.15
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(out, tmp_path / "again", 4, 32, "rtn", progress=False)


def test_per_tensor_formats_round_trip(tmp_path):
    """An int4 checkpoint with an int8 embedding records and validates the exception."""
    import json

    from tiny_model import make_tiny_llama
    from runtime.config import ModelConfig as MC
    from runtime.errors import CheckpointError as CE
    from runtime.loader import load_weights
    from runtime.quant.checkpoint import load_quantized, save_quantized
    from runtime.quant.quantize_model import quantize_weights

    src = make_tiny_llama(tmp_path / "src", None, tmp_path)
    cfg = MC.from_dir(src)
    q = quantize_weights(load_weights(src, cfg), cfg, 4, 32, "rtn", progress=False)
    out = save_quantized(tmp_path / "q", src, q, cfg, {"bits": 4, "group_size": 32,
                                                        "method": "rtn"})
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["tensor_formats"]["model.embed_tokens.weight"] == [8, 32]
    back = load_quantized(out, MC.from_dir(out))
    emb = back["model.embed_tokens.weight"]
    assert (emb.bits, emb.group_size) == (8, 32)
    assert np.array_equal(emb.q, q["model.embed_tokens.weight"].q)
    # A format entry that lies about the stored tensor is caught.
    cfg_json = json.loads((out / "config.json").read_text())
    cfg_json["quantization_config"]["tensor_formats"]["model.embed_tokens.weight"] = [4, 32]
    (out / "config.json").write_text(json.dumps(cfg_json))
    with pytest.raises(CE, match="embed_tokens.weight.q"):
        load_quantized(out, MC.from_dir(out))
