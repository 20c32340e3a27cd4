"""A LLaMA of a given size: transformers' own LlamaForCausalLM.

Using the transformers class keeps the state dict names and layout exactly
those of Hugging Face checkpoints, so export is a plain save and the runtime
(and transformers) load the result without renaming anything.
"""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

__all__ = ["make_config", "make_model", "count_params"]


def make_config(vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                num_kv_heads: int, intermediate_size: int, max_position_embeddings: int,
                tie_word_embeddings: bool = False, rope_theta: float = 10000.0,
                bos_id: int = 1, eos_id: int = 2, pad_id: int = 0,
                rms_norm_eps: float = 1e-5) -> LlamaConfig:
    """A LlamaConfig that the runtime's config.json reader also accepts."""
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_id, eos_token_id=eos_id,
        pad_token_id=pad_id, hidden_act="silu", attention_bias=False, mlp_bias=False,
        architectures=["LlamaForCausalLM"],
    )


def make_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """A float32 model initialised from `seed` alone (same seed, same weights).

    The global torch RNG is saved and restored so that building a model does
    not shift the random stream the training loop later draws from.
    """
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    finally:
        torch.random.set_rng_state(state)
    return model


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters, counting tied (shared) tensors once."""
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        n += p.numel()
    return n
