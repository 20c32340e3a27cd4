"""Triton backend: the CPU backend's operations on torch tensors, run by kernels/.

The same set as runtime/backend_cpu.py (DESIGN.md, "one path for every
backend"), so runtime/model.py runs unchanged: weights are repacked once into
the layout the GEMM kernels read (kernels.quant_gemm.repack), activations and
the KV pool live on the device in `dtype` (float16 on a GPU; float32 in the
interpreter, where the products then match the CPU backend closely), and
only the logits come back to the host as numpy for the sampler.

torch and triton are imported here and in kernels/ only; LLM(backend="cpu")
never imports this module.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import LingliError
from .backend_cpu import embedding_rows
from .kv_cache import BatchKV, PagedKVCache
from .quant.formats import QuantizedTensor

try:
    import torch
    import triton  # noqa: F401  (fail here, with the fix, rather than in a kernel)
except ImportError as e:  # pragma: no cover - the test environment has both
    raise LingliError(f"backend='triton' needs torch and triton ({e}); install them with "
                      "pip install -c constraints.txt -e '.[triton]'") from e


@dataclass
class DeviceBatch(BatchKV):
    """A BatchKV on the device, with the host copies the attention plan is made
    from (once per forward pass, at the first layer)."""
    host_positions: "torch.Tensor | None" = None
    host_seq_ids: "torch.Tensor | None" = None
    plan: object = None


def _tensor(a: np.ndarray) -> "torch.Tensor":
    """float32 host tensor of a (possibly read-only, mmapped) numpy array."""
    a = np.asarray(a, dtype=np.float32)
    return torch.from_numpy(a if a.flags.writeable and a.flags.c_contiguous else a.copy())


class TritonBackend:
    name = "triton"
    num_threads = 1      # host threads are not what limits a GPU; kept for the CLI's banner

    def __init__(self, dtype: "torch.dtype | None" = None) -> None:
        from kernels import _util

        try:
            self.device = _util.device()
        except RuntimeError as e:
            raise LingliError(f"backend='triton': {e}") from None
        if dtype is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise LingliError(f"backend='triton': dtype must be float16, bfloat16 or float32, got {dtype}")
        self.dtype = dtype
        from kernels import activation, attention, norm, quant_gemm, rope

        self._gemm, self._attn, self._norm, self._rope, self._act = \
            quant_gemm, attention, norm, rope, activation

    @property
    def isa(self) -> str:
        return f"triton ({self.device.type}{', interpreter' if self.device.type == 'cpu' else ''})"

    # ------------------------------------------------------------- weights
    def weight(self, w, output: bool = False):
        """Quantized: repacked for the GEMM kernels; float: [out, in] in self.dtype."""
        if isinstance(w, QuantizedTensor):
            return self._gemm.repack(w, self.device)
        return _tensor(w).to(self.device, self.dtype)

    def vector(self, w: np.ndarray) -> "torch.Tensor":
        """Norm weights, biases and RoPE tables: float32 on the device."""
        return _tensor(w).to(self.device)

    # ---------------------------------------------------------------- ops
    # The CPU backend's cache prefetch under the products; a GPU has no use for it.
    def kv_ranges(self, cache: PagedKVCache, batch: BatchKV, positions: "torch.Tensor") -> None:
        return None

    def kv_prefetch(self, cache: PagedKVCache, layer: int, ranges: None) -> None:
        return None

    def linear(self, x: "torch.Tensor", w, bias: "torch.Tensor | None" = None,
               prefetch: None = None) -> "torch.Tensor":
        if isinstance(w, torch.Tensor):
            y = x @ w.T
        else:
            y = self._gemm.quant_matmul(x, w)
        if bias is not None:
            y += bias.to(y.dtype)
        return y

    def rms_norm(self, x: "torch.Tensor", weight: "torch.Tensor", eps: float) -> "torch.Tensor":
        return self._norm.rms_norm(x, weight, eps)

    def rope_(self, x: "torch.Tensor", positions: "torch.Tensor", cos: "torch.Tensor",
              sin: "torch.Tensor", interleaved: bool) -> None:
        # The range check would make the host wait for the GPU every call; the engine
        # never schedules a position past max_model_len, the tables' length.
        self._rope.rope_(x, positions, cos, sin, interleaved,
                         check_positions=self.device.type != "cuda")

    def silu_mul(self, gate: "torch.Tensor", up: "torch.Tensor") -> "torch.Tensor":
        return self._act.silu_mul(gate, up)

    def attention(self, q: "torch.Tensor", cache: PagedKVCache, layer: int, batch: BatchKV,
                  positions: "torch.Tensor", scale: float) -> "torch.Tensor":
        if batch.plan is None:
            batch.plan = self._attn.make_plan(batch.host_positions, batch.host_seq_ids,
                                              q.shape[1] // cache.k[layer].shape[1], self.device)
        return self._attn.paged_attention(q, cache.k[layer], cache.v[layer], batch.block_tables,
                                          positions, scale, batch.seq_ids, plan=batch.plan)

    def rope_write(self, qkv: "torch.Tensor", hq: int, positions: "torch.Tensor",
                   cos: "torch.Tensor", sin: "torch.Tensor", interleaved: bool,
                   cache: PagedKVCache, layer: int, batch: BatchKV) -> "torch.Tensor":
        """RoPE on q and k of the fused q/k/v rows, k and v into the cache; q [T, hq, dh]."""
        T = qkv.shape[0]
        hkv, dh = cache.k[layer].shape[1], cache.k[layer].shape[3]
        q = qkv[:, :hq * dh].contiguous().reshape(T, hq, dh)
        k = qkv[:, hq * dh:(hq + hkv) * dh].contiguous().reshape(T, hkv, dh)
        v = qkv[:, (hq + hkv) * dh:].reshape(T, hkv, dh)
        self.rope_(q, positions, cos, sin, interleaved)
        self.rope_(k, positions, cos, sin, interleaved)
        self.kv_write(cache, layer, batch, positions, k, v)
        return q

    def kv_write(self, cache: PagedKVCache, layer: int, batch: BatchKV, positions: "torch.Tensor",
                 k: "torch.Tensor", v: "torch.Tensor") -> None:
        # The engine reserved every block before scheduling these positions. The
        # kernel takes strided k and v (v is a view into the fused qkv output).
        self._attn.kv_write(cache.k[layer], cache.v[layer], batch.block_tables, positions,
                            k, v, batch.seq_ids, trusted=True)

    def embedding(self, table, ids: np.ndarray) -> "torch.Tensor":
        # The table stays on the host (one row per token is all a step needs).
        return torch.from_numpy(embedding_rows(table, ids)).to(self.device, self.dtype)

    # ---------------------------------------------------------- KV storage
    @property
    def kv_itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def kv_pool(self, shape: tuple[int, ...]) -> "torch.Tensor":
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def kv_commit(self, pool: "torch.Tensor") -> None:
        """Nothing to do: torch.zeros has already allocated and written the pool."""

    # ------------------------------------------------------- array chores
    def forward_inputs(self, positions: np.ndarray, batch: BatchKV) -> tuple["torch.Tensor", DeviceBatch]:
        """Positions and block tables go to the device once per forward pass."""
        host_pos = torch.from_numpy(np.array(positions, dtype=np.int32))
        host_seq = torch.from_numpy(np.array(batch.seq_ids, dtype=np.int32))
        tables = torch.from_numpy(np.array(batch.block_tables, dtype=np.int32))
        dev = self.device
        return host_pos.to(dev), DeviceBatch(tables.to(dev), host_seq.to(dev), host_pos, host_seq)

    def contiguous(self, x: "torch.Tensor") -> "torch.Tensor":
        return x.contiguous()

    def linear_stack(self, x: "torch.Tensor", parts: tuple, prefetch=None) -> "torch.Tensor":
        """x @ [W_0; W_1; ...].T for matrices of different formats, outputs side by side."""
        return torch.cat([self.linear(x, w) for w in parts], dim=1)

    def layer_runner(self, model):
        """The model's layer loop as it is: each operation is already a kernel launch."""
        return model.layer_loop

    def to_host(self, x: "torch.Tensor") -> np.ndarray:
        return x.float().cpu().numpy()
