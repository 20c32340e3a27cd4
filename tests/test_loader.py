"""safetensors reader/writer and checkpoint loading: round trips, cross-checks
with the reference `safetensors` package, and a clear error for each kind of
bad input."""
from __future__ import annotations

import json
import os
import pickle
import struct
import warnings

import numpy as np
import pytest

from runtime.config import ModelConfig
from runtime.errors import CheckpointError
from runtime.loader import CheckpointWarning, checkpoint_files, load_weights
from runtime.safetensors_io import (MAX_HEADER_BYTES, open_safetensors,
                                    save_safetensors)

CFG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 40,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


# ----------------------------------------------------------------- helpers
def make_config(**extra) -> ModelConfig:
    return ModelConfig.from_dict(dict(CFG, **extra))


def random_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in cfg.weight_shapes().items()}


def write_model(d, cfg: ModelConfig, weights, filename="model.safetensors", **kw):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg.to_hf_dict()), encoding="utf-8")
    save_safetensors(d / filename, weights, **kw)
    return d


def write_sharded(d, cfg: ModelConfig, weights, **kw):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg.to_hf_dict()), encoding="utf-8")
    names = list(weights)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half],
              "model-00002-of-00002.safetensors": names[half:]}
    wm = {}
    for fname, ns in shards.items():
        save_safetensors(d / fname, {n: weights[n] for n in ns}, **kw)
        wm.update({n: fname for n in ns})
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": wm}), encoding="utf-8")
    return d


def bf16_ref_bits(x: np.ndarray) -> np.ndarray:
    """Independent round-to-nearest-even float32 -> bf16 (no NaNs here), via float64."""
    x = np.asarray(x, np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    hi, lo = u >> 16, u & 0xFFFF
    up = (lo > 0x8000) | ((lo == 0x8000) & ((hi & 1) == 1))
    return (hi + up).astype(np.uint16)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def write_raw(path, header, data: bytes = b"", header_len: int | None = None):
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(hb) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + hb + data)
    return path


def assert_error(path, *needles, exc=CheckpointError):
    with pytest.raises(exc) as e:
        open_safetensors(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


# ----------------------------------------------------------------- safetensors_io
ALL_DTYPES = [np.float32, np.float16, np.float64, np.int8, np.uint8, np.int16, np.int32,
              np.int64, np.uint16, np.uint32, np.uint64, np.bool_]


def sample_tensors():
    rng = np.random.default_rng(1)
    t = {}
    for dt in ALL_DTYPES:
        name = f"t_{np.dtype(dt).name}"
        if np.dtype(dt).kind == "f":
            t[name] = rng.standard_normal((3, 5)).astype(dt)
        elif np.dtype(dt).kind == "b":
            t[name] = rng.random((7,)) > 0.5
        else:
            info = np.iinfo(dt)
            t[name] = rng.integers(max(info.min, -1000), min(info.max, 1000), (2, 3, 2),
                                   dtype=dt)
    t["scalar"] = np.array(3.5, dtype=np.float32)
    t["empty"] = np.zeros((0, 4), dtype=np.float16)
    t["strided"] = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]  # non-contiguous
    return t


def test_roundtrip_all_dtypes(tmp_path):
    t = sample_tensors()
    p = tmp_path / "x.safetensors"
    save_safetensors(p, t, metadata={"format": "np", "note": "伶荔"})
    f = open_safetensors(p)
    assert sorted(f.keys()) == sorted(t)
    assert f.metadata == {"format": "np", "note": "伶荔"}
    for n, a in t.items():
        got = f.get(n)
        assert got.dtype == a.dtype and got.shape == a.shape, n
        np.testing.assert_array_equal(got, a)
        assert not got.flags.writeable, n
        assert len(f.meta(n)[1]) == a.ndim
    assert f.meta("t_float32") == ("F32", (3, 5))
    assert f.meta("t_bool") == ("BOOL", (7,))
    # zero copy: the array is a view on the mapping
    v = f.get("t_float32")
    assert not v.flags.owndata and v.base is not None
    # header is 8-byte aligned and padded with spaces
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    json.loads(raw[8:8 + n].decode())
    assert raw[8:8 + n].rstrip(b" ").endswith(b"}")


