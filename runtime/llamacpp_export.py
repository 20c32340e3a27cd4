"""Export a Hugging Face LLaMA checkpoint to a llama.cpp GGUF file (F16 or F32).

    from runtime.llamacpp_export import export_gguf
    export_gguf("~/.cache/lingli/smollm2", "smollm2.f16.gguf")

The inverse of runtime.gguf_convert, written with the `gguf` package's
GGUFWriter the way llama.cpp's convert_hf_to_gguf.py writes "llama" models:
- metadata: every llama.* key llama.cpp reads (context length, embedding and
  feed-forward sizes, block count, head counts, rope dimension count and freq
  base, RMS epsilon, vocab size, file type);
- tensors: HF names -> GGUF names (token_embd, blk.N.attn_q, ..., output_norm,
  output); q_proj / k_proj rows permuted to llama.cpp's interleaved RoPE layout
  (`permute_qk` with n_head for q, n_head_kv for k); 1-D tensors stay F32,
  matrices are F16 (dtype="f16") or F32; a tied LM head writes no output.weight;
- vocabulary: "gpt2" byte-level BPE from tokenizer.json (tokens, token types,
  merges, pre-tokenizer name, e.g. "smollm" for SmolLM2), "llama"
  sentencepiece from tokenizer.model (pieces, scores, types), or, for a
  checkpoint without a tokenizer (runtime.synthetic), a dummy sentencepiece
  vocabulary: <unk>, <s>, </s>, the 256 byte pieces <0x00>..<0xFF>, tok{i}.

Tensors are streamed to the file one at a time from the memory-mapped
checkpoint. Only for benchmarks and comparisons: the runtime never needs it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CheckpointError, LingliError

__all__ = ["export_gguf", "gguf_name", "dummy_spm_vocab"]

# GGUF / sentencepiece token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(hf_name: str) -> str:
    """HF tensor name -> llama.cpp GGUF tensor name (inverse of gguf_convert's mapping)."""
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    parts = hf_name.split(".")
    if len(parts) >= 5 and parts[0] == "model" and parts[1] == "layers":
        layer, rest, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
        if rest in _BLOCK and kind in ("weight", "bias"):
            return f"blk.{int(layer)}.{_BLOCK[rest]}.{kind}"
    raise CheckpointError(f"tensor {hf_name!r} has no llama.cpp GGUF equivalent")


# --------------------------------------------------------------------------
# vocabularies
# --------------------------------------------------------------------------

def dummy_spm_vocab(n: int) -> dict[str, Any]:
    """A sentencepiece-style ("llama") vocabulary of n pieces for tokenizer-less models."""
    if n < 259:
        raise LingliError(f"a dummy GGUF vocabulary needs at least 259 pieces (3 specials and "
                          f"256 bytes); the model has {n}")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"tok{i}" for i in range(len(tokens), n)]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * (n - 259)
    scores = [0.0] * 259 + [-float(i) for i in range(n - 259)]
    return {"model": "llama", "tokens": tokens, "types": types, "scores": scores,
            "bos": 1, "eos": 2, "unk": 0, "pad": None, "add_bos": True, "add_space_prefix": True}


def _pre_name(pre: Any) -> str:
    """tokenizer.json pre_tokenizer -> llama.cpp's tokenizer.ggml.pre name."""
    from .gguf_convert import _LLAMA3_REGEX, _QWEN2_REGEX

    def kinds(p):
        if not isinstance(p, dict):
            return []
        if p.get("type") == "Sequence":
            return [x for q in p.get("pretokenizers", []) for x in kinds(q)]
        if p.get("type") == "Split":
            return [("Split", (p.get("pattern") or {}).get("Regex"))]
        if p.get("type") == "Digits":
            return [("Digits", bool(p.get("individual_digits")))]
        return [(p.get("type"), None)]

    k = kinds(pre)
    if k == [("ByteLevel", None)]:
        return "gpt2"
    if k == [("Digits", True), ("ByteLevel", None)]:
        return "smollm"
    if k == [("Split", _LLAMA3_REGEX), ("ByteLevel", None)]:
        return "llama-bpe"
    if k == [("Split", _QWEN2_REGEX), ("ByteLevel", None)]:
        return "qwen2"
    raise LingliError(f"the tokenizer.json pre-tokenizer {json.dumps(pre)[:200]} matches none of "
                      f"llama.cpp's pre-tokenizers Lingli can name (gpt2, smollm, llama-bpe, qwen2); "
                      f"pass pre=... to export_gguf")


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: cannot read JSON ({e})") from None


