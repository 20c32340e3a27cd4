"""CPU backend: the handful of operations the model calls, run by `runtime._C`.

Every backend implements exactly this set (DESIGN.md, "one path for every
backend"): prepare weights (weight, vector), linear, linear_stack, rms_norm,
rope_write (RoPE and the KV cache write), silu_mul, attention and embedding;
layer_runner (how the model's layer loop runs: here fused into one C++ call);
the KV prefetch under the products (kv_ranges, kv_prefetch); the few array
chores that differ between numpy and torch (forward_inputs, contiguous,
to_host) and the KV storage (kv_pool, kv_itemsize, kv_commit). Model code
never branches on the backend.
"""
from __future__ import annotations

import mmap
import os
from dataclasses import replace

import numpy as np

from .kv_cache import BatchKV, PagedKVCache
from .quant.formats import QuantizedTensor, block_code_sums

Weight = np.ndarray | QuantizedTensor
# KV cache element types: float16 (the default: half the memory, and half the
# bytes each decode step's attention reads; keys and values round to nearest),
# or float32.
KV_DTYPES = ("float16", "float32")


class CpuBackend:
    name = "cpu"

    def __init__(self, num_threads: int | None = None, kv_dtype: str = "float16") -> None:
        from . import _C  # the extension; built by setup.py

        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
        self._C = _C
        self.kv_dtype = np.dtype(kv_dtype)
        if num_threads is None:
            num_threads = int(os.environ.get("LINGLI_NUM_THREADS", 0)) or (os.cpu_count() or 1)
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        _C.set_num_threads(num_threads)
        self.num_threads = num_threads

    @property
    def isa(self) -> str:
        return self._C.isa()

    def weight(self, w: Weight, output: bool = False) -> Weight:
        """Put a weight matrix [out, in] into the layout `linear` reads.

        Float weights stay f32/f16 rows; quantized ones keep the portable layout,
        which is already what the C++ kernels read (codes in 32-input blocks).
        int8 layer weights take two-step activations (act_steps=2: the int8 codes
        plus their quantized residual): one int8 step alone costs SmolLM2 +0.5%
        perplexity, the whole error budget of the format, and the second step
        brings it to +0.15%; the weights are still read once, so decode barely
        pays. The output layer (`output`) keeps one step: int4/int3 models carry
        an int8 lm_head, where a second step would cost their decode ~6%.
        int8 matrices also get their block code sums (6% more bytes), which the
        batched kernel would otherwise re-read the codes for on every call: a
        pass with no arithmetic to hide it (SmolLM2's int8 lm_head at 16 rows,
        2 threads: 2.2 -> 1.4 ms).
        """
        if isinstance(w, QuantizedTensor):
            steps = 2 if w.bits == 8 and not output else 1
            sums = w.code_sums
            if w.bits == 8 and sums is None:
                sums = block_code_sums(w.q)
            if w.act_steps == steps and w.code_sums is sums:
                return w
            return replace(w, act_steps=steps, code_sums=sums)
        if w.dtype not in (np.float32, np.float16):
            w = w.astype(np.float32)
        return np.ascontiguousarray(w)

    def vector(self, w: np.ndarray) -> np.ndarray:
        """Norm weights and biases are always float32."""
        return np.ascontiguousarray(w, dtype=np.float32)

    def linear(self, x: np.ndarray, w: Weight, bias: np.ndarray | None = None,
               prefetch: tuple | None = None) -> np.ndarray:
        """x @ w.T (+ bias). prefetch: memory read right after, from `kv_prefetch`;
        the batched quantized kernels bring it into cache under their arithmetic."""
        if isinstance(w, QuantizedTensor):
            # Activations are quantized to int8 blocks inside; the inner loop is an integer dot.
            # Every argument positional (out=None included): pybind11 matches keywords
            # by name on each call, ~1 us of the ~3 us a small product's call costs.
            y = self._C.qlinear(x, w.bits, w.group_size, w.q, w.qh, w.scales, w.mins,
                                w.row_scale, None, w.act_steps, w.code_sums, prefetch)
        else:
            y = self._C.linear(x, w)
        if bias is not None:
            y += bias
        return y

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        return self._C.rms_norm(x, weight, eps)

    def silu_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        # Row-strided views (the halves of the fused gate|up product) go in as they are.
        return self._C.silu_mul(gate, up)

    def attention(self, q: np.ndarray, cache: PagedKVCache, layer: int, batch: BatchKV,
                  positions: np.ndarray, scale: float) -> np.ndarray:
        return self._C.paged_attention(q, cache.k[layer], cache.v[layer], batch.block_tables,
                                       positions, scale, batch.seq_ids)

    def kv_ranges(self, cache: PagedKVCache, batch: BatchKV, positions: np.ndarray) -> np.ndarray | None:
        """The cache blocks a forward pass's attention reads, as int64 [n, 2] byte
        (offset, length) into any layer's K or V array; None for a single token.

        A batched decode step finds them cold (every layer's weights pass through
        the cache in between) and its products are compute-bound, so one of them
        prefetches the next attention's blocks (`kv_prefetch`): attention at 16
        streams took about half the time."""
        if len(positions) < 2:
            return None
        per = cache.k[0][0].nbytes                       # one block of one layer: [Hkv, bs, Dh]
        count = np.zeros(len(batch.block_tables), dtype=np.int64)
        np.maximum.at(count, batch.seq_ids, np.asarray(positions, dtype=np.int64) // cache.block_size + 1)
        # Each row's first count[s] blocks, in row order (one mask, no per-row slices).
        ids = batch.block_tables[np.arange(batch.block_tables.shape[1]) < count[:, None]]
        ranges = np.empty((len(ids), 2), dtype=np.int64)
        ranges[:, 0] = ids.astype(np.int64) * per
        ranges[:, 1] = per
        return ranges

    def kv_prefetch(self, cache: PagedKVCache, layer: int, ranges: np.ndarray | None) -> tuple | None:
        """`linear`'s prefetch argument for layer `layer`'s blocks in `ranges`."""
        return None if ranges is None else (cache.k[layer], cache.v[layer], ranges)

    def rope_write(self, qkv: np.ndarray, hq: int, positions: np.ndarray, cos: np.ndarray,
                   sin: np.ndarray, interleaved: bool, cache: PagedKVCache, layer: int,
                   batch: BatchKV) -> np.ndarray:
        """The fused q/k/v product's rows [T, (hq + 2 hkv) dh]: RoPE on q and k, k and v
        stored at `positions`; returns q [T, hq, dh]. One call in place of RoPE on q and on k
        and a cache write (with copies of q, k and v): SmolLM2 decodes 30 layers a token."""
        return self._C.rope_write(qkv, hq, positions, cos, sin, interleaved, cache.k[layer],
                                  cache.v[layer], batch.block_tables, batch.seq_ids)

    # KV storage: numpy in kv_dtype over anonymous memory, pages mapped lazily (a
    # large pool costs nothing until used) unless committed.
    @property
    def kv_itemsize(self) -> int:
        return self.kv_dtype.itemsize

    def kv_pool(self, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape)) * self.kv_dtype.itemsize
        return np.frombuffer(mmap.mmap(-1, max(n, 1)), dtype=self.kv_dtype,
                             count=n // self.kv_dtype.itemsize).reshape(shape)

    def kv_commit(self, pool: np.ndarray) -> None:
        """Map every page of a kv_pool array now: madvise(MADV_POPULATE_WRITE)
        (Linux 5.14+; ~4x cheaper than faulting page by page), else one write
        sweep of zeros."""
        mm = pool.base
        while mm is not None and not isinstance(mm, mmap.mmap):
            mm = getattr(mm, "base", None) or getattr(mm, "obj", None)
        try:
            if mm is None:
                raise OSError("not an mmap")
            mm.madvise(getattr(mmap, "MADV_POPULATE_WRITE", 23))
        except (OSError, ValueError, AttributeError):
            pool.fill(0)

    # Array chores the model needs, numpy here.
    def forward_inputs(self, positions: np.ndarray, batch: BatchKV) -> tuple[np.ndarray, BatchKV]:
        return np.ascontiguousarray(positions, dtype=np.int32), batch

    def contiguous(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x)

    def linear_stack(self, x: np.ndarray, parts: tuple, prefetch: tuple | None = None) -> np.ndarray:
        """x @ [W_0; W_1; ...].T for matrices of different formats (a RowStack), outputs
        side by side. Quantized parts go to one qlinear_parts call: one decode row is
        quantized once and every part's rows run in one parallel pass (SmolLM2's int3
        mix has an int4 k beside int3 q and v in every layer)."""
        if all(isinstance(w, QuantizedTensor) for w in parts) and len(parts) <= 8 and \
                len({w.act_steps for w in parts}) == 1:
            return self._C.qlinear_parts(x, [_qparts(w) for w in parts], None, prefetch)
        return np.concatenate([self.linear(x, w, prefetch=prefetch if i == 0 else None)
                               for i, w in enumerate(parts)], axis=1)

    def to_host(self, x: np.ndarray) -> np.ndarray:
        return x

    def layer_runner(self, model):
        """The callable that runs `model.layer_loop`'s layers: one _C.DecoderStack call,
        the loop's kernels in its order with the same floats and no Python between them
        (the Python between kernels is ~10% of a TinyLlama-shape token on 2 threads,
        ~15% of a SmolLM2 one). LINGLI_NATIVE_LAYERS=0, or weights the stack does not
        take (float parts of different dtypes side by side), keep the Python loop."""
        if os.environ.get("LINGLI_NATIVE_LAYERS", "1") == "0":
            return model.layer_loop
        cfg = model.config
        layers = []
        for lw in model.layers:
            ws = [_stack_weight(w) for w in (lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down)]
            if any(w is None for w in ws):
                return model.layer_loop
            layers.append((lw.attn_norm, ws[0], lw.bqkv, ws[1], lw.bo, lw.mlp_norm, ws[2], lw.b_gate_up,
                           ws[3], lw.b_down))
        stack = self._C.DecoderStack(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                     cfg.intermediate_size, cfg.rms_norm_eps, layers)
        cos, sin, scale, interleaved = model.cos, model.sin, model.scale, cfg.rope_interleaved

        def run(x: np.ndarray, positions: np.ndarray, cache: PagedKVCache, batch: BatchKV,
                ranges: np.ndarray | None) -> None:
            stack.forward(x, positions, cos, sin, interleaved, scale, cache.k, cache.v,
                          batch.block_tables, batch.seq_ids, ranges)
        return run

    def embedding(self, table: Weight, ids: np.ndarray) -> np.ndarray:
        return embedding_rows(table, ids)


def _qparts(w: QuantizedTensor) -> tuple:
    return (w.bits, w.group_size, w.q, w.qh, w.scales, w.mins, w.row_scale, w.act_steps, w.code_sums)


def _stack_weight(w) -> np.ndarray | list | None:
    """A layer weight as _C.DecoderStack takes it: a float array, or a list of
    quantized parts (a RowStack's side by side); None where it cannot."""
    if isinstance(w, QuantizedTensor):
        return [_qparts(w)]
    if isinstance(w, np.ndarray):
        return w
    parts = getattr(w, "parts", ())
    if parts and len(parts) <= 8 and all(isinstance(p, QuantizedTensor) for p in parts) and \
            len({p.act_steps for p in parts}) == 1:
        return [_qparts(p) for p in parts]
    return None


def embedding_rows(table: Weight, ids: np.ndarray) -> np.ndarray:
    """float32 rows `ids` of an embedding table (dequantized if quantized), on the host."""
    if isinstance(table, QuantizedTensor):
        return np.ascontiguousarray(table.take_rows(ids), dtype=np.float32)
    return np.ascontiguousarray(table[ids], dtype=np.float32)
