"""Convert a llama.cpp GGUF file into a Hugging Face LLaMA checkpoint directory.

    from runtime.gguf_convert import convert_gguf
    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "out/")   # -> Path("out")

The output directory holds what `transformers` and Lingli load:
model.safetensors, config.json, generation_config.json and the tokenizer
(tokenizer.json + tokenizer_config.json + special_tokens_map.json for
byte-level BPE vocabularies, tokenizer.model for sentencepiece ones).

What the conversion undoes:
- quantization: every tensor is dequantized with `gguf.quants.dequantize`
  (all types the gguf package supports) to float32 (or float16);
- GGUF's reversed shape lists (ne0 is the input dimension): tensors come out
  in Hugging Face's [out, in] layout;
- llama.cpp's Q/K row permutation: convert_hf_to_gguf.py reorders the rows of
  q_proj / k_proj from the rotate-half RoPE layout of Hugging Face to the
  interleaved (GPT-J) layout llama.cpp uses; `unpermute_qk` is its inverse.

No PyTorch here; numpy, gguf and the standard library only.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .errors import CheckpointError

__all__ = ["convert_gguf", "permute_qk", "unpermute_qk", "SUPPORTED_PRE_TOKENIZERS"]

# GGUF token types (llama.cpp's llama_token_type, identical to sentencepiece's
# ModelProto.SentencePiece.Type numbering).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def _note(msg: str) -> None:
    print(f"lingli: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Q/K row permutation
# --------------------------------------------------------------------------

def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation (convert_hf_to_gguf.py LlamaModel.permute).

    Rows of each head go from rotate-half order [x0..x(d/2-1), y0..y(d/2-1)]
    to interleaved order [x0, y0, x1, y1, ...]. llama.cpp calls it with
    n_head for q_proj and n_head_kv for k_proj. Works on weights [out, in]
    and on biases [out].
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of even size")
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Exact inverse of `permute_qk`: interleaved rows back to rotate-half."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of even size")
    return np.ascontiguousarray(
        w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape))


# --------------------------------------------------------------------------
# Reading GGUF
# --------------------------------------------------------------------------

def _open_gguf(path: Path):
    try:
        import gguf  # noqa: F401
        from gguf import GGUFReader
    except ImportError as e:  # pragma: no cover - gguf is a runtime dependency
        raise CheckpointError(f"{path}: reading GGUF files needs the 'gguf' package ({e})") from e
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file not found")
    try:
        reader = GGUFReader(str(path), "r")
    except Exception as e:  # bad magic, truncated header, offsets past the end ...
        raise CheckpointError(f"{path}: not a valid GGUF file, truncated or corrupt ({type(e).__name__}: {e})") from e
    return reader


def _field_value(field) -> Any:
    try:
        return field.contents()
    except Exception:  # pragma: no cover - very old gguf packages
        from gguf import GGUFValueType
        if field.types and field.types[0] == GGUFValueType.ARRAY:
            if field.types[-1] == GGUFValueType.STRING:
                return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            return [field.parts[i].tolist()[0] for i in field.data]
        if field.types and field.types[0] == GGUFValueType.STRING:
            return bytes(field.parts[field.data[0]]).decode("utf-8")
        return field.parts[field.data[0]].tolist()[0]


class _Meta:
    """Typed access to a GGUF file's key/value metadata with clear errors."""

    def __init__(self, reader, path: Path):
        self.path = path
        self.fields = reader.fields

    def has(self, key: str) -> bool:
        return key in self.fields

    def get(self, key: str, default: Any = None) -> Any:
        f = self.fields.get(key)
        if f is None:
            return default
        try:
            return _field_value(f)
        except Exception as e:
            raise CheckpointError(f"{self.path}: metadata field {key!r} is unreadable ({e})") from e

    def require(self, key: str) -> Any:
        if key not in self.fields:
            raise CheckpointError(f"{self.path}: metadata field {key!r} is missing")
        return self.get(key)

    def int(self, key: str, default: Optional[int] = None, required: bool = True) -> Optional[int]:
        v = self.get(key) if self.has(key) else None
        if v is None:
            if default is not None or not required:
                return default
            raise CheckpointError(f"{self.path}: metadata field {key!r} is missing")
        if isinstance(v, (list, tuple)):
            # per-layer values (e.g. head_count_kv); accept only when uniform
            if not v or any(x != v[0] for x in v):
                raise CheckpointError(
                    f"{self.path}: metadata field {key!r} varies per layer ({v[:8]}...); not supported")
            v = v[0]
        try:
            return int(v)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: metadata field {key!r} = {v!r} is not an integer") from e

    def float(self, key: str, default: Optional[float] = None) -> Optional[float]:
        v = self.get(key) if self.has(key) else None
        if v is None:
            return default
        try:
            # GGUF stores float32: keep its shortest decimal form (1e-05, not 9.99999974e-06)
            return float(str(np.float32(v))) if isinstance(v, float) else float(v)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: metadata field {key!r} = {v!r} is not a number") from e