def _special_ids(d: Path, tok) -> dict[str, Any]:
    gen = _read_json(d / "generation_config.json")
    eos = tok.eos_ids[0] if getattr(tok, "eos_ids", None) else None
    if eos is None:
        e = gen.get("eos_token_id")
        eos = e[0] if isinstance(e, list) and e else e
    return {"bos": tok.bos_id, "eos": eos, "unk": getattr(tok, "unk_id", None),
            "pad": getattr(tok, "pad_id", None)}


def _bpe_vocab(d: Path, pre: str | None) -> dict[str, Any]:
    from .tokenizer import Tokenizer

    tj = _read_json(d / "tokenizer.json")
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise LingliError(f"{d / 'tokenizer.json'}: model type {model.get('type')!r}; only "
                          f"byte-level BPE tokenizer.json files can be exported")
    added = {int(a["id"]): a for a in tj.get("added_tokens", [])}
    vocab = model.get("vocab") or {}
    n = max(list(vocab.values()) + list(added)) + 1
    tokens: list[str | None] = [None] * n
    for t, i in vocab.items():
        tokens[i] = t
    types = [NORMAL] * n
    for i, a in added.items():
        tokens[i] = a["content"]
        types[i] = CONTROL if a.get("special", True) else USER_DEFINED
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i] = f"[PAD{i}]"
            types[i] = UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    tok = Tokenizer.from_dir(d)
    cfg = _read_json(d / "tokenizer_config.json")
    out = {"model": "gpt2", "pre": pre or _pre_name(tj.get("pre_tokenizer")), "tokens": tokens,
           "types": types, "merges": merges, "add_bos": bool(cfg.get("add_bos_token", False)),
           "chat_template": cfg.get("chat_template")}
    out.update(_special_ids(d, tok))
    return out


def _spm_vocab(d: Path) -> dict[str, Any]:
    from .tokenizer import Tokenizer, _proto_fields, _sp_normalizer_flags

    blob = (d / "tokenizer.model").read_bytes()
    tokens, scores, types = [], [], []
    try:
        for field, wire, value in _proto_fields(blob):
            if field == 1 and wire == 2:            # ModelProto.pieces
                piece, score, ty = "", 0.0, NORMAL
                for f, w, v in _proto_fields(value):
                    if f == 1 and w == 2:
                        piece = v.decode("utf-8")
                    elif f == 2 and w == 5:
                        score = float(np.frombuffer(v, "<f4")[0])
                    elif f == 3 and w == 0:
                        ty = int(v)
                tokens.append(piece)
                scores.append(score)
                types.append(ty)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{d / 'tokenizer.model'}: not a sentencepiece model ({e})") from None
    add_prefix, _ = _sp_normalizer_flags(blob)
    tok = Tokenizer.from_dir(d)
    for i in range(len(tokens), tok.vocab_size):      # tokens added on top of the model
        tokens.append(tok.id_to_piece(i))
        scores.append(0.0)
        types.append(CONTROL if tok.is_special(i) else USER_DEFINED)
    cfg = _read_json(d / "tokenizer_config.json")
    out = {"model": "llama", "tokens": tokens, "types": types, "scores": scores,
           "add_bos": bool(cfg.get("add_bos_token", True)), "add_space_prefix": add_prefix,
           "chat_template": cfg.get("chat_template")}
    out.update(_special_ids(d, tok))
    return out


def _vocab(d: Path, n_vocab: int, pre: str | None) -> dict[str, Any]:
    if (d / "tokenizer.model").is_file():
        v = _spm_vocab(d)
    elif (d / "tokenizer.json").is_file():
        v = _bpe_vocab(d, pre)
    else:
        return dummy_spm_vocab(n_vocab)
    n = len(v["tokens"])
    if n > n_vocab:
        raise CheckpointError(f"{d}: the tokenizer has {n} tokens but the model only "
                              f"{n_vocab} embedding rows")
    # llama.cpp wants one token per embedding row: name the padding rows
    for i in range(n, n_vocab):
        v["tokens"].append(f"[PAD{i}]")
        v["types"].append(UNUSED)
        if "scores" in v:
            v["scores"].append(-1e6)
    return v


