"""NumPy references for the kernels in runtime._C (computed in float64).

These define what the C++ kernels must compute; tests compare against them
with tolerances scaled to the magnitude of the terms being summed.
"""

from __future__ import annotations

import numpy as np


def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x[M,K] @ w[N,K].T with float16 weights upcast exactly (as the kernel does)."""
    return x.astype(np.float64) @ w.astype(np.float64).T


def linear_abs(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """|x| @ |w|.T: the scale of the rounding error of each output."""
    return np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    return x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps) * weight


def rope_tables(num_pos: int, rot_dim: int, base: float = 10000.0):
    """cos/sin tables [num_pos, rot_dim/2] in float32 (the usual inv_freq)."""
    inv_freq = 1.0 / (base ** (np.arange(0, rot_dim, 2, dtype=np.float64) / rot_dim))
    ang = np.arange(num_pos, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def rope(x, positions, cos, sin, interleaved: bool) -> np.ndarray:
    """Returns the rotated copy of x[T,H,Dh]; dims >= R = 2*cos.shape[1] pass through."""
    out = x.astype(np.float64).copy()
    half = cos.shape[1]
    c = cos[positions].astype(np.float64)[:, None, :]  # [T,1,R/2]
    s = sin[positions].astype(np.float64)[:, None, :]
    if interleaved:
        x1 = out[..., 0 : 2 * half : 2].copy()
        x2 = out[..., 1 : 2 * half : 2].copy()
        out[..., 0 : 2 * half : 2] = x1 * c - x2 * s
        out[..., 1 : 2 * half : 2] = x2 * c + x1 * s
    else:
        x1 = out[..., :half].copy()
        x2 = out[..., half : 2 * half].copy()
        out[..., :half] = x1 * c - x2 * s
        out[..., half : 2 * half] = x2 * c + x1 * s
    return out


def silu_mul(gate, up) -> np.ndarray:
    g = gate.astype(np.float64)
    with np.errstate(over="ignore"):  # exp(-g) -> inf for very negative g gives the right limit 0
        return g / (1.0 + np.exp(-g)) * up.astype(np.float64)


def softmax(x) -> np.ndarray:
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def make_paged_cache(k_seq, v_seq, block_size: int, rng, extra_blocks: int = 3):
    """Scatter contiguous k/v [L,Hkv,Dh] into a paged cache with a shuffled block table.

    Returns (k_cache, v_cache, block_table): caches [num_blocks,Hkv,block_size,Dh]
    filled with garbage outside the sequence, block_table int32 [ceil(L/bs)].
    """
    L, hkv, dh = k_seq.shape
    nb = -(-L // block_size)
    num_blocks = nb + extra_blocks
    table = rng.permutation(num_blocks)[:nb].astype(np.int32)
    k_cache = rng.standard_normal((num_blocks, hkv, block_size, dh)).astype(np.float32) * 100
    v_cache = rng.standard_normal((num_blocks, hkv, block_size, dh)).astype(np.float32) * 100
    for p in range(L):
        k_cache[table[p // block_size], :, p % block_size] = k_seq[p]
        v_cache[table[p // block_size], :, p % block_size] = v_seq[p]
    return k_cache, v_cache, table


def attention(q, k_seq, v_seq, q_positions, scale: float) -> np.ndarray:
    """Causal GQA attention: q[T,Hq,Dh] over contiguous k/v [L,Hkv,Dh]."""
    T, hq, dh = q.shape
    hkv = k_seq.shape[1]
    group = hq // hkv
    out = np.zeros((T, hq, dh))
    for t in range(T):
        n = int(q_positions[t]) + 1
        for h in range(hq):
            k = k_seq[:n, h // group].astype(np.float64)
            v = v_seq[:n, h // group].astype(np.float64)
            s = scale * (k @ q[t, h].astype(np.float64))
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ v
    return out


def paged_write_case(rng):
    """A KV write into a 9-block pool (Hkv 3, block 5, Dh 7): two sequences' tables,
    five tokens of both interleaved, some landing in a second or third block.
    Returns (k_cache, v_cache, tables, seq_ids, positions, k, v) as numpy arrays."""
    nblocks, hkv, bs, dh = 9, 3, 5, 7
    k_cache = rng.standard_normal((nblocks, hkv, bs, dh)).astype(np.float32)
    v_cache = rng.standard_normal((nblocks, hkv, bs, dh)).astype(np.float32)
    tables = np.array([[4, 0, 7], [2, 8, 1]], np.int32)
    seq_ids = np.array([1, 0, 0, 1, 1], np.int32)
    pos = np.array([9, 0, 12, 5, 14], np.int32)
    k = rng.standard_normal((5, hkv, dh)).astype(np.float32)
    v = rng.standard_normal((5, hkv, dh)).astype(np.float32)
    return k_cache, v_cache, tables, seq_ids, pos, k, v


def single_sequence_case(rng, hq: int, hkv: int, dh: int, block_size: int, prefix: int, T: int) -> dict:
    """One sequence's attention inputs: T query tokens after `prefix` cached ones.

    Returns q [T,Hq,Dh], its positions, the contiguous k_seq/v_seq [L,Hkv,Dh] (for
    ref.attention) and their paged k_cache/v_cache/block_table (make_paged_cache)."""
    L = prefix + T
    k_seq = rng.standard_normal((L, hkv, dh)).astype(np.float32)
    v_seq = rng.standard_normal((L, hkv, dh)).astype(np.float32)
    q = (rng.standard_normal((T, hq, dh)) * 2).astype(np.float32)
    k_cache, v_cache, table = make_paged_cache(k_seq, v_seq, block_size, rng)
    return dict(q=q, positions=np.arange(prefix, L, dtype=np.int32), k_seq=k_seq, v_seq=v_seq,
                k_cache=k_cache, v_cache=v_cache, block_table=table)