# --------------------------------------------------------------------------
# Tensor names
# --------------------------------------------------------------------------

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_IGNORED = {"rope_freqs.weight"}


def _hf_name(gguf_name: str) -> Optional[Tuple[str, Optional[int], str]]:
    """(hf_name, layer or None, gguf short kind) or None when unknown."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name], None, gguf_name.split(".")[0]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        layer = int(m.group(1))
        return f"model.layers.{layer}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}", layer, m.group(2)
    return None


# --------------------------------------------------------------------------
# Streaming safetensors writer (one tensor in memory at a time)
# --------------------------------------------------------------------------

_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}


def _write_safetensors(path: Path, plan: List[Tuple[str, Tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
                       metadata: Dict[str, str]) -> None:
    header: Dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, shape, dtype, _ in plan:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _ST_DTYPES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * (-len(hbytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for name, shape, dtype, produce in plan:
            arr = produce()
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise CheckpointError(f"internal: tensor {name} came out {arr.dtype}{list(arr.shape)}, "
                                      f"planned {np.dtype(dtype)}{list(shape)}")
            f.write(np.ascontiguousarray(arr).astype("<" + arr.dtype.str[1:], copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------
# Tokenizer: byte-level BPE (tokenizer.ggml.model == "gpt2")
# --------------------------------------------------------------------------

_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _bytelevel(use_regex: bool) -> Dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split_then_bytelevel(regex: str) -> Dict[str, Any]:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        _bytelevel(False)]}


# tokenizer.ggml.pre -> Hugging Face pre_tokenizer, mirroring the regexes
# llama.cpp's llama-vocab.cpp uses for each pre-tokenizer type.
_PRE_TOKENIZERS: Dict[str, Callable[[], Dict[str, Any]]] = {}
for _n in ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais"):
    _PRE_TOKENIZERS[_n] = lambda: _bytelevel(True)
# LLAMA_VOCAB_PRE_TYPE_{STARCODER,REFACT,COMMAND_R,SMOLLM,CODESHELL,EXAONE,MINERVA}:
# regexes {"\p{N}", <GPT-2 regex>}, i.e. single digits, then GPT-2 byte-level.
for _n in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"):
    _PRE_TOKENIZERS[_n] = lambda: {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _bytelevel(True)]}
for _n in ("llama3", "llama-v3", "llama-bpe", "dbrx", "smaug-bpe", "falcon3", "pixtral"):
    _PRE_TOKENIZERS[_n] = lambda: _split_then_bytelevel(_LLAMA3_REGEX)
for _n in ("qwen2", "stablelm2", "deepseek-r1-qwen", "megrez"):
    _PRE_TOKENIZERS[_n] = lambda: _split_then_bytelevel(_QWEN2_REGEX)
SUPPORTED_PRE_TOKENIZERS = tuple(sorted(_PRE_TOKENIZERS))


def _token_str(tokens: List[str], i: Optional[int]) -> Optional[str]:
    if i is None or i < 0 or i >= len(tokens):
        return None
    return tokens[i]


def _special_ids(meta: _Meta) -> Dict[str, Optional[int]]:
    out = {}
    for k in ("bos", "eos", "unknown", "padding", "eot", "eom"):
        v = meta.get(f"tokenizer.ggml.{k}_token_id")
        out[k] = int(v) if v is not None else None
    return out


def _tokenizer_gpt2(meta: _Meta, out: Path, model_max_length: int) -> None:
    path = meta.path
    tokens = [str(t) for t in meta.require("tokenizer.ggml.tokens")]
    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        types = [TOKEN_NORMAL] * len(tokens)
    types = [int(t) for t in types]
    if len(types) != len(tokens):
        raise CheckpointError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries "
                              f"but tokenizer.ggml.tokens has {len(tokens)}")
    merges_raw = meta.get("tokenizer.ggml.merges") or []
    merges = []
    for i, m in enumerate(merges_raw):
        parts = str(m).split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"{path}: tokenizer.ggml.merges[{i}] = {m!r} is not 'left right'")
        merges.append(parts)

    pre_name = str(meta.get("tokenizer.ggml.pre", "default"))
    if pre_name not in _PRE_TOKENIZERS:
        raise CheckpointError(
            f"{path}: tokenizer.ggml.pre = {pre_name!r} is not a pre-tokenizer Lingli knows "
            f"(known: {', '.join(SUPPORTED_PRE_TOKENIZERS)})")
    pre_tokenizer = _PRE_TOKENIZERS[pre_name]()

    vocab: Dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in vocab:
            # duplicate strings (padding tokens in some converted vocabs): keep the first
            continue
        vocab[t] = i

    ids = _special_ids(meta)
    added = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
            added.append({"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True})

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    bos = _token_str(tokens, ids["bos"])
    eos = _token_str(tokens, ids["eos"])
    unk = _token_str(tokens, ids["unknown"])
    pad = _token_str(tokens, ids["padding"])

    if (add_bos and bos is not None) or (add_eos and eos is not None):
        specials = {}
        if add_bos and bos is not None:
            specials[bos] = {"id": bos, "ids": [ids["bos"]], "tokens": [bos]}
        if add_eos and eos is not None:
            specials[eos] = {"id": eos, "ids": [ids["eos"]], "tokens": [eos]}

        def template(seq: str, type_id: int) -> List[Dict[str, Any]]:
            parts: List[Dict[str, Any]] = []
            if add_bos and bos is not None:
                parts.append({"SpecialToken": {"id": bos, "type_id": type_id}})
            parts.append({"Sequence": {"id": seq, "type_id": type_id}})
            if add_eos and eos is not None:
                parts.append({"SpecialToken": {"id": eos, "type_id": type_id}})
            return parts

        post_processor = {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {"type": "TemplateProcessing", "single": template("A", 0),
             "pair": template("A", 0) + template("B", 1), "special_tokens": specials}]}
    else:
        post_processor = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                          "use_regex": True}

    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": False, "vocab": vocab, "merges": merges,
        },
    }
    with open(out / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer_json, f, ensure_ascii=False)

    _write_tokenizer_config(meta, out, tokens, added, bos, eos, unk, pad, add_bos, add_eos,
                            model_max_length, tokenizer_class="PreTrainedTokenizerFast")


def _write_tokenizer_config(meta: _Meta, out: Path, tokens: List[str], added: List[Dict[str, Any]],
                            bos, eos, unk, pad, add_bos: bool, add_eos: bool, model_max_length: int,
                            tokenizer_class: str, extra: Optional[Dict[str, Any]] = None) -> None:
    cfg: Dict[str, Any] = {
        "tokenizer_class": tokenizer_class,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
        "additional_special_tokens": [a["content"] for a in added
                                      if a["content"] not in (bos, eos, unk, pad)],
    }
    chat_template = meta.get("tokenizer.chat_template")
    if chat_template:
        cfg["chat_template"] = str(chat_template)
    if extra:
        cfg.update(extra)
    with open(out / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=2)
    smap = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk),
                               ("pad_token", pad)) if v is not None}
    if cfg["additional_special_tokens"]:
        smap["additional_special_tokens"] = cfg["additional_special_tokens"]
    with open(out / "special_tokens_map.json", "w", encoding="utf-8") as f:
        json.dump(smap, f, ensure_ascii=False, indent=2)


# --------------------------------------------------------------------------
# Tokenizer: sentencepiece (tokenizer.ggml.model == "llama")
# --------------------------------------------------------------------------
# A sentencepiece ModelProto is written by hand (protobuf wire format), so
# neither protobuf nor sentencepiece is needed to convert.

def _pb_varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _pb_key(field: int, wire: int) -> bytes:
    return _pb_varint((field << 3) | wire)


def _pb_int(field: int, v: int) -> bytes:
    return _pb_key(field, 0) + _pb_varint(int(v))


def _pb_bytes(field: int, v: bytes) -> bytes:
    return _pb_key(field, 2) + _pb_varint(len(v)) + v


def _pb_str(field: int, v: str) -> bytes:
    return _pb_bytes(field, v.encode("utf-8"))


def _pb_float(field: int, v: float) -> bytes:
    return _pb_key(field, 5) + struct.pack("<f", float(v))


def build_sentencepiece_model(tokens: List[str], scores: List[float], types: List[int], *,
                              bos_id: int = -1, eos_id: int = -1, unk_id: int = 0, pad_id: int = -1,
                              add_dummy_prefix: bool = True, model_type: int = 2) -> bytes:
    """Serialize a sentencepiece ModelProto (model_type 2 = BPE, 1 = unigram)."""
    out = bytearray()
    for t, s, ty in zip(tokens, scores, types):
        ty = int(ty) if int(ty) in (1, 2, 3, 4, 5, 6) else TOKEN_NORMAL
        piece = _pb_str(1, t) + _pb_float(2, s) + _pb_int(3, ty)
        out += _pb_bytes(1, piece)
    byte_fallback = any(ty == TOKEN_BYTE for ty in types)
    trainer = (_pb_int(3, model_type) + _pb_int(4, len(tokens)) + _pb_int(35, 1 if byte_fallback else 0)
               + _pb_int(40, unk_id) + _pb_int(41, bos_id) + _pb_int(42, eos_id) + _pb_int(43, pad_id))
    normalizer = (_pb_str(1, "identity") + _pb_int(3, 1 if add_dummy_prefix else 0)
                  + _pb_int(4, 0) + _pb_int(5, 1))
    out += _pb_bytes(2, trainer)
    out += _pb_bytes(3, normalizer)
    return bytes(out)


def _tokenizer_llama(meta: _Meta, out: Path, model_max_length: int) -> None:
    path = meta.path
    tokens = [str(t) for t in meta.require("tokenizer.ggml.tokens")]
    n = len(tokens)
    scores = meta.get("tokenizer.ggml.scores")
    scores = [float(s) for s in scores] if scores is not None else [0.0] * n
    types = meta.get("tokenizer.ggml.token_type")
    types = [int(t) for t in types] if types is not None else [TOKEN_NORMAL] * n
    if len(scores) != n or len(types) != n:
        raise CheckpointError(f"{path}: tokenizer.ggml.scores/token_type lengths ({len(scores)}, "
                              f"{len(types)}) differ from tokenizer.ggml.tokens ({n})")
    ids = _special_ids(meta)
    unk_id = ids["unknown"] if ids["unknown"] is not None else next(
        (i for i, t in enumerate(types) if t == TOKEN_UNKNOWN), 0)
    add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    blob = build_sentencepiece_model(
        tokens, scores, types,
        bos_id=ids["bos"] if ids["bos"] is not None else -1,
        eos_id=ids["eos"] if ids["eos"] is not None else -1,
        unk_id=unk_id,
        pad_id=ids["padding"] if ids["padding"] is not None and ids["padding"] != unk_id else -1,
        add_dummy_prefix=add_space_prefix)
    (out / "tokenizer.model").write_bytes(blob)
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, (t, ty) in enumerate(zip(tokens, types))
             if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN)]
    _write_tokenizer_config(
        meta, out, tokens, added,
        _token_str(tokens, ids["bos"]), _token_str(tokens, ids["eos"]), _token_str(tokens, unk_id),
        _token_str(tokens, ids["padding"]),
        bool(meta.get("tokenizer.ggml.add_bos_token", True)),
        bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        model_max_length, tokenizer_class="LlamaTokenizer",
        extra={"legacy": False, "add_prefix_space": add_space_prefix,
               "sp_model_kwargs": {}})


# --------------------------------------------------------------------------
# The conversion
# --------------------------------------------------------------------------

def _dequantize(t, path: Path) -> np.ndarray:
    """GGUF tensor -> float32 array in numpy (= Hugging Face) shape order."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    shape = tuple(int(x) for x in reversed([int(d) for d in t.shape]))
    data = t.data
    try:
        if data.dtype.kind == "f":
            arr = np.asarray(data, dtype=np.float32)
        elif t.tensor_type in (GGMLQuantizationType.I8, GGMLQuantizationType.I16,
                               GGMLQuantizationType.I32, GGMLQuantizationType.I64):
            raise CheckpointError(f"{path}: tensor {t.name} has integer type {t.tensor_type.name}; "
                                  f"weights must be float or quantized")
        else:
            arr = dequantize(np.asarray(data), t.tensor_type).astype(np.float32, copy=False)
        if arr.size != int(np.prod(shape, dtype=np.int64)):
            raise CheckpointError(f"{path}: tensor {t.name} ({t.tensor_type.name}) holds {arr.size} "
                                  f"values, its shape {list(shape)} needs {int(np.prod(shape))} "
                                  f"(truncated file?)")
        return arr.reshape(shape)
    except CheckpointError:
        raise
    except NotImplementedError as e:
        raise CheckpointError(f"{path}: tensor {t.name}: quantization type {t.tensor_type.name} "
                              f"cannot be dequantized by this gguf package ({e})") from e
    except Exception as e:
        raise CheckpointError(f"{path}: tensor {t.name} ({t.tensor_type.name}) could not be read "
                              f"({type(e).__name__}: {e})") from e


