"""Export a trained model in Hugging Face format, loadable by transformers and by Lingli.

The directory gets model.safetensors, config.json (model_type llama,
architectures LlamaForCausalLM, torch_dtype), generation_config.json, the
tokenizer files of tokenizer_dir (tokenizer.model and its configs) and the
chat template as tokenizer_config.json["chat_template"], the place both
transformers and runtime/tokenizer.py read it from.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from runtime.safetensors_io import save_safetensors

__all__ = ["export_hf", "preset_chat_template", "TOKENIZER_FILES"]

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
_DTYPES = ("float32", "bfloat16")


def _lit(text: str) -> str:
    """A Jinja string literal (JSON's escapes are ones Jinja reads back the same)."""
    return json.dumps(text, ensure_ascii=False)


def _piece(fmt: str, content: str) -> str:
    """Jinja output for a preset piece such as "User:{content}\\n"."""
    before, _, after = fmt.partition("{content}")
    return "{{ " + " + ".join(x for x in (_lit(before), content, _lit(after)) if x != '""') + " }}"


def preset_chat_template(name: str) -> str | None:
    """A Jinja chat template that renders like runtime preset `name`, or None.

    Only the turn-based presets (pieces around each turn) have one; those with
    their own render function (firefly, llama2, raw) return None.
    """
    from runtime.chat_template import PRESETS

    p = PRESETS[name]
    if p.render is not None:
        return None
    default = "none" if p.default_system is None else _lit(p.default_system)
    return (
        "{{ " + _lit(p.begin) + " }}"
        "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
        "{% set body = messages[1:] %}{% else %}{% set sys = " + default + " %}"
        "{% set body = messages %}{% endif %}"
        "{% if sys is not none %}" + _piece(p.system, "sys") + "{% endif %}"
        "{% for m in body %}{% if m['role'] == 'user' %}" + _piece(p.user, "m['content']")
        + "{% elif m['role'] == 'assistant' %}{{ " + _lit(p.prefix) + " + m['content'] + "
        + _lit(p.suffix) + " }}{% else %}{{ raise_exception('a system message must come first') }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ " + _lit(p.prefix) + " }}{% endif %}"
    )


def _gathered(model: torch.nn.Module):
    """ZeRO-3 keeps only a shard of each parameter here: gather them for the export."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        import deepspeed
        return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


def _state_arrays(model: torch.nn.Module, tied: bool) -> dict[str, np.ndarray]:
    with _gathered(model):
        sd = {k: v.detach().to("cpu", torch.float32).contiguous().numpy().copy()
              for k, v in model.state_dict().items()}
    if tied:
        # One tensor on disk, as in HF checkpoints; both loaders re-tie it.
        sd.pop("lm_head.weight", None)
    return sd


def _config_dict(model: torch.nn.Module, dtype: str) -> dict:
    cfg = model.config.to_dict()
    cfg["model_type"] = "llama"
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["torch_dtype"] = dtype      # older readers (and runtime/config.py)
    cfg["dtype"] = dtype            # transformers >= 5
    rp = cfg.get("rope_parameters") or {}
    if "rope_theta" in rp:          # also top level, for readers before rope_parameters
        cfg["rope_theta"] = rp["rope_theta"]
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _tokenizer_config(tokenizer_dir: Path, out_dir: Path, chat_template: str | None) -> None:
    for name in TOKENIZER_FILES:
        src = tokenizer_dir / name
        if src.is_file() and not (name == "chat_template.jinja" and chat_template is not None):
            shutil.copyfile(src, out_dir / name)
    cfg_file = out_dir / "tokenizer_config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    else:
        cfg = _default_tokenizer_config(out_dir)
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    cfg_file.write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")


def _default_tokenizer_config(d: Path) -> dict:
    """A LlamaTokenizer config naming the sentencepiece model's own special pieces."""
    cfg: dict = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                 "add_eos_token": False, "legacy": False}
    if (d / "tokenizer.model").is_file():
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
        for key, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                       ("unk_token", sp.unk_id()), ("pad_token", sp.pad_id())):
            if i >= 0:
                cfg[key] = sp.id_to_piece(i)
    return cfg


def export_hf(model: torch.nn.Module, tokenizer_dir: Path, out_dir: Path,
              chat_template: str | None = None, dtype: str = "float32") -> Path:
    """Write `model` (a LlamaForCausalLM) and its tokenizer as a Hugging Face checkpoint.

    dtype: "float32" or "bfloat16" for the weights on disk.
    chat_template: a Jinja template to store; None keeps tokenizer_dir's (if any).
    Returns out_dir.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    out_dir, tokenizer_dir = Path(out_dir), Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {tokenizer_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)      # a DeepSpeed engine's module
    cfg = _config_dict(model, dtype)
    arrays = _state_arrays(model, bool(cfg.get("tie_word_embeddings")))
    save_safetensors(out_dir / "model.safetensors", arrays, metadata={"format": "pt"},
                     bf16=(dtype == "bfloat16"))
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
           if cfg.get(k) is not None}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
    _tokenizer_config(tokenizer_dir, out_dir, chat_template)
    return out_dir
