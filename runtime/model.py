"""The LLaMA forward pass, readable top to bottom (llama2.c / gpt-fast style).

    x = embed(tokens)
    for each layer:
        h = rms_norm(x);  q, k, v = h @ Wqkv;  rope(q, k);  cache <- k, v
        x = x + attention(q, cache) @ Wo
        h = rms_norm(x);  x = x + (silu(h @ Wg) * (h @ Wu)) @ Wd
    logits = rms_norm(x) @ Wlm

Weights arrive with Hugging Face names and layout ([out, in]). At load time
q/k/v and gate/up are concatenated so each is one matrix product per layer:
fewer, larger calls keep the threads busy on small models.

layer_loop below is the layers' one definition. A backend runs it as it is
(Triton), or fuses it into one call with the same kernels (the CPU backend's
_C.DecoderStack: no Python between the ~10 kernels of each layer); its
`layer_runner` decides.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .kv_cache import BatchKV, PagedKVCache, SequenceKV
from .quant.formats import QuantizedTensor, concat_rows


@dataclass(frozen=True)
class RowStack:
    """Matrices of different formats stacked along the output dimension (an
    int3 q/k next to an int4 v): one product each, outputs side by side."""
    parts: tuple

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


def _fmt(w) -> tuple:
    return (w.bits, w.group_size, w.coded) if isinstance(w, QuantizedTensor) else ("float", w.dtype)


def _cat_rows(parts: list, be) -> np.ndarray | QuantizedTensor | RowStack:
    """Stack weight matrices along the output dimension into one matrix when they
    share a format (one product per layer), else into a RowStack."""
    if len({_fmt(p) for p in parts}) > 1:
        return RowStack(tuple(be.weight(p) for p in parts))
    if isinstance(parts[0], QuantizedTensor):
        return be.weight(concat_rows(parts))
    return be.weight(np.concatenate(parts))


def _linear(be, x: np.ndarray, w, bias: np.ndarray | None, prefetch=None) -> np.ndarray:
    if isinstance(w, RowStack):
        y = be.linear_stack(x, w.parts, prefetch=prefetch)
        if bias is not None:
            y += bias
        return y
    return be.linear(x, w, bias, prefetch=prefetch)


@dataclass
class LayerWeights:
    attn_norm: np.ndarray
    wqkv: np.ndarray | QuantizedTensor | RowStack   # [(Hq + 2 Hkv) * Dh, H]
    bqkv: np.ndarray | None
    wo: np.ndarray              # [H, Hq * Dh]
    bo: np.ndarray | None
    mlp_norm: np.ndarray
    w_gate_up: np.ndarray | QuantizedTensor | RowStack   # [2 F, H]
    b_gate_up: np.ndarray | None
    w_down: np.ndarray          # [H, F]
    b_down: np.ndarray | None


def rope_tables(config: ModelConfig, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_positions, Dh/2] as Hugging Face computes them (linear scaling divides t)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    t = np.arange(max_positions, dtype=np.float64) / config.rope_scaling_factor
    angles = np.outer(t, inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: dict[str, np.ndarray], backend,
                 max_positions: int) -> None:
        self.config = config
        self.backend = backend
        be = backend
        self.embed = weights["model.embed_tokens.weight"]
        lm_head = weights.get("lm_head.weight")
        if lm_head is None or config.tie_word_embeddings:
            lm_head = self.embed
        self.lm_head = be.weight(lm_head, output=True)
        self.final_norm = be.vector(weights["model.norm.weight"])
        self.layers: list[LayerWeights] = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            w = lambda name: weights[p + name]  # noqa: E731
            wqkv = _cat_rows([w("self_attn.q_proj.weight"), w("self_attn.k_proj.weight"),
                              w("self_attn.v_proj.weight")], be)
            bqkv = None
            if config.attention_bias:
                bqkv = be.vector(np.concatenate([w("self_attn.q_proj.bias"),
                                                 w("self_attn.k_proj.bias"),
                                                 w("self_attn.v_proj.bias")]))
            self.layers.append(LayerWeights(
                attn_norm=be.vector(w("input_layernorm.weight")),
                wqkv=wqkv,
                bqkv=bqkv,
                wo=be.weight(w("self_attn.o_proj.weight")),
                bo=be.vector(w("self_attn.o_proj.bias")) if config.attention_bias else None,
                mlp_norm=be.vector(w("post_attention_layernorm.weight")),
                w_gate_up=_cat_rows([w("mlp.gate_proj.weight"), w("mlp.up_proj.weight")], be),
                b_gate_up=be.vector(np.concatenate([w("mlp.gate_proj.bias"),
                                                    w("mlp.up_proj.bias")]))
                if config.mlp_bias else None,
                w_down=be.weight(w("mlp.down_proj.weight")),
                b_down=be.vector(w("mlp.down_proj.bias")) if config.mlp_bias else None,
            ))
        self.cos, self.sin = (be.vector(t) for t in rope_tables(config, max_positions))
        self.scale = config.head_dim ** -0.5
        # How the backend runs layer_loop: as it is, or fused into one call.
        self.run_layers = be.layer_runner(self)

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads (embedding row aside): the bandwidth bound."""
        total = self.lm_head.nbytes + self.final_norm.nbytes
        for layer in self.layers:
            total += sum(a.nbytes for a in (layer.attn_norm, layer.wqkv, layer.wo,
                                            layer.mlp_norm, layer.w_gate_up, layer.w_down))
        return total

    def forward(self, tokens: np.ndarray, positions: np.ndarray, cache: PagedKVCache,
                kv: SequenceKV | BatchKV, all_logits: bool = False,
                logit_rows: np.ndarray | None = None) -> np.ndarray:
        """Run `tokens` at `positions` (blocks already reserved); returns logits.

        kv: one sequence's SequenceKV, or a BatchKV naming each token's sequence
        (batched decode and prefill chunks of many sequences in one pass).
        Logits rows: all tokens (all_logits), the rows `logit_rows`, or the last.
        """
        cfg, be = self.config, self.backend
        T = len(tokens)
        batch = kv if isinstance(kv, BatchKV) else BatchKV.of([kv], [T])
        positions, batch = be.forward_inputs(positions, batch)  # on the backend's device
        x = be.embedding(self.embed, tokens)                                  # [T, H]
        # The cache blocks attention will read: each layer's q/k/v product
        # brings them in under its arithmetic (backend's choice; None: none).
        ranges = be.kv_ranges(cache, batch, positions)
        self.run_layers(x, positions, cache, batch, ranges)                    # x += layers
        if logit_rows is not None:
            x = x[logit_rows]
        elif not all_logits:
            x = x[-1:]
        x = be.rms_norm(be.contiguous(x), self.final_norm, cfg.rms_norm_eps)
        return be.to_host(be.linear(x, self.lm_head))                        # numpy float32

    def layer_loop(self, x, positions, cache: PagedKVCache, batch: BatchKV, ranges) -> None:
        """x [T, H] += every decoder layer, in place, one backend operation at a time.

        positions and batch are on the backend's device (forward_inputs); ranges is
        kv_ranges' answer: the cache blocks this pass's attention reads."""
        cfg, be = self.config, self.backend
        T = x.shape[0]
        hq, dh = cfg.num_heads, cfg.head_dim
        for i, lw in enumerate(self.layers):
            h = be.rms_norm(x, lw.attn_norm, cfg.rms_norm_eps)
            qkv = _linear(be, h, lw.wqkv, lw.bqkv,                            # [T, (hq+2hkv)dh]
                          be.kv_prefetch(cache, i, ranges))
            # RoPE on q and k; k and v go into this layer's cache blocks; q [T, hq, dh].
            q = be.rope_write(qkv, hq, positions, self.cos, self.sin, cfg.rope_interleaved,
                              cache, i, batch)
            attn = be.attention(q, cache, i, batch, positions, self.scale)     # [T, hq, dh]
            x += be.linear(attn.reshape(T, hq * dh), lw.wo, lw.bo)
            h = be.rms_norm(x, lw.mlp_norm, cfg.rms_norm_eps)
            gate_up = _linear(be, h, lw.w_gate_up, lw.b_gate_up)              # [T, 2F]
            f = gate_up.shape[1] // 2
            x += be.linear(be.silu_mul(gate_up[:, :f], gate_up[:, f:]), lw.w_down, lw.b_down)