def convert_gguf(gguf_path, out_dir, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Convert a llama-architecture GGUF file into a Hugging Face checkpoint dir.

    dtype: "fp32" (default) or "fp16" for the matrices; norm weights stay
    float32. The directory is built in a temporary sibling and renamed into
    place, so a failure never leaves a half-written out_dir. A non-empty
    out_dir is refused unless overwrite=True. Returns out_dir as a Path.
    """
    path = Path(gguf_path)
    out = Path(out_dir)
    if dtype not in ("fp32", "fp16"):
        raise ValueError(f"dtype must be 'fp32' or 'fp16', got {dtype!r}")
    np_dtype = np.dtype(np.float32) if dtype == "fp32" else np.dtype(np.float16)
    if out.exists():
        if not out.is_dir():
            raise CheckpointError(f"{out}: exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise CheckpointError(f"{out}: directory is not empty; pass overwrite=True to replace it")

    reader = _open_gguf(path)
    meta = _Meta(reader, path)

    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: general.architecture = {arch!r} is not supported "
                              f"(only 'llama' GGUF files can be converted)")
    if meta.int("llama.expert_count", 0, required=False):
        raise CheckpointError(f"{path}: mixture-of-experts llama GGUF files "
                              f"(llama.expert_count = {meta.get('llama.expert_count')}) are not supported")

    hidden = meta.int("llama.embedding_length")
    n_layer = meta.int("llama.block_count")
    inter = meta.int("llama.feed_forward_length")
    n_head = meta.int("llama.attention.head_count")
    n_head_kv = meta.int("llama.attention.head_count_kv", n_head)
    head_dim = meta.int("llama.attention.key_length", hidden // n_head if n_head else 0)
    v_head_dim = meta.int("llama.attention.value_length", head_dim)
    rope_dim = meta.int("llama.rope.dimension_count", head_dim)
    ctx = meta.int("llama.context_length", 2048)
    eps = meta.float("llama.attention.layer_norm_rms_epsilon", 1e-6)
    theta = meta.float("llama.rope.freq_base", 10000.0)
    for key, v in (("llama.embedding_length", hidden), ("llama.block_count", n_layer),
                   ("llama.feed_forward_length", inter), ("llama.attention.head_count", n_head),
                   ("llama.attention.head_count_kv", n_head_kv)):
        if v <= 0:
            raise CheckpointError(f"{path}: metadata field {key!r} = {v} must be positive")
    if n_head % n_head_kv:
        raise CheckpointError(f"{path}: head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
    if v_head_dim != head_dim:
        raise CheckpointError(f"{path}: key_length {head_dim} != value_length {v_head_dim}; not supported")
    if rope_dim != head_dim:
        raise CheckpointError(f"{path}: llama.rope.dimension_count = {rope_dim} differs from the head "
                              f"size {head_dim} (partial rotary); not supported")

    # ---- tensors -----------------------------------------------------------
    tensors = {}
    for t in reader.tensors:
        if t.name in _IGNORED:
            _note(f"{path.name}: ignoring {t.name} (llama.cpp's precomputed RoPE frequency factors; "
                  f"the Hugging Face config describes RoPE by rope_theta/rope_scaling instead)")
            continue
        mapped = _hf_name(t.name)
        if mapped is None:
            raise CheckpointError(f"{path}: tensor {t.name!r} has no Hugging Face LLaMA equivalent")
        hf, layer, kind = mapped
        if layer is not None and layer >= n_layer:
            raise CheckpointError(f"{path}: tensor {t.name} is for layer {layer}, "
                                  f"but llama.block_count = {n_layer}")
        if hf in tensors:
            raise CheckpointError(f"{path}: tensor {t.name} appears twice")
        tensors[hf] = (t, kind)

    vocab_size = None
    if "model.embed_tokens.weight" in tensors:
        vocab_size = int(tensors["model.embed_tokens.weight"][0].shape[-1])
    vocab_size = meta.int("llama.vocab_size", vocab_size, required=False) or vocab_size
    if vocab_size is None:
        raise CheckpointError(f"{path}: tensor token_embd.weight is missing")

    q_out, kv_out = n_head * head_dim, n_head_kv * head_dim
    expected: Dict[str, Tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab_size, hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(n_layer):
        p = f"model.layers.{i}."
        expected.update({
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q_out, hidden),
            p + "self_attn.k_proj.weight": (kv_out, hidden),
            p + "self_attn.v_proj.weight": (kv_out, hidden),
            p + "self_attn.o_proj.weight": (hidden, q_out),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensors missing, e.g. "
                              f"{', '.join(missing[:3])} (GGUF names: token_embd/blk.N.*/output_norm)")
    tied = "lm_head.weight" not in tensors
    if not tied:
        expected["lm_head.weight"] = (vocab_size, hidden)
    bias_out = {"q_proj": q_out, "k_proj": kv_out, "v_proj": kv_out, "o_proj": hidden,
                "gate_proj": inter, "up_proj": inter, "down_proj": hidden}
    attn_bias = mlp_bias = False
    for hf in tensors:
        if hf.endswith(".bias"):
            proj = hf.split(".")[-2]
            if proj not in bias_out:
                raise CheckpointError(f"{path}: tensor {tensors[hf][0].name}: biases on norms are not supported")
            expected[hf] = (bias_out[proj],)
            if proj in ("gate_proj", "up_proj", "down_proj"):
                mlp_bias = True
            else:
                attn_bias = True
    for hf, (t, _) in tensors.items():
        shape = tuple(int(x) for x in reversed([int(d) for d in t.shape]))
        if shape != expected[hf]:
            raise CheckpointError(f"{path}: tensor {t.name} has shape {list(shape)} (HF order), "
                                  f"expected {list(expected[hf])} from the metadata")
    if attn_bias:
        for i in range(n_layer):
            for proj in ("q_proj", "k_proj", "v_proj"):
                if f"model.layers.{i}.self_attn.{proj}.bias" not in tensors:
                    raise CheckpointError(f"{path}: layer {i} lacks the {proj} bias other layers have")

    def order_key(name: str):
        m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if m:
            return (1, int(m.group(1)), m.group(2))
        return (0 if "embed" in name else 2, 0, name)

    plan = []
    for hf in sorted(tensors, key=order_key):
        t, kind = tensors[hf]
        shape = expected[hf]
        out_dtype = np.dtype(np.float32) if len(shape) == 1 and "norm" in hf else np_dtype
        if kind == "attn_q":
            heads = n_head
        elif kind == "attn_k":
            heads = n_head_kv
        else:
            heads = None

        def produce(t=t, heads=heads, out_dtype=out_dtype):
            arr = _dequantize(t, path)
            if heads is not None:
                arr = unpermute_qk(arr, heads)
            return arr.astype(out_dtype, copy=False)

        plan.append((hf, shape, out_dtype, produce))

    # ---- config ------------------------------------------------------------
    ids = _special_ids(meta)
    config: Dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": ctx,
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "rope_scaling": None,
        "attention_bias": attn_bias,
        "mlp_bias": mlp_bias,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "tie_word_embeddings": tied,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "torch_dtype": "float32" if dtype == "fp32" else "float16",
    }
    if ids["padding"] is not None:
        config["pad_token_id"] = ids["padding"]
    scaling_type = meta.get("llama.rope.scaling.type")
    scaling_factor = meta.float("llama.rope.scaling.factor")
    if scaling_type and scaling_type != "none" and scaling_factor and scaling_factor != 1.0:
        if scaling_type == "linear":
            config["rope_scaling"] = {"rope_type": "linear", "factor": scaling_factor}
        elif scaling_type == "yarn":
            config["rope_scaling"] = {
                "rope_type": "yarn", "factor": scaling_factor,
                "original_max_position_embeddings":
                    meta.int("llama.rope.scaling.original_context_length", ctx)}
        else:
            raise CheckpointError(f"{path}: llama.rope.scaling.type = {scaling_type!r} is not supported")
    gen_config: Dict[str, Any] = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"]}
    if ids["padding"] is not None:
        gen_config["pad_token_id"] = ids["padding"]

    tok_model = meta.get("tokenizer.ggml.model")
    if tok_model not in ("gpt2", "llama", None):
        raise CheckpointError(f"{path}: tokenizer.ggml.model = {tok_model!r} is not supported "
                              f"(supported: 'gpt2' byte-level BPE, 'llama' sentencepiece)")
    if tok_model is None:
        _note(f"{path.name}: no tokenizer in the GGUF file; writing weights and config only")

    # ---- write -------------------------------------------------------------
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=str(out.parent)))
    try:
        _write_safetensors(tmp / "model.safetensors", plan,
                           {"format": "pt", "lingli_source": path.name})
        with open(tmp / "config.json", "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        with open(tmp / "generation_config.json", "w", encoding="utf-8") as f:
            json.dump(gen_config, f, indent=2)
        if tok_model == "gpt2":
            _tokenizer_gpt2(meta, tmp, ctx)
        elif tok_model == "llama":
            _tokenizer_llama(meta, tmp, ctx)
        os.chmod(tmp, 0o755)
        if out.exists():
            if any(out.iterdir()) and not overwrite:  # appeared while we were converting
                raise CheckpointError(f"{out}: directory is not empty; pass overwrite=True to replace it")
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        del reader
    return out