# --------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------

def export_gguf(hf_dir, out_path, dtype: str = "f16", pre: str | None = None) -> Path:
    """Write a llama.cpp GGUF file (arch "llama") from a HF LLaMA checkpoint directory.

    dtype: "f16" or "f32" for the matrices (1-D tensors are always F32).
    pre: override the BPE pre-tokenizer name (default: detected from tokenizer.json).
    The file is written to a temporary name and renamed into place.
    """
    import gguf

    from .config import ModelConfig
    from .gguf_convert import permute_qk
    from .loader import load_weights

    d = Path(hf_dir).expanduser()
    out = Path(out_path)
    if dtype not in ("f16", "f32"):
        raise LingliError(f"dtype must be 'f16' or 'f32', got {dtype!r}")
    cfg = ModelConfig.from_dir(d)
    if cfg.arch != "llama":
        raise LingliError(f"{d}: only llama checkpoints can be exported, got {cfg.arch!r}")
    if cfg.quantization_config:
        raise LingliError(f"{d} is a Lingli quantized checkpoint; export the float checkpoint "
                          f"and quantize it with llama.cpp's quantizer instead")
    raw = _read_json(d / "config.json")
    weights = load_weights(d, cfg, None)          # memory-mapped; bf16 widened to fp32
    vocab = _vocab(d, cfg.vocab_size, pre)
    mat_dtype = np.float16 if dtype == "f16" else np.float32

    plan: list[tuple[str, str, np.dtype, tuple]] = []     # (gguf name, hf name, dtype, shape)
    names = list(weights)
    order = ["model.embed_tokens.weight"] + [n for n in names if n.startswith("model.layers.")] \
        + ["model.norm.weight"] + (["lm_head.weight"] if "lm_head.weight" in weights else [])
    for hf in order:
        a = weights[hf]
        dt = np.dtype(np.float32) if a.ndim == 1 else np.dtype(mat_dtype)
        plan.append((gguf_name(hf), hf, dt, tuple(a.shape)))

    def tensor(hf: str, dt: np.dtype) -> np.ndarray:
        a = np.asarray(weights[hf])
        if not cfg.rope_interleaved:
            if ".self_attn.q_proj." in hf:
                a = permute_qk(a, cfg.num_heads)
            elif ".self_attn.k_proj." in hf:
                a = permute_qk(a, cfg.num_kv_heads)
        return np.ascontiguousarray(a.astype(dt, copy=False))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), "llama")
    try:
        w.add_name(raw.get("_name_or_path") or d.name)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_head_count(cfg.num_heads)
        w.add_head_count_kv(cfg.num_kv_heads)
        if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_rope_freq_base(float(cfg.rope_theta))
        if cfg.rope_scaling_factor and cfg.rope_scaling_factor != 1.0:
            rs = raw.get("rope_scaling") or {}
            kind = rs.get("rope_type") or rs.get("type")
            if kind != "linear":
                raise LingliError(f"{d}: rope_scaling {rs} cannot be exported (only linear)")
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(cfg.rope_scaling_factor))
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16"
                        else gguf.LlamaFileType.ALL_F32)

        w.add_tokenizer_model(vocab["model"])
        if vocab["model"] == "gpt2":
            w.add_tokenizer_pre(vocab["pre"])
        else:
            w.add_tokenizer_pre("default")
        w.add_token_list(vocab["tokens"])
        if "scores" in vocab:
            w.add_token_scores(vocab["scores"])
        w.add_token_types(vocab["types"])
        if vocab.get("merges"):
            w.add_token_merges(vocab["merges"])
        for key, fn in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                        ("unk", w.add_unk_token_id), ("pad", w.add_pad_token_id)):
            if vocab.get(key) is not None:
                fn(int(vocab[key]))
        w.add_add_bos_token(bool(vocab.get("add_bos")))
        if vocab["model"] == "llama":
            w.add_add_space_prefix(bool(vocab.get("add_space_prefix", True)))
        if vocab.get("chat_template"):
            w.add_chat_template(str(vocab["chat_template"]))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

        for name, _, dt, shape in plan:
            w.add_tensor_info(name, shape, dt, int(np.prod(shape)) * dt.itemsize)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, hf, dt, _ in plan:
            w.write_tensor_data(tensor(hf, dt))
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out