def test_missing_tensor_name(tmp_path):
    p = tmp_path / "x.safetensors"
    save_safetensors(p, {"a": np.zeros(2, np.float32)})
    with pytest.raises(CheckpointError, match="'b'"):
        open_safetensors(p).get("b")
    with pytest.raises(CheckpointError, match="not found"):
        open_safetensors(tmp_path / "nope.safetensors")


def test_cross_check_reference_library(tmp_path):
    sn = pytest.importorskip("safetensors.numpy")
    from safetensors import safe_open
    t = sample_tensors()
    t_ref = {k: np.ascontiguousarray(v) for k, v in t.items()}
    # ours -> reference
    ours = tmp_path / "ours.safetensors"
    save_safetensors(ours, t, metadata={"k": "v"})
    loaded = sn.load_file(str(ours))
    assert sorted(loaded) == sorted(t)
    for n in t:
        np.testing.assert_array_equal(loaded[n], t[n])
        assert loaded[n].dtype == t[n].dtype
    with safe_open(str(ours), framework="np") as f:
        assert f.metadata() == {"k": "v"}
    # reference -> ours
    ref = tmp_path / "ref.safetensors"
    sn.save_file(t_ref, str(ref), metadata={"format": "np"})
    f = open_safetensors(ref)
    assert f.metadata == {"format": "np"}
    for n in t:
        np.testing.assert_array_equal(f.get(n), t[n])
        assert f.get(n).dtype == t[n].dtype


def test_bf16_round_to_nearest_even(tmp_path):
    one = 1.0
    vals = np.array([
        one,
        one + 2.0 ** -8,          # exactly halfway, even below -> 1.0
        one + 3 * 2.0 ** -8,      # halfway, odd below -> rounds up
        one + 2.0 ** -8 + 2.0 ** -20,  # just above halfway -> up
        -2.5, 0.0, -0.0, 3.0e38, 1e-40, np.inf, -np.inf,
    ], dtype=np.float32)
    rng = np.random.default_rng(2)
    x = np.concatenate([vals, rng.standard_normal(500).astype(np.float32) * 100])
    p = tmp_path / "b.safetensors"
    save_safetensors(p, {"x": x.reshape(-1, 1), "keep": x[:4]}, bf16={"x"})
    f = open_safetensors(p)
    assert f.meta("x") == ("BF16", (x.size, 1))
    assert f.meta("keep")[0] == "F32"
    bits = f.get_raw("x")
    assert bits.dtype == np.uint16
    np.testing.assert_array_equal(bits.ravel(), bf16_ref_bits(x))
    assert bits[1, 0] == 0x3F80 and bits[2, 0] == 0x3F82 and bits[3, 0] == 0x3F81
    got = f.get("x")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.ravel().view(np.uint32),
                                  bf16_bits_to_f32(bf16_ref_bits(x)).view(np.uint32))
    # NaN survives as NaN
    save_safetensors(p, {"n": np.array([np.nan, 1.0], np.float32)}, bf16=True)
    assert np.isnan(open_safetensors(p).get("n")[0])


