"""Random-init transformers LLaMA checkpoints for parity tests (test-only: needs torch)."""
from __future__ import annotations

from pathlib import Path

# name -> LlamaConfig overrides. Together they cover multi-head and grouped-query
# attention, tied embeddings, vocabularies that are not a multiple of 64, head_dim
# 64 and 128, linear RoPE scaling and attention biases.
CONFIGS: dict[str, dict] = {
    "mha_hd64": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4,
                     intermediate_size=344, vocab_size=1003),
    "gqa_hd128": dict(hidden_size=512, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=700, vocab_size=517),
    "gqa_tied": dict(hidden_size=192, num_attention_heads=3, num_key_value_heads=1,
                     intermediate_size=320, vocab_size=999, tie_word_embeddings=True),
    "rope_linear_bias": dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                             intermediate_size=200, vocab_size=777, rope_theta=500000.0,
                             rope_scaling={"type": "linear", "factor": 2.0},
                             attention_bias=True, mlp_bias=True),
}


def make_checkpoint(name: str, out: Path, seed: int = 0):
    """Write a random LlamaForCausalLM with save_pretrained; returns the torch model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(num_hidden_layers=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                      initializer_range=0.08, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None, attn_implementation="eager", **CONFIGS[name])
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # norms start at 1; perturb them so a wrong norm weight shows
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out, safe_serialization=True)
    return model
