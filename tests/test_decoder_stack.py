"""_C.DecoderStack (csrc/decoder.cpp): the CPU backend's fused run of the model's
layer loop. It must give the Python loop's floats exactly (logits and the KV cache)
for every weight format, bias, RoPE layout, KV dtype and batch shape, and reject
bad arguments with an error naming them."""
from __future__ import annotations

import numpy as np
import pytest

from runtime import _C
from runtime.backend_cpu import CpuBackend
from runtime.config import ModelConfig
from runtime.kv_cache import BatchKV, PagedKVCache, SequenceKV
from runtime.model import LlamaModel
from runtime.quant.quantize_model import quantize_weights


def _config(**kw) -> ModelConfig:
    base = dict(arch="llama", vocab_size=97, hidden_size=80, intermediate_size=72, num_layers=3, num_heads=4,
                num_kv_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    base.update(kw)
    return ModelConfig(**base)


def _weights(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in cfg.weight_shapes().items():
        scale = 0.1 if name.endswith("norm.weight") else 0.08
        base = 1.0 if name.endswith("norm.weight") else 0.0
        out[name] = (base + scale * rng.standard_normal(shape)).astype(np.float32)
    return out


def _model(cfg: ModelConfig, fmt: str, kv_dtype: str = "float16", threads: int = 2):
    w = _weights(cfg)
    if fmt == "f16":
        w = {n: a.astype(np.float16) if a.ndim == 2 else a for n, a in w.items()}
    elif fmt != "f32":
        bits = int(fmt[3:])
        w = quantize_weights(w, cfg, bits, 32, "search", progress=False)
    be = CpuBackend(threads, kv_dtype=kv_dtype)
    model = LlamaModel(cfg, w, be, cfg.max_position_embeddings)
    return model, be


def _run(model, be, native: bool, steps: list[list[int]]):
    """Prefill each sequence's prompt, then decode every sequence together; returns
    every step's logits and the final cache."""
    cfg = model.config
    cache = PagedKVCache(cfg.num_layers, 24, 4, cfg.num_kv_heads, cfg.head_dim, pool=be.kv_pool)
    model.run_layers = be.layer_runner(model) if native else model.layer_loop
    seqs = [SequenceKV() for _ in steps]
    out = []
    for s, prompt in zip(seqs, steps):          # prefill, one sequence at a time
        cache.reserve(s, len(prompt))
        out.append(model.forward(np.array(prompt), np.arange(len(prompt)), cache, s, all_logits=True))
    lens = [len(p) for p in steps]
    rng = np.random.default_rng(1)
    for _ in range(5):                          # batched decode of all sequences
        for s, n in zip(seqs, lens):
            cache.reserve(s, n + 1)
        toks = rng.integers(0, cfg.vocab_size, len(seqs))
        batch = BatchKV.of(seqs, [1] * len(seqs))
        out.append(model.forward(toks, np.array(lens), cache, batch, all_logits=True))
        lens = [n + 1 for n in lens]
    return out, cache


CASES = [
    ("f32", {}), ("f16", {}), ("int8", {}), ("int4", {}), ("int3", {}),
    ("int4", {"attention_bias": True, "mlp_bias": True}),
    ("f32", {"attention_bias": True, "mlp_bias": True, "rope_interleaved": True}),
    ("int4", {"num_kv_heads": 1, "hidden_size": 96, "intermediate_size": 100}),   # MQA, K % 32 != 0
    ("int8", {"num_heads": 6, "num_kv_heads": 3, "head_dim": 16, "hidden_size": 72}),
]


@pytest.mark.parametrize("fmt,kw", CASES)
@pytest.mark.parametrize("kv_dtype", ["float16", "float32"])
def test_native_layers_equal_python_loop(fmt, kw, kv_dtype):
    cfg = _config(**kw)
    model, be = _model(cfg, fmt, kv_dtype)
    assert be.layer_runner(model) is not model.layer_loop       # the stack takes these weights
    prompts = [[3, 5, 7, 11, 13, 17, 19], [2, 4], [9] * 11]
    want, want_cache = _run(model, be, False, prompts)
    got, got_cache = _run(model, be, True, prompts)
    for a, b in zip(want, got):
        assert np.array_equal(a, b)
    for i in range(cfg.num_layers):
        assert np.array_equal(want_cache.k[i], got_cache.k[i])
        assert np.array_equal(want_cache.v[i], got_cache.v[i])


def test_native_layers_on_every_isa_and_thread_count():
    cfg = _config()
    model, be = _model(cfg, "int4")
    prompts = [[3, 5, 7, 11, 13], [2, 4, 6]]
    isa0, threads0 = _C.isa(), _C.get_num_threads()
    try:
        for isa in _C.available_isas():
            for t in (1, 3):
                _C.set_isa(isa)
                _C.set_num_threads(t)
                want, _ = _run(model, be, False, prompts)
                got, _ = _run(model, be, True, prompts)
                assert all(np.array_equal(a, b) for a, b in zip(want, got)), (isa, t)
    finally:
        _C.set_isa(isa0)
        _C.set_num_threads(threads0)


def test_native_layers_can_be_turned_off(monkeypatch):
    cfg = _config()
    model, be = _model(cfg, "int4")
    monkeypatch.setenv("LINGLI_NATIVE_LAYERS", "0")
    assert be.layer_runner(model) == model.layer_loop


# ------------------------------------------------------------ bad input ---

def _stack_args(cfg=None):
    cfg = cfg or _config(num_layers=2)
    model, be = _model(cfg, "int4")
    from runtime.backend_cpu import _stack_weight
    layers = [(lw.attn_norm, _stack_weight(lw.wqkv), lw.bqkv, _stack_weight(lw.wo), lw.bo, lw.mlp_norm,
               _stack_weight(lw.w_gate_up), lw.b_gate_up, _stack_weight(lw.w_down), lw.b_down)
              for lw in model.layers]
    return cfg, model, be, layers


def _dims(cfg):
    return (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
            cfg.rms_norm_eps)


def test_stack_rejects_bad_weights():
    cfg, model, be, layers = _stack_args()
    _C.DecoderStack(*_dims(cfg), layers)  # fine as built
    bad = list(layers[1])
    bad[5] = np.ones(cfg.hidden_size + 1, np.float32)
    with pytest.raises(ValueError, match=r"layer 1: mlp_norm has shape \(81,\)"):
        _C.DecoderStack(*_dims(cfg), [layers[0], tuple(bad)])
    bad = list(layers[0])
    bad[3] = np.zeros((cfg.hidden_size, 7), np.float32)
    with pytest.raises(ValueError, match=r"layer 0: wo has shape \(80, 7\)"):
        _C.DecoderStack(*_dims(cfg), [tuple(bad)])
    bad = list(layers[0])
    bad[1] = bad[1][:1] * 0 + [bad[6][0]]        # gate_up's matrix where q/k/v belongs
    with pytest.raises(ValueError, match="layer 0: wqkv: the parts have 144 rows, expected 160"):
        _C.DecoderStack(*_dims(cfg), [tuple(bad)])
    bad = list(layers[0])
    bad[8] = "down"
    with pytest.raises(ValueError, match="layer 0: w_down must be a float array or a list of quantized parts"):
        _C.DecoderStack(*_dims(cfg), [tuple(bad)])
    bad = list(layers[0])
    bad[2] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"layer 0: wqkv bias has shape \(3,\)"):
        _C.DecoderStack(*_dims(cfg), [tuple(bad)])
    with pytest.raises(ValueError, match="layer 0 must be a tuple"):
        _C.DecoderStack(*_dims(cfg), [layers[0][:9]])
    with pytest.raises(ValueError, match="heads a multiple of kv_heads"):
        _C.DecoderStack(cfg.hidden_size, 5, 2, cfg.head_dim, cfg.intermediate_size, 1e-5, [])


def test_stack_forward_rejects_bad_inputs():
    cfg, model, be, layers = _stack_args()
    stack = _C.DecoderStack(*_dims(cfg), layers)
    cache = PagedKVCache(cfg.num_layers, 4, 4, cfg.num_kv_heads, cfg.head_dim, pool=be.kv_pool)
    s = SequenceKV()
    cache.reserve(s, 3)
    batch = BatchKV.of([s], [3])
    x = np.zeros((3, cfg.hidden_size), np.float32)
    pos = np.arange(3, dtype=np.int32)

    def fwd(**kw):
        a = dict(x=x, positions=pos, cos=model.cos, sin=model.sin, interleaved=False, scale=0.25,
                 k_caches=cache.k, v_caches=cache.v, block_table=batch.block_tables, seq_ids=batch.seq_ids,
                 ranges=None)
        a.update(kw)
        stack.forward(**a)

    fwd()  # fine as built
    with pytest.raises(ValueError, match=r"x has shape \(3, 81\)"):
        fwd(x=np.zeros((3, cfg.hidden_size + 1), np.float32))
    with pytest.raises(ValueError, match="x must be float32"):
        fwd(x=x.astype(np.float64))
    with pytest.raises(ValueError, match="one array per layer"):
        fwd(k_caches=cache.k[:1])
    with pytest.raises(ValueError, match="layer 1: k_cache has shape"):
        fwd(k_caches=[cache.k[0], np.zeros((4, cfg.num_kv_heads, 4, cfg.head_dim + 2), np.float16)])
    with pytest.raises(ValueError, match=r"positions\[2\] = 999 is out of range"):
        fwd(positions=np.array([0, 1, 999], np.int32))
    with pytest.raises(ValueError, match="block 77 for token 0 is out of range"):
        fwd(block_table=np.full_like(batch.block_tables, 77))
    with pytest.raises(ValueError, match=r"seq_ids\[1\] = 4 is out of range"):
        fwd(seq_ids=np.array([0, 4, 0], np.int32))
    with pytest.raises(ValueError, match="prefetch range 0 .* is outside"):
        fwd(ranges=np.array([[0, 1 << 40]], np.int64))
    # A read-only block before the written ones: attention reads it, the write does not.
    cache.reserve(s, 8)
    tables = BatchKV.of([s], [3]).block_tables.copy()
    tables[0, 0] = 77
    with pytest.raises(ValueError, match=r"block_table\[0, 0\] = 77 is out of range \[0, 4\) of the cache"):
        fwd(positions=np.array([4, 5, 6], np.int32), block_table=tables)
    ro = x.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="x must be writeable"):
        fwd(x=ro)
