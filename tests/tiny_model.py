"""Tiny random LLaMA checkpoints with a real tokenizer, written with numpy only (no torch)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from fixtures_tokenizer import build_bytelevel_bpe_dir, build_sentencepiece_dir
from runtime.config import ModelConfig
from runtime.safetensors_io import save_safetensors

_TOKENIZER_CACHE: dict[str, Path] = {}


def tokenizer_dir(kind: str, cache_root: Path) -> Path:
    """Train each test tokenizer once per session (a couple of seconds)."""
    if kind not in _TOKENIZER_CACHE:
        d = cache_root / f"tok_{kind}"
        (build_sentencepiece_dir if kind == "sp" else build_bytelevel_bpe_dir)(d)
        _TOKENIZER_CACHE[kind] = d
    return _TOKENIZER_CACHE[kind]


def make_tiny_llama(out: Path, tokenizer: str | None, cache_root: Path, pad_rows: int = 0,
                    max_positions: int = 128, seed: int = 0, vocab: int | None = None,
                    weight_std: float = 0.3) -> Path:
    """A 2-layer GQA model whose vocabulary is the tokenizer's plus `pad_rows` padding rows.

    weight_std 0.3 makes outputs varied (good for sampling tests) but chaotic;
    quantization-error tests use a realistic ~0.05.
    """
    out.mkdir(parents=True, exist_ok=True)
    n_pieces = vocab or 300
    if tokenizer:
        src = tokenizer_dir(tokenizer, cache_root)
        for f in src.iterdir():
            shutil.copy(f, out / f.name)
        from runtime.tokenizer import Tokenizer
        n_pieces = Tokenizer.from_dir(out).vocab_size
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": n_pieces + pad_rows, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": max_positions, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    }
    (out / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in ModelConfig.from_dict(cfg).weight_shapes().items():
        if name.endswith("norm.weight"):
            tensors[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            tensors[name] = (weight_std * rng.standard_normal(shape)).astype(np.float32)
    save_safetensors(out / "model.safetensors", tensors)
    return out