def test_bf16_cross_check_torch(tmp_path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    x = (np.random.default_rng(3).standard_normal((8, 9)) * 10).astype(np.float32)
    ours = tmp_path / "ours.safetensors"
    save_safetensors(ours, {"w": x}, bf16=True)
    tt = st_torch.load_file(str(ours))["w"]
    assert tt.dtype == torch.bfloat16
    ref = torch.from_numpy(x).to(torch.bfloat16)
    assert torch.equal(tt, ref)  # same RNE rounding as torch
    theirs = tmp_path / "theirs.safetensors"
    st_torch.save_file({"w": ref}, str(theirs))
    np.testing.assert_array_equal(open_safetensors(theirs).get("w"), ref.float().numpy())


def test_writer_is_atomic(tmp_path, monkeypatch):
    p = tmp_path / "x.safetensors"
    save_safetensors(p, {"a": np.arange(4, dtype=np.float32)})
    before = p.read_bytes()

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors(p, {"a": np.zeros(100, dtype=np.float32)})
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["x.safetensors"]


def test_writer_rejects_bad_input(tmp_path):
    p = tmp_path / "x.safetensors"
    with pytest.raises(TypeError, match="complex"):
        save_safetensors(p, {"c": np.zeros(2, np.complex64)})
    with pytest.raises(TypeError, match="bf16"):
        save_safetensors(p, {"i": np.zeros(2, np.int32)}, bf16={"i"})
    with pytest.raises(TypeError, match="metadata"):
        save_safetensors(p, {"a": np.zeros(2, np.float32)}, metadata={"n": 1})
    assert not p.exists()


# -- bad files
def test_file_too_short(tmp_path):
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x10\x00\x00")
    assert_error(p, "3 bytes", "too short")
    p.write_bytes(b"")
    assert_error(p, "0 bytes")


def test_header_length_exceeds_file(tmp_path):
    p = write_raw(tmp_path / "h.safetensors", b'{"a":1}', header_len=4096)
    assert_error(p, "header length 4096", "exceeds the file size")


def test_header_length_absurd(tmp_path):
    p = write_raw(tmp_path / "h.safetensors", b"{}", header_len=MAX_HEADER_BYTES + 1)
    assert_error(p, "absurd")


def test_header_not_json(tmp_path):
    assert_error(write_raw(tmp_path / "a.safetensors", b"this is not json"), "not valid JSON")
    assert_error(write_raw(tmp_path / "b.safetensors", b"\xff\xfe{}"), "UTF-8")
    assert_error(write_raw(tmp_path / "c.safetensors", b"[1,2,3]"), "JSON object")
    # a pickle file is not mistaken for anything
    p = tmp_path / "d.safetensors"
    p.write_bytes(pickle.dumps({"a": 1}) + b"\x00" * 16)
    with pytest.raises(CheckpointError):
        open_safetensors(p)


def test_truncated_file(tmp_path):
    p = tmp_path / "t.safetensors"
    save_safetensors(p, {"a.weight": np.zeros((4, 4), np.float32),
                         "b.weight": np.ones((8, 4), np.float32)})
    full = p.read_bytes()
    p.write_bytes(full[:-10])
    msg = assert_error(p, "truncated", "expected", "actual")
    assert "'a.weight'" in msg or "'b.weight'" in msg
    assert str(len(full)) in msg and str(len(full) - 10) in msg


def entry(dtype, shape, b, e):
    return {"dtype": dtype, "shape": shape, "data_offsets": [b, e]}


def test_offsets_end_beyond_data(tmp_path):
    p = write_raw(tmp_path / "x.safetensors", {"w": entry("F32", [4], 16, 32)}, b"\0" * 24)
    assert_error(p, "'w'", "truncated", "24")


def test_offsets_wrong_size_for_shape(tmp_path):
    p = write_raw(tmp_path / "x.safetensors", {"w": entry("F32", [2, 3], 0, 16)}, b"\0" * 24)
    assert_error(p, "'w'", "16 bytes", "needs 24 bytes", "[2, 3]")


def test_offsets_overlap(tmp_path):
    h = {"a": entry("F32", [4], 0, 16), "b": entry("F32", [4], 8, 24)}
    p = write_raw(tmp_path / "x.safetensors", h, b"\0" * 24)
    assert_error(p, "'a'", "'b'", "overlap")


def test_offsets_begin_after_end(tmp_path):
    p = write_raw(tmp_path / "x.safetensors", {"w": entry("F32", [0], 16, 8)}, b"\0" * 24)
    assert_error(p, "'w'", "begin 16 > end 8")


@pytest.mark.parametrize("info,needle", [
    (entry("Q4", [4], 0, 4), "unsupported dtype 'Q4'"),
    (entry("F32", [-1], 0, 4), "shape"),
    (entry("F32", "4", 0, 4), "shape"),
    (entry("F32", [1], -4, 0), "data_offsets"),
    ({"dtype": "F32", "shape": [1]}, "data_offsets"),
    ({"shape": [1], "data_offsets": [0, 4]}, "dtype"),
    ([1, 2], "entry"),
])
def test_bad_entries(tmp_path, info, needle):
    p = write_raw(tmp_path / "x.safetensors", {"w": info}, b"\0" * 8)
    assert_error(p, "'w'", needle)


def test_duplicate_names_and_bad_metadata(tmp_path):
    hb = b'{"w":' + json.dumps(entry("U8", [1], 0, 1)).encode() + b',"w":' + \
        json.dumps(entry("U8", [1], 1, 2)).encode() + b"}"
    assert_error(write_raw(tmp_path / "a.safetensors", hb, b"\0\0"), "'w'", "more than once")
    assert_error(write_raw(tmp_path / "b.safetensors", {"__metadata__": [1]}), "__metadata__")


def test_empty_and_metadata_only_files_are_valid(tmp_path):
    f = open_safetensors(write_raw(tmp_path / "a.safetensors", b"{}"))
    assert f.keys() == []
    f = open_safetensors(write_raw(tmp_path / "b.safetensors",
                                   {"__metadata__": {"format": "pt"}, "e": entry("F32", [0], 0, 0)}))
    assert f.keys() == ["e"] and f.get("e").shape == (0,)


# ----------------------------------------------------------------- loader
def test_load_single_f32_zero_copy(tmp_path):
    cfg = make_config()
    w = random_weights(cfg)
    d = write_model(tmp_path / "m", cfg, w)
    assert checkpoint_files(d) == [d / "model.safetensors"]
    out = load_weights(d, cfg)
    assert list(out) == list(cfg.weight_shapes())
    for n, a in w.items():
        assert out[n].dtype == np.float32
        np.testing.assert_array_equal(out[n], a)
        assert not out[n].flags.writeable and not out[n].flags.owndata  # mmap view
    # fp32 requested: still zero copy
    out2 = load_weights(d, cfg, "fp32")
    assert not out2["lm_head.weight"].flags.owndata
    # fp16 requested: matrices become float16, 1-D weights stay float32
    out3 = load_weights(d, cfg, "fp16")
    assert out3["model.layers.0.mlp.up_proj.weight"].dtype == np.float16
    np.testing.assert_array_equal(out3["lm_head.weight"], w["lm_head.weight"].astype(np.float16))
    assert out3["model.norm.weight"].dtype == np.float32
    assert out3["model.layers.1.input_layernorm.weight"].dtype == np.float32


def test_load_f16(tmp_path):
    cfg = make_config(attention_bias=True)
    w = {n: a.astype(np.float16) for n, a in random_weights(cfg).items()}
    d = write_model(tmp_path / "m", cfg, w)
    out = load_weights(d, cfg)
    q = out["model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == np.float16 and not q.flags.owndata  # zero copy
    np.testing.assert_array_equal(q, w["model.layers.0.self_attn.q_proj.weight"])
    for n in ("model.norm.weight", "model.layers.0.self_attn.q_proj.bias",
              "model.layers.1.self_attn.o_proj.bias"):
        assert out[n].dtype == np.float32
        np.testing.assert_array_equal(out[n], w[n].astype(np.float32))
    out32 = load_weights(d, cfg, "fp32")
    assert all(a.dtype == np.float32 for a in out32.values())
    np.testing.assert_array_equal(out32["lm_head.weight"], w["lm_head.weight"].astype(np.float32))


@pytest.mark.parametrize("sharded", [False, True])
def test_load_bf16_exact(tmp_path, sharded):
    cfg = make_config()
    w = random_weights(cfg, seed=5)
    writer = write_sharded if sharded else write_model
    d = writer(tmp_path / "m", cfg, w, bf16=True)
    ref = {n: bf16_bits_to_f32(bf16_ref_bits(a)) for n, a in w.items()}
    out = load_weights(d, cfg)
    for n in w:
        assert out[n].dtype == np.float32
        np.testing.assert_array_equal(out[n].view(np.uint32), ref[n].view(np.uint32))
    out16 = load_weights(d, cfg, "fp16")
    np.testing.assert_array_equal(out16["lm_head.weight"],
                                  ref["lm_head.weight"].astype(np.float16))
    assert out16["model.norm.weight"].dtype == np.float32


def test_load_sharded(tmp_path):
    cfg = make_config()
    w = random_weights(cfg)
    d = write_sharded(tmp_path / "m", cfg, w)
    assert [p.name for p in checkpoint_files(d)] == ["model-00001-of-00002.safetensors",
                                                      "model-00002-of-00002.safetensors"]
    out = load_weights(d, cfg)
    for n, a in w.items():
        np.testing.assert_array_equal(out[n], a)
    # the index file path itself works too
    out2 = load_weights(d / "model.safetensors.index.json", cfg)
    assert out2.keys() == out.keys()


def test_load_reference_written_checkpoint(tmp_path):
    sn = pytest.importorskip("safetensors.numpy")
    cfg = make_config()
    w = random_weights(cfg)
    d = tmp_path / "m"
    d.mkdir()
    sn.save_file({n: a.astype(np.float16) for n, a in w.items()}, str(d / "model.safetensors"),
                 metadata={"format": "pt"})
    out = load_weights(d, cfg)
    for n, a in w.items():
        np.testing.assert_array_equal(out[n].astype(np.float32),
                                      a.astype(np.float16).astype(np.float32))


def test_any_single_safetensors_file(tmp_path):
    cfg = make_config()
    w = random_weights(cfg)
    d = write_model(tmp_path / "m", cfg, w, filename="consolidated.safetensors")
    assert checkpoint_files(d) == [d / "consolidated.safetensors"]
    assert load_weights(d, cfg).keys() == w.keys()
    # a file path works as well
    assert load_weights(d / "consolidated.safetensors", cfg).keys() == w.keys()


def test_unindexed_shard_set_and_ambiguous_files(tmp_path):
    cfg = make_config()
    w = random_weights(cfg)
    d = write_sharded(tmp_path / "m", cfg, w)
    (d / "model.safetensors.index.json").unlink()
    assert load_weights(d, cfg).keys() == w.keys()
    save_safetensors(d / "adapter_model.safetensors", {"x": np.zeros(1, np.float32)})
    with pytest.raises(CheckpointError) as e:
        load_weights(d, cfg)
    assert "adapter_model.safetensors" in str(e.value) and "index" in str(e.value)


def test_tied_embeddings_without_lm_head(tmp_path):
    cfg = make_config(tie_word_embeddings=True)
    w = random_weights(cfg)
    assert "lm_head.weight" not in w
    d = write_model(tmp_path / "m", cfg, w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = load_weights(d, cfg)
    assert "lm_head.weight" not in out
    # a tied checkpoint that still stores lm_head loads without complaint
    w2 = dict(w, **{"lm_head.weight": w["model.embed_tokens.weight"]})
    d2 = write_model(tmp_path / "m2", cfg, w2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "lm_head.weight" not in load_weights(d2, cfg)


def test_extra_tensors(tmp_path):
    cfg = make_config()
    w = random_weights(cfg)
    w["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(2, np.float32)
    d = write_model(tmp_path / "m", cfg, w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = load_weights(d, cfg)  # inv_freq is ignored silently
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in out
    w["model.layers.0.mystery.weight"] = np.ones(3, np.float32)
    d2 = write_model(tmp_path / "m2", cfg, w)
    with pytest.warns(CheckpointWarning, match="model.layers.0.mystery.weight"):
        out = load_weights(d2, cfg)
    assert "model.layers.0.mystery.weight" not in out


def test_missing_tensor(tmp_path):
    cfg = make_config()
    w = random_weights(cfg)
    del w["model.layers.1.mlp.down_proj.weight"]
    d = write_model(tmp_path / "m", cfg, w)
    with pytest.raises(CheckpointError) as e:
        load_weights(d, cfg)
    assert "missing" in str(e.value)
    assert "model.layers.1.mlp.down_proj.weight" in str(e.value)
    assert "model.safetensors" in str(e.value)


def test_untied_config_missing_lm_head(tmp_path):
    cfg = make_config()
    w = random_weights(cfg)
    del w["lm_head.weight"]
    d = write_model(tmp_path / "m", cfg, w)
    with pytest.raises(CheckpointError, match="lm_head.weight.*tie_word_embeddings"):
        load_weights(d, cfg)


def test_wrong_shape(tmp_path):
    cfg = make_config()
    w = random_weights(cfg)
    w["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 16), np.float32)
    d = write_model(tmp_path / "m", cfg, w)
    with pytest.raises(CheckpointError) as e:
        load_weights(d, cfg)
    msg = str(e.value)
    assert "model.layers.0.self_attn.k_proj.weight" in msg
    assert "[16, 16]" in msg and "[8, 16]" in msg  # actual, expected
    assert "model.safetensors" in msg


def test_vocab_mismatch_is_a_shape_error(tmp_path):
    cfg = make_config()
    w = random_weights(make_config(vocab_size=48))
    d = write_model(tmp_path / "m", cfg, w)
    with pytest.raises(CheckpointError, match=r"model.embed_tokens.weight.*\[48, 16\].*\[40, 16\]"):
        load_weights(d, cfg)


def test_unsupported_weight_dtype(tmp_path):
    cfg = make_config()
    w = random_weights(cfg)
    w["model.layers.0.mlp.gate_proj.weight"] = np.zeros((24, 16), np.int8)
    d = write_model(tmp_path / "m", cfg, w)
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.gate_proj.weight.*dtype I8"):
        load_weights(d, cfg)


def test_fp16_overflow_is_an_error(tmp_path):
    cfg = make_config()
    w = random_weights(cfg)
    w["model.layers.0.mlp.gate_proj.weight"][0, 0] = 1e6
    d = write_model(tmp_path / "m", cfg, w)
    with pytest.raises(CheckpointError, match=r"gate_proj.weight.*float16"):
        load_weights(d, cfg, "fp16")
    assert load_weights(d, cfg)["model.layers.0.mlp.gate_proj.weight"][0, 0] == 1e6


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "consolidated.00.pth", "model.ckpt"])
def test_pickle_checkpoint_refused(tmp_path, name):
    cfg = make_config()
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    marker = tmp_path / "UNPICKLED"
    (d / name).write_bytes(pickle.dumps({"w": _Evil(str(marker))}))
    for call in (lambda: load_weights(d, cfg), lambda: checkpoint_files(d),
                 lambda: load_weights(d / name, cfg)):
        with pytest.raises(CheckpointError) as e:
            call()
        msg = str(e.value)
        assert "never unpickles" in msg and "safetensors" in msg
        assert "safe_serialization=True" in msg and "save_pretrained" in msg
        assert name in msg or str(d) in msg
    assert not marker.exists()


def test_no_weights_lists_directory(tmp_path):
    cfg = make_config()
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    (d / "tokenizer.model").write_bytes(b"x")
    with pytest.raises(CheckpointError) as e:
        load_weights(d, cfg)
    msg = str(e.value)
    assert "no weights" in msg and "config.json" in msg and "tokenizer.model" in msg
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(tmp_path / "nothing-here", cfg)


def test_sharded_index_missing_shard(tmp_path):
    cfg = make_config()
    d = write_sharded(tmp_path / "m", cfg, random_weights(cfg))
    (d / "model-00002-of-00002.safetensors").unlink()
    for call in (lambda: load_weights(d, cfg), lambda: checkpoint_files(d)):
        with pytest.raises(CheckpointError) as e:
            call()
        msg = str(e.value)
        assert "model-00002-of-00002.safetensors" in msg and "missing" in msg
        assert "model.safetensors.index.json" in msg


def test_sharded_index_lies_about_tensor(tmp_path):
    cfg = make_config()
    d = write_sharded(tmp_path / "m", cfg, random_weights(cfg))
    idx = d / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    data["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
    idx.write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as e:
        load_weights(d, cfg)
    assert "model.norm.weight" in str(e.value) and "model-00001-of-00002" in str(e.value)


@pytest.mark.parametrize("content,needle", [
    ("{not json", "invalid JSON"),
    ('{"metadata": {}}', "weight_map"),
    ('{"weight_map": {"a": "../../etc/passwd"}}', "outside"),
])
def test_sharded_index_malformed(tmp_path, content, needle):
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text(content)
    with pytest.raises(CheckpointError, match=needle) as e:
        load_weights(d, make_config())
    assert "model.safetensors.index.json" in str(e.value)


def test_truncated_shard_through_loader(tmp_path):
    cfg = make_config()
    d = write_sharded(tmp_path / "m", cfg, random_weights(cfg))
    p = d / "model-00002-of-00002.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*truncated"):
        load_weights(d, cfg)


def test_bad_dtype_argument(tmp_path):
    cfg = make_config()
    d = write_model(tmp_path / "m", cfg, random_weights(cfg))
    with pytest.raises(ValueError, match="int4"):
        load_weights(d, cfg, "int4")


@pytest.mark.parametrize("torch_dtype", ["float32", "bfloat16", "float16"])
def test_transformers_checkpoint(tmp_path, torch_dtype):
    """A checkpoint written by transformers' save_pretrained loads with the
    right names, shapes and exact values."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = make_config(bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf_dict()))
    model = model.to(getattr(torch, torch_dtype))
    d = tmp_path / "hf"
    model.save_pretrained(d, safe_serialization=True)
    cfg2 = ModelConfig.from_dir(d)
    assert cfg2.weight_shapes() == cfg.weight_shapes()
    out = load_weights(d, cfg2)
    sd = model.state_dict()
    for n, a in out.items():
        ref = sd[n].float().numpy()
        np.testing.assert_array_equal(a.astype(np.float32), ref, err_msg=n)
    want = np.float16 if torch_dtype == "float16" else np.float32
    assert out["model.layers.0.self_attn.q_proj.weight"].dtype == want
