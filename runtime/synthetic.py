"""Random-weight LLaMA checkpoints of real model shapes, for benchmarks.

    from runtime.synthetic import make_random_llama, resolve_synthetic
    make_random_llama("out/", shape="tinyllama")   # TinyLlama-1.1B shape, fp16, 2.2 GB
    resolve_synthetic("tinyllama-random")           # -> cache_dir()/tinyllama-random (made once)

Speed depends on shapes and formats, not on what the weights learned, so a
random model of TinyLlama-1.1B's shape benchmarks decode and prefill like the
trained one. The checkpoint has no tokenizer (its 32000-row vocabulary matches
no tokenizer at hand): prompts are token ids. Exporting it to GGUF
(runtime.llamacpp_export) writes a dummy sentencepiece vocabulary.

Weights are normal(0, 0.02) (the output projections o_proj/down_proj scaled
by 1/sqrt(2 * layers), GPT-2 style, so the residual stream stays bounded),
norm weights are 1. The files are written shard by shard (one per layer), so
memory holds one layer at a time; the directory appears atomically.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from .errors import LingliError

__all__ = ["SHAPES", "SYNTHETIC_MODELS", "make_random_llama", "resolve_synthetic"]

_BASE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
    "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02, "use_cache": True,
}

SHAPES: dict[str, dict] = {
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0 config.json
    "tinyllama": {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
                  "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
                  "max_position_embeddings": 2048},
    # a few MB, for tests (vocab >= 259 so the dummy GGUF vocabulary fits)
    "tiny": {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 256},
}

# name -> shape, for resolve_synthetic (cache_dir()/name)
SYNTHETIC_MODELS = {"tinyllama-random": "tinyllama"}

_DTYPES = {"fp16": np.float16, "fp32": np.float32}


def _log(msg: str) -> None:
    print(f"lingli: {msg}", file=sys.stderr, flush=True)


def make_random_llama(out_dir, shape: str = "tinyllama", seed: int = 0,
                      dtype: str = "fp16", overwrite: bool = False) -> Path:
    """Write a random-weight HF LLaMA checkpoint (config.json + sharded safetensors).

    shape: a key of SHAPES ("tinyllama", "tiny"); dtype: "fp16" or "fp32" for the
    matrices (norm weights are float32). Same seed -> same weights.
    Refuses a non-empty out_dir unless overwrite=True. Returns out_dir as a Path.
    """
    from .config import ModelConfig
    from .safetensors_io import save_safetensors

    if shape not in SHAPES:
        raise LingliError(f"unknown synthetic shape {shape!r}; choose one of {', '.join(SHAPES)}")
    if dtype not in _DTYPES:
        raise LingliError(f"dtype must be 'fp16' or 'fp32', got {dtype!r}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise LingliError(f"{out}: exists and is not an empty directory; pass overwrite=True")
    np_dtype = _DTYPES[dtype]
    cfg = dict(_BASE, **SHAPES[shape],
               torch_dtype="float16" if dtype == "fp16" else "float32")
    config = ModelConfig.from_dict(cfg)
    shapes = config.weight_shapes()
    n_layers = cfg["num_hidden_layers"]
    out_scale = 1.0 / math.sqrt(2 * n_layers)

    # group tensor names into shards: one per layer, one for the rest
    groups: dict[str, list[str]] = {}
    for name in shapes:
        key = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, []).append(name)
    order = ["rest"] + [str(i) for i in range(n_layers)]
    n_shards = len(order)

    rng = np.random.default_rng(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=str(out.parent)))
    try:
        weight_map: dict[str, str] = {}
        total = 0
        for k, key in enumerate(order):
            fname = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
            tensors = {}
            for name in groups[key]:
                shp = shapes[name]
                if name.endswith("norm.weight"):
                    arr = np.ones(shp, dtype=np.float32)
                else:
                    std = 0.02 * (out_scale if name.endswith(("o_proj.weight", "down_proj.weight"))
                                  else 1.0)
                    arr = rng.standard_normal(shp, dtype=np.float32)
                    arr *= np.float32(std)
                    arr = arr.astype(np_dtype, copy=False)
                tensors[name] = arr
                weight_map[name] = fname
                total += arr.nbytes
            save_safetensors(tmp / fname, tensors, metadata={"format": "pt"})
            del tensors
        with open(tmp / "model.safetensors.index.json", "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
        with open(tmp / "config.json", "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
        with open(tmp / "generation_config.json", "w", encoding="utf-8") as f:
            json.dump({"bos_token_id": 1, "eos_token_id": 2}, f, indent=2)
        (tmp / "README.md").write_text(
            f"Random-weight LLaMA checkpoint, shape {shape!r}, seed {seed}, {dtype}; "
            "written by runtime.synthetic.make_random_llama for benchmarks. No tokenizer: "
            "prompts are token ids.\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def resolve_synthetic(name: str) -> Path | None:
    """cache_dir()/name for a synthetic model name ("tinyllama-random"), made on first use.

    Returns None when `name` is not a synthetic model name.
    """
    from .hub import cache_dir

    shape = SYNTHETIC_MODELS.get(str(name).lower())
    if shape is None:
        return None
    out = cache_dir() / str(name).lower()
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    _log(f"writing the random-weight {shape} checkpoint into {out} (once) ...")
    return make_random_llama(out, shape=shape, overwrite=True)
