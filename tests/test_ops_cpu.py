"""Correctness of the C++ CPU kernels (runtime._C) against NumPy references.

Every op is checked for every SIMD path this CPU has (plain is the
reference implementation in C++) with 1 and 2 threads, over shapes chosen to
hit vector tails (K not a multiple of 8/16/32), odd N and M not a multiple of
the 4-row block.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

import ref_ops as ref
from runtime import _C

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
ISAS = _C.available_isas()
ISA_THREADS = [(isa, nt) for isa in ISAS for nt in (1, 2)]


@pytest.fixture(params=ISA_THREADS, ids=[f"{i}-t{n}" for i, n in ISA_THREADS])
def isa_threads(request):
    old_isa, old_nt = _C.isa(), _C.get_num_threads()
    isa, nt = request.param
    _C.set_isa(isa)
    _C.set_num_threads(nt)
    yield request.param
    _C.set_isa(old_isa)
    _C.set_num_threads(old_nt)


def rng_for(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))  # stable across runs


def assert_close_scaled(got, want, scale, rtol, what):
    """|got - want| <= rtol * scale elementwise (scale: magnitude of the summed terms)."""
    err = np.abs(got.astype(np.float64) - want)
    bound = rtol * scale + 1e-30
    bad = err > bound
    assert not bad.any(), (
        f"{what}: {bad.sum()} of {bad.size} elements off; worst err {err.max():.3g}, "
        f"worst err/bound {(err / bound).max():.3g}"
    )


# ------------------------------------------------------------------ linear --

LINEAR_SHAPES = [  # (M, N, K)
    (1, 1, 1), (1, 3, 7), (1, 5, 8), (1, 7, 15), (1, 2, 16), (1, 9, 17), (1, 4, 31), (1, 33, 33),
    (1, 5, 64), (1, 3, 65), (1, 31, 577), (1, 1001, 577), (1, 6, 4100),
    (3, 5, 1), (3, 7, 33), (4, 9, 16), (5, 3, 7), (5, 301, 577), (17, 5, 33), (17, 33, 64),
    (3, 4, 129), (30, 37, 4100),  # M=30, K=4100: several x tiles
]


@pytest.mark.parametrize("wdtype", ["float32", "float16"])
def test_linear(isa_threads, wdtype):
    for M, N, K in LINEAR_SHAPES:
        rng = rng_for("linear", M, N, K, wdtype)
        x = rng.standard_normal((M, K)).astype(np.float32)
        w = rng.standard_normal((N, K)).astype(wdtype)
        y = _C.linear(x, w)
        assert y.dtype == np.float32 and y.shape == (M, N)
        assert_close_scaled(y, ref.linear(x, w), ref.linear_abs(x, w), 1e-5,
                            f"linear {isa_threads} w={wdtype} M={M} N={N} K={K}")


def test_linear_out_param(isa_threads):
    rng = rng_for("linear-out")
    x = rng.standard_normal((5, 33)).astype(np.float32)
    w = rng.standard_normal((7, 33)).astype(np.float16)
    out = np.full((5, 7), np.nan, dtype=np.float32)
    y = _C.linear(x, w, out=out)
    assert y is out
    assert_close_scaled(out, ref.linear(x, w), ref.linear_abs(x, w), 1e-5, "linear out=")


def test_linear_empty():
    x = np.zeros((0, 5), np.float32)
    assert _C.linear(x, np.ones((3, 5), np.float32)).shape == (0, 3)
    y = _C.linear(np.ones((2, 0), np.float32), np.ones((3, 0), np.float16))
    np.testing.assert_array_equal(y, np.zeros((2, 3), np.float32))


def all_finite_halves() -> np.ndarray:
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    h = bits.view(np.float16)
    return h[np.isfinite(h)]


def test_linear_f16_conversion_exact(isa_threads):
    """Every finite half (subnormals included) converts exactly, in SIMD and tail code."""
    h = all_finite_halves()
    h = h[: h.size // 16 * 16]
    want = h.astype(np.float32)
    # K=1: scalar/tail conversion; y[0, n] = 1 * w[n, 0].
    y = _C.linear(np.ones((1, 1), np.float32), h.reshape(-1, 1))
    np.testing.assert_array_equal(y[0], want)
    # K=16, M=16 identity: the row-conversion path used for M > 1.
    w = h.reshape(-1, 16)
    y = _C.linear(np.eye(16, dtype=np.float32), w)
    np.testing.assert_array_equal(y, w.astype(np.float32).T)
    # K=16, M=1 with one-hot x: the fused M=1 dot path, one column at a time.
    w = np.ascontiguousarray(h[: 16 * 2048].reshape(-1, 16))
    for j in (0, 5, 15):
        x = np.zeros((1, 16), np.float32)
        x[0, j] = 1.0
        np.testing.assert_array_equal(_C.linear(x, w)[0], w[:, j].astype(np.float32))


@pytest.mark.parametrize("K", [1, 40])
def test_linear_f16_inf_nan(isa_threads, K):
    x = np.ones((1, K), np.float32)
    w = np.zeros((3, K), np.float16)
    w[0, K - 1] = np.inf
    w[1, 0] = -np.inf
    w[2, K // 2] = np.nan
    y = _C.linear(x, w)[0]
    assert y[0] == np.inf and y[1] == -np.inf and np.isnan(y[2])


# -------------------------------------------------------- small elementwise --

@pytest.mark.parametrize("M,D", [(1, 1), (3, 7), (5, 576), (17, 33), (64, 4096)])
def test_rms_norm(isa_threads, M, D):
    rng = rng_for("rms", M, D)
    x = (rng.standard_normal((M, D)) * 30).astype(np.float32)
    w = rng.standard_normal(D).astype(np.float32)
    for eps in (1e-5, 1e-6):
        want = ref.rms_norm(x, w, eps)
        y = _C.rms_norm(x, w, eps)
        assert y.shape == (M, D) and y.dtype == np.float32
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("M,D", [(1, 15), (3, 16), (2, 33), (17, 576), (16, 5632)])
def test_rms_norm_same_bits_on_every_isa(M, D):
    """Every ISA sums the squares in the same order (norm.cpp), so they agree exactly;
    D off a multiple of 16 takes the scalar tail."""
    rng = rng_for("rms-isa", M, D)
    x = (rng.standard_normal((M, D)) * 30).astype(np.float32)
    w = rng.standard_normal(D).astype(np.float32)
    old = _C.isa()
    try:
        outs = {}
        for isa in _C.available_isas():
            _C.set_isa(isa)
            outs[isa] = _C.rms_norm(x, w, 1e-5)
    finally:
        _C.set_isa(old)
    for isa, y in outs.items():
        np.testing.assert_array_equal(y, outs["plain"], err_msg=isa)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("T,H,Dh,R", [(1, 1, 8, 8), (5, 3, 64, 64), (7, 2, 64, 32), (3, 4, 10, 4),
                                      (33, 9, 128, 128), (2, 1, 6, 6)])
def test_rope(isa_threads, interleaved, T, H, Dh, R):
    rng = rng_for("rope", T, H, Dh, R, interleaved)
    P = 50
    cos, sin = ref.rope_tables(P, R)
    x = rng.standard_normal((T, H, Dh)).astype(np.float32)
    pos = rng.integers(0, P, size=T).astype(np.int32)
    want = ref.rope(x, pos, cos, sin, interleaved)
    x0 = x.copy()
    assert _C.rope_(x, pos, cos, sin, interleaved) is None
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(x[..., R:], x0[..., R:])  # partial rotary: untouched


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("Dh,R", [(64, 64), (128, 128), (80, 48), (64, 40), (6, 6)])
def test_rope_every_isa_gives_the_plain_floats(interleaved, Dh, R):
    """The SIMD rotation rounds each product and sum as the plain loop does (no
    fused multiply-add): the same bits on every path, vector tails included."""
    rng = rng_for("rope-isa", Dh, R, interleaved)
    cos, sin = ref.rope_tables(40, R)
    x = (rng.standard_normal((7, 5, Dh)) * 30).astype(np.float32)
    pos = rng.integers(0, 40, size=7).astype(np.int32)
    outs = {}
    old = _C.isa()
    try:
        for isa in ISAS:
            _C.set_isa(isa)
            y = x.copy()
            _C.rope_(y, pos, cos, sin, interleaved)
            outs[isa] = y
    finally:
        _C.set_isa(old)
    for isa, y in outs.items():
        np.testing.assert_array_equal(y, outs["plain"], err_msg=isa)


def test_rope_layouts_differ():
    cos, sin = ref.rope_tables(4, 8)
    x = np.arange(8, dtype=np.float32).reshape(1, 1, 8)
    a, b = x.copy(), x.copy()
    pos = np.array([3], np.int32)
    _C.rope_(a, pos, cos, sin, False)
    _C.rope_(b, pos, cos, sin, True)
    assert not np.allclose(a, b)


@pytest.mark.parametrize("M,F", [(1, 1), (3, 7), (5, 1536), (17, 33)])
def test_silu_mul(isa_threads, M, F):
    rng = rng_for("silu", M, F)
    g = (rng.standard_normal((M, F)) * 5).astype(np.float32)
    g.flat[0] = -1e4  # exp overflows: must give -0, not nan
    if g.size > 1:
        g.flat[1] = 1e4
    u = rng.standard_normal((M, F)).astype(np.float32)
    y = _C.silu_mul(g, u)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, ref.silu_mul(g, u), rtol=1e-5, atol=1e-6)
    # the halves of a fused [M, 2F] gate|up product, passed as row-strided views
    gu = np.concatenate([g, u], axis=1)
    np.testing.assert_array_equal(_C.silu_mul(gu[:, :F], gu[:, F:]), y)
    # rows that are not contiguous are refused, not misread
    if F > 1:
        wide = np.repeat(g, 2, axis=1)
        with pytest.raises(ValueError, match=r"silu_mul: gate must have contiguous rows"):
            _C.silu_mul(wide[:, ::2], u)


@pytest.mark.parametrize("M,N", [(1, 1), (3, 7), (5, 1000), (17, 49152)])
def test_softmax(isa_threads, M, N):
    rng = rng_for("softmax", M, N)
    x = (rng.standard_normal((M, N)) * 10 + 1e4).astype(np.float32)  # large offset: needs max-subtraction
    want = ref.softmax(x)
    assert _C.softmax_(x) is None
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(x.sum(axis=1), 1.0, rtol=1e-5)


# --------------------------------------------------------------- attention --

ATTN_CASES = [  # (Hq, Hkv, Dh, block_size, prefix_len, T)
    (4, 4, 64, 16, 36, 1),     # MHA decode, 37 keys (not a multiple of 16)
    (9, 3, 64, 16, 21, 7),     # GQA 9/3 prefill continuing a 21-token prefix
    (9, 3, 40, 16, 0, 19),     # GQA prefill from scratch, Dh not a multiple of 16
    (2, 1, 7, 16, 44, 1),      # tiny odd head dim, MQA decode
    (4, 2, 128, 16, 100, 3),   # larger head dim
    (3, 3, 16, 5, 11, 4),      # odd block size
    (32, 4, 64, 16, 70, 1),    # TinyLlama-shape decode: 8 heads per kv head in one item
    (8, 1, 64, 16, 50, 1),     # MQA decode: the group cut in two items of 4 heads for 2 threads
    (6, 1, 32, 16, 300, 1),    # MQA decode, items of 3 heads (enough keys for 2 threads)
    (3, 1, 64, 16, 400, 1),    # MQA decode, 3 heads: 2 do not divide the group, items of 1
]


# The cache holds float32 or float16 (the runtime's default); a float16 cache is
# checked against the reference on the float16-rounded keys and values.
KV_DTYPES = [np.float32, np.float16]


def as_kv(dtype, *arrays):
    """The cache arrays in `dtype` and the values the kernel then sees, in float32."""
    return [a.astype(dtype) for a in arrays], [a.astype(dtype).astype(np.float32) for a in arrays]


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=["f32", "f16"])
@pytest.mark.parametrize("case", ATTN_CASES, ids=[str(c) for c in ATTN_CASES])
def test_paged_attention(isa_threads, case, kv_dtype):
    hq, hkv, dh, bs, prefix, T = case
    c = ref.single_sequence_case(rng_for("attn", case), *case)
    q, qpos, table = c["q"], c["positions"], c["block_table"]
    (k_cache, v_cache), _ = as_kv(kv_dtype, c["k_cache"], c["v_cache"])
    _, (k_seq, v_seq) = as_kv(kv_dtype, c["k_seq"], c["v_seq"])
    scale = 1.0 / np.sqrt(dh)
    out = _C.paged_attention(q, k_cache, v_cache, table, qpos, scale)
    assert out.shape == (T, hq, dh) and out.dtype == np.float32
    want = ref.attention(q, k_seq, v_seq, qpos, scale)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=2e-5 * np.abs(v_seq).max())


BATCH_CASES = [  # (Hq, Hkv, Dh, block_size, [(prefix_len, new_tokens) per sequence])
    (4, 2, 64, 16, [(36, 1), (0, 1), (15, 1), (16, 1)]),          # batched decode, edge lengths
    (9, 3, 40, 16, [(21, 7), (3, 1), (0, 19)]),                   # prefill chunks mixed with decode
    (2, 1, 7, 5, [(11, 4), (44, 1), (0, 1), (9, 2), (4, 6)]),     # odd block size and head dim
    (8, 2, 64, 16, [(30 + 7 * i, 1) for i in range(9)]),          # 9 decode streams, 4 heads per kv head
    (6, 3, 32, 16, [(17 + 5 * i, 1) for i in range(6)]),          # Dh 32, 2 heads per kv head
    (6, 2, 96, 16, [(40, 1), (8, 3), (23, 1), (0, 9)]),            # Dh 96, 3 heads per kv head
    (10, 2, 128, 8, [(25, 1), (12, 1), (3, 4), (31, 1)]),         # Dh 128, 5 heads per kv head
]


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=["f32", "f16"])
@pytest.mark.parametrize("case", BATCH_CASES, ids=[str(c[:4]) for c in BATCH_CASES])
def test_paged_attention_batch(isa_threads, case, kv_dtype):
    """Many sequences in one call: block_table [S, nb] + seq_ids, blocks interleaved in one pool."""
    hq, hkv, dh, bs, seqs = case
    rng = rng_for("attn-batch", case[:4], len(seqs))
    lens = [p + n for p, n in seqs]
    tables_len = max(-(-L // bs) for L in lens) + 1       # ragged rows padded with junk
    nblocks = sum(-(-L // bs) for L in lens) + 4
    perm = rng.permutation(nblocks).astype(np.int32)
    k_cache = (rng.standard_normal((nblocks, hkv, bs, dh)) * 100).astype(np.float32)
    v_cache = (rng.standard_normal((nblocks, hkv, bs, dh)) * 100).astype(np.float32)
    tables = np.full((len(seqs), tables_len), -7, np.int32)
    q_parts, pos_parts, sid_parts, want = [], [], [], []
    used = 0
    for i, ((prefix, n), L) in enumerate(zip(seqs, lens)):
        nb = -(-L // bs)
        tables[i, :nb] = perm[used:used + nb]
        used += nb
        _, (k_seq, v_seq) = as_kv(kv_dtype, rng.standard_normal((L, hkv, dh)),
                                  rng.standard_normal((L, hkv, dh)))
        for p in range(L):
            k_cache[tables[i, p // bs], :, p % bs] = k_seq[p]
            v_cache[tables[i, p // bs], :, p % bs] = v_seq[p]
        q = (rng.standard_normal((n, hq, dh)) * 2).astype(np.float32)
        qpos = np.arange(prefix, L, dtype=np.int32)
        q_parts.append(q)
        pos_parts.append(qpos)
        sid_parts.append(np.full(n, i, np.int32))
        want.append(ref.attention(q, k_seq, v_seq, qpos, 1 / np.sqrt(dh)))
    # Interleave the tokens of different sequences: the kernel must not assume runs.
    order = rng.permutation(sum(n for _, n in seqs))
    q = np.ascontiguousarray(np.concatenate(q_parts)[order])
    (k_cache, v_cache), _ = as_kv(kv_dtype, k_cache, v_cache)
    out = _C.paged_attention(q, k_cache, v_cache, tables, np.concatenate(pos_parts)[order],
                             1 / np.sqrt(dh), np.concatenate(sid_parts)[order])
    np.testing.assert_allclose(out, np.concatenate(want)[order], rtol=1e-5, atol=2e-5)


def test_paged_attention_batch_bad_inputs():
    a = attn_args(block_table=np.array([[2, 0], [1, 0]], np.int32))
    with pytest.raises(ValueError, match=r"2-D block_table with 2 rows needs seq_ids"):
        _C.paged_attention(**a)
    with pytest.raises(ValueError, match=r"seq_ids\[0\] = 2 is out of range \[0, 2\)"):
        _C.paged_attention(**a, seq_ids=np.array([2], np.int32))
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = 3 is out of range"):
        _C.paged_attention(**{**a, "block_table": np.array([[2, 0], [1, 3]], np.int32)},
                           seq_ids=np.array([1], np.int32))
    with pytest.raises(ValueError, match=r"seq_ids has shape \(2,\), expected \[1\]"):
        _C.paged_attention(**a, seq_ids=np.array([0, 1], np.int32))


def test_paged_write_matches_numpy_scatter():
    k_cache, v_cache, tables, seq_ids, pos, k, v = ref.paged_write_case(rng_for("paged-write"))
    bs = k_cache.shape[2]
    want_k, want_v = k_cache.copy(), v_cache.copy()
    blocks = tables[seq_ids, pos // bs]
    want_k[blocks, :, pos % bs] = k
    want_v[blocks, :, pos % bs] = v
    _C.paged_write(k_cache, v_cache, tables, seq_ids, pos, k, v)
    np.testing.assert_array_equal(k_cache, want_k)
    np.testing.assert_array_equal(v_cache, want_v)
    with pytest.raises(ValueError, match=r"positions\[0\] = 15 is outside the 3 blocks"):
        _C.paged_write(k_cache, v_cache, tables, seq_ids[:1], np.array([15], np.int32), k[:1], v[:1])
    with pytest.raises(ValueError, match=r"seq_ids\[0\] = 2 is out of range"):
        _C.paged_write(k_cache, v_cache, tables, np.array([2], np.int32), pos[:1], k[:1], v[:1])
    with pytest.raises(ValueError, match=r"block 9 for token 0 is out of range"):
        _C.paged_write(k_cache, v_cache, np.array([[9]], np.int32), np.array([0], np.int32),
                       np.array([0], np.int32), k[:1], v[:1])
    with pytest.raises(ValueError, match=r"paged_write: k has shape"):
        _C.paged_write(k_cache, v_cache, tables, seq_ids, pos, k[:, :2].copy(), v)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=["f32", "f16"])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("hq,R", [(3, 6), (6, 4), (9, 2)])
def test_rope_write_equals_rope_then_paged_write(isa_threads, kv_dtype, interleaved, hq, R):
    """The fused q/k/v rows: q rotated out, k rotated and v into the cache, the same
    floats as rope_ on q and k and then paged_write (full and partial rotary dims,
    grouped heads, tokens of two sequences interleaved, rows of a wider array)."""
    k_cache, v_cache, tables, seq_ids, pos, _, _ = ref.paged_write_case(rng_for("rope-write", hq, R))
    k_cache, v_cache = k_cache.astype(kv_dtype), v_cache.astype(kv_dtype)
    T, hkv, dh = len(pos), k_cache.shape[1], k_cache.shape[3]
    cos, sin = ref.rope_tables(20, R)
    wide = rng_for("rope-write-qkv", hq).standard_normal((T, (hq + 2 * hkv) * dh + 3)).astype(np.float32)
    qkv = wide[:, :-3]                                    # rows 3 floats apart from the next
    q = qkv[:, :hq * dh].reshape(T, hq, dh).copy()
    k = qkv[:, hq * dh:(hq + hkv) * dh].reshape(T, hkv, dh).copy()
    v = qkv[:, (hq + hkv) * dh:].reshape(T, hkv, dh).copy()
    _C.rope_(q, pos, cos, sin, interleaved)
    _C.rope_(k, pos, cos, sin, interleaved)
    want_k, want_v = k_cache.copy(), v_cache.copy()
    _C.paged_write(want_k, want_v, tables, seq_ids, pos, k, v)
    before = qkv.copy()
    got = _C.rope_write(qkv, hq, pos, cos, sin, interleaved, k_cache, v_cache, tables, seq_ids)
    assert got.shape == (T, hq, dh) and got.dtype == np.float32
    np.testing.assert_array_equal(got, q)
    np.testing.assert_array_equal(k_cache, want_k)
    np.testing.assert_array_equal(v_cache, want_v)
    np.testing.assert_array_equal(qkv, before)              # its input is left as it was


def test_rope_write_bad_input():
    k_cache, v_cache, tables, seq_ids, pos, _, _ = ref.paged_write_case(rng_for("rope-write-bad"))
    cos, sin = ref.rope_tables(20, 6)
    qkv = np.zeros((5, 9 * 7), np.float32)                  # hq 3 + 2 * 3 kv heads of 7
    call = lambda **kw: _C.rope_write(**{**dict(qkv=qkv, hq=3, positions=pos, cos=cos, sin=sin,
                                                interleaved=False, k_cache=k_cache, v_cache=v_cache,
                                                block_table=tables, seq_ids=seq_ids), **kw})
    call()
    cases = [
        (dict(hq=4), r"hq = 4 query heads must be a positive multiple of the cache's 3 kv heads"),
        (dict(qkv=qkv[:, :-7].copy()), r"rope_write: qkv has shape \(5, 56\)"),
        (dict(qkv=qkv[:, ::2]), r"rope_write: qkv must have contiguous rows"),
        (dict(positions=np.array([9, 0, 12, 5, 20], np.int32)), r"positions\[4\] = 20 is out of range"),
        (dict(cos=ref.rope_tables(20, 8)[0], sin=ref.rope_tables(20, 8)[1]), r"rotary dim R = 2\*cos.shape\[1\] = 8 exceeds head dim Dh = 7 of the cache"),
        (dict(seq_ids=np.array([1, 0, 0, 1, 2], np.int32)), r"seq_ids\[4\] = 2 is out of range"),
        (dict(positions=np.array([9, 0, 12, 5, 15], np.int32)), r"positions\[4\] = 15 is outside the 3 blocks"),
        (dict(v_cache=v_cache.astype(np.float16)), r"v_cache must be float32 like k_cache"),
        (dict(seq_ids=seq_ids[:4].copy()), r"rope_write: seq_ids has shape"),
    ]
    for kw, frag in cases:
        with pytest.raises(ValueError, match=frag):
            call(**kw)


@pytest.mark.parametrize("isa", ISAS)
def test_paged_write_f16_rounds_like_numpy(isa):
    """A float16 cache gets numpy's astype(float16) bit for bit: ties to even,
    overflow to inf, subnormals, signed zeros, inf and nan; SIMD and tail lanes."""
    k_cache, v_cache, tables, seq_ids, pos, k, v = ref.paged_write_case(rng_for("paged-write-f16"))
    special = np.array([65504, 65519.99, 65520, 7e4, -7e4, 1e-5, 6.1e-5, 6.0e-5, 5.96e-8,
                        2.9802322e-08, 2.99e-8, 1e-9, -0.0, np.inf, -np.inf, 1 + 2**-11,
                        1 + 3 * 2**-11, 2049, 2051, -3.3e-6, 0.1, 1 / 3], np.float32)
    k.reshape(-1)[:special.size] = special
    v.reshape(-1)[-special.size:] = special[::-1]
    k_cache, v_cache = k_cache.astype(np.float16), v_cache.astype(np.float16)
    bs = k_cache.shape[2]
    want_k, want_v = k_cache.copy(), v_cache.copy()
    blocks = tables[seq_ids, pos // bs]
    with np.errstate(over="ignore"):  # 7e4 overflows to inf, as it must
        want_k[blocks, :, pos % bs] = k.astype(np.float16)
        want_v[blocks, :, pos % bs] = v.astype(np.float16)
    old = _C.isa()
    _C.set_isa(isa)
    try:
        _C.paged_write(k_cache, v_cache, tables, seq_ids, pos, k, v)
    finally:
        _C.set_isa(old)
    np.testing.assert_array_equal(k_cache.view(np.uint16), want_k.view(np.uint16))
    np.testing.assert_array_equal(v_cache.view(np.uint16), want_v.view(np.uint16))
    # nan stays nan (numpy and the hardware agree on the quiet bit, not always the payload)
    k2 = np.full_like(k, np.nan)
    _C.paged_write(k_cache, v_cache, tables, seq_ids, pos, k2, v)
    assert np.isnan(k_cache[blocks, :, pos % bs]).all()


@pytest.mark.parametrize("over,match", [
    (dict(k_cache=np.zeros((3, 2, 16, 8), np.int8)), r"k_cache must be float32 or float16, got int8"),
    (dict(v_cache=np.zeros((3, 2, 16, 8), np.float16)), r"v_cache must be float32 like k_cache, got float16"),
    (dict(k_cache=np.zeros((3, 2, 16, 8), np.float16)), r"v_cache must be float16 like k_cache, got float32"),
])
def test_paged_kv_dtype_mismatch(over, match):
    with pytest.raises(ValueError, match="paged_attention: " + match):
        _C.paged_attention(**attn_args(**over))
    a = attn_args(**over)
    with pytest.raises(ValueError, match="paged_write: " + match):
        _C.paged_write(a["k_cache"], a["v_cache"], np.array([[2, 0]], np.int32), np.zeros(1, np.int32),
                       np.zeros(1, np.int32), f32(1, 2, 8), f32(1, 2, 8))


def test_paged_attention_single_key_is_v():
    """Position 0 attends only to itself: the output is exactly v[0]."""
    rng = rng_for("attn-one")
    k_seq = rng.standard_normal((1, 2, 8)).astype(np.float32)
    v_seq = rng.standard_normal((1, 2, 8)).astype(np.float32)
    k_cache, v_cache, table = ref.make_paged_cache(k_seq, v_seq, 16, rng)
    q = rng.standard_normal((1, 4, 8)).astype(np.float32)
    out = _C.paged_attention(q, k_cache, v_cache, table, np.zeros(1, np.int32), 0.3)
    np.testing.assert_allclose(out[0], v_seq[0].repeat(2, axis=0), rtol=1e-6)


@pytest.mark.parametrize("top", [0, 5, 16, 37, 52])
def test_paged_attention_huge_scores(isa_threads, top):
    """Scores thousands apart: exp only stays finite if the softmax subtracts the
    true row max, wherever it lies (first lane, past a vector, in the tail)."""
    rng = rng_for("attn-huge", top)
    L, hq, hkv, dh = 53, 6, 2, 64
    k_seq = rng.standard_normal((L, hkv, dh)).astype(np.float32)
    v_seq = rng.standard_normal((L, hkv, dh)).astype(np.float32)
    q = rng.standard_normal((1, hq, dh)).astype(np.float32)
    # Key `top` alone lines up with every query head, far above the others.
    k_seq[top] = q[0].reshape(hkv, hq // hkv, dh).sum(axis=1)
    k_cache, v_cache, table = ref.make_paged_cache(k_seq * 40, v_seq, 16, rng)
    qpos = np.array([L - 1], np.int32)
    out = _C.paged_attention(q, k_cache, v_cache, table, qpos, 1.0)
    want = ref.attention(q, k_seq * 40, v_seq, qpos, 1.0)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------- bad input --

def f32(*shape):
    return np.zeros(shape, np.float32)


@pytest.mark.parametrize("call,match", [
    (lambda: _C.linear(np.zeros((2, 3)), f32(4, 3)), r"linear: x must be float32, got float64"),
    (lambda: _C.linear(f32(2, 3), np.zeros((4, 3), np.int32)), r"linear: w must be float32 or float16"),
    (lambda: _C.linear(f32(2, 3), f32(4, 5)), r"linear: w has shape \(4, 5\), expected \[4, 3\]"),
    (lambda: _C.linear(f32(3), f32(4, 3)), r"linear: x must be 2-D \[M, K\], got shape \(3,\)"),
    (lambda: _C.linear(f32(2, 6)[:, ::2], f32(4, 3)), r"linear: x must be C-contiguous"),
    (lambda: _C.linear(f32(2, 3), f32(3, 4).T), r"linear: w must be C-contiguous"),
    (lambda: _C.linear(f32(2, 3), f32(4, 3), out=f32(4, 2)), r"linear: out has shape \(4, 2\), expected \[2, 4\]"),
    (lambda: _C.linear(f32(2, 3), f32(4, 3), out=np.zeros((2, 4))), r"linear: out must be float32"),
    (lambda: _C.rms_norm(f32(2, 3), f32(4), 1e-5), r"rms_norm: weight has shape \(4,\), expected \[3\]"),
    (lambda: _C.rms_norm(f32(2, 3).astype(np.float16), f32(3), 1e-5), r"rms_norm: x must be float32"),
    (lambda: _C.silu_mul(f32(2, 3), f32(3, 2)), r"silu_mul: up has shape \(3, 2\), expected \[2, 3\]"),
    (lambda: _C.softmax_(f32(6)), r"softmax_: x must be 2-D"),
    (lambda: _C.rope_(f32(2, 1, 8), np.array([0, 4], np.int32), f32(4, 4), f32(4, 4), False),
     r"rope_: positions\[1\] = 4 is out of range \[0, 4\)"),
    (lambda: _C.rope_(f32(2, 1, 8), np.array([0, -1], np.int32), f32(4, 4), f32(4, 4), False),
     r"rope_: positions\[1\] = -1 is out of range"),
    (lambda: _C.rope_(f32(2, 1, 8), np.array([0, 1], np.int64), f32(4, 4), f32(4, 4), False),
     r"rope_: positions must be int32, got int64"),
    (lambda: _C.rope_(f32(2, 1, 6), np.array([0, 1], np.int32), f32(4, 4), f32(4, 4), True),
     r"rope_: rotary dim R = 2\*cos.shape\[1\] = 8 exceeds head dim Dh = 6"),
    (lambda: _C.rope_(f32(2, 1, 8), np.array([0, 1], np.int32), f32(4, 4), f32(4, 3), True),
     r"rope_: sin has shape \(4, 3\), expected \[4, 4\]"),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_in_place_ops_reject_read_only():
    x = f32(2, 3)
    x.flags.writeable = False
    with pytest.raises(ValueError, match="softmax_: x must be writeable"):
        _C.softmax_(x)


def attn_args(**over):
    a = dict(q=f32(1, 4, 8), k_cache=f32(3, 2, 16, 8), v_cache=f32(3, 2, 16, 8),
             block_table=np.array([2, 0], np.int32), q_positions=np.array([20], np.int32), scale=0.5)
    a.update(over)
    return a


@pytest.mark.parametrize("over,match", [
    (dict(q=f32(1, 3, 8)), r"Hq = 3 must be a multiple of kv heads Hkv = 2"),
    (dict(q_positions=np.array([32], np.int32)), r"position 32 needs block_table\[2\] but block_table has only 2"),
    (dict(q_positions=np.array([-1], np.int32)), r"q_positions\[0\] = -1 is negative"),
    (dict(block_table=np.array([0, 3], np.int32)), r"block_table\[1\] = 3 is out of range \[0, 3\)"),
    (dict(block_table=np.array([-1, 0], np.int32)), r"block_table\[0\] = -1 is out of range"),
    (dict(v_cache=f32(3, 2, 8, 8)), r"v_cache has shape \(3, 2, 8, 8\), expected \[3, 2, 16, 8\]"),
    (dict(k_cache=f32(3, 2, 16, 4)), r"k_cache has shape \(3, 2, 16, 4\), expected \[3, 2, 16, 8\]"),
    (dict(block_table=np.array([2, 0], np.int64)), r"block_table must be int32"),
    (dict(q_positions=np.array([1, 2], np.int32)), r"q_positions has shape \(2,\), expected \[1\]"),
])
def test_paged_attention_bad_inputs(over, match):
    with pytest.raises(ValueError, match=match):
        _C.paged_attention(**attn_args(**over))


def test_paged_attention_ignores_unneeded_table_entries():
    # Entries past the last needed block may hold anything (e.g. -1 padding).
    a = attn_args(block_table=np.array([2, 0, -1, 99], np.int32))
    assert _C.paged_attention(**a).shape == (1, 4, 8)


# ------------------------------------------------------- dispatch, threads --

def test_isa_selection():
    assert "plain" in ISAS
    assert _C.isa() in ISAS
    old = _C.isa()
    try:
        for isa in ISAS:
            _C.set_isa(isa)
            assert _C.isa() == isa
        with pytest.raises(ValueError, match="unknown ISA 'bogus'"):
            _C.set_isa("bogus")
        missing = [i for i in ("plain", "neon", "avx2", "avx512") if i not in ISAS]
        for isa in missing:
            with pytest.raises(ValueError, match="not supported by this CPU"):
                _C.set_isa(isa)
    finally:
        _C.set_isa(old)


def test_threads():
    old = _C.get_num_threads()
    try:
        _C.set_num_threads(3)
        assert _C.get_num_threads() == 3
        with pytest.raises(ValueError, match="set_num_threads"):
            _C.set_num_threads(0)
    finally:
        _C.set_num_threads(old)


def _import_with_env(value):
    env = dict(os.environ, LINGLI_ISA=value)
    return subprocess.run([sys.executable, "-c", "from runtime import _C; print(_C.isa())"],
                          env=env, capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_env_isa():
    r = _import_with_env("plain")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "plain"
    r = _import_with_env("bogus")
    assert r.returncode != 0
    assert "LINGLI_ISA: unknown ISA 'bogus'" in r.stderr


def test_read_bandwidth():
    bw = _C.read_bandwidth(8 << 20, 2)
    assert 0.1 < bw < 10000
    with pytest.raises(ValueError, match="repeats"):
        _C.read_bandwidth(1 << 20, 0)


def test_vnni_peak():
    """The compute probe: a positive rate on a CPU with AVX-512 VNNI, 0.0 elsewhere."""
    vnni = False
    if "avx512" in _C.available_isas():  # the quantized kernels take VNNI only on VNNI CPUs
        old = _C.isa()
        try:
            _C.set_isa("avx512")
            vnni = _C.qlinear_path() == "avx512_vnni"
        finally:
            _C.set_isa(old)
    peak = _C.vnni_peak(1)
    if vnni:
        assert 10 < peak < 100000          # GOP/s: one thread of any VNNI core
        assert _C.vnni_peak(2) > 0.5 * peak  # two threads never slower than one of them
    else:
        assert peak == 0.0
    with pytest.raises(ValueError, match="threads"):
        _C.vnni_peak(0)


# ------------------------------------------------------ aarch64 portability --

KERNEL_SOURCES = sorted(p for p in CSRC.glob("*.cpp") if p.name != "bindings.cpp")
CROSS = shutil.which("aarch64-linux-gnu-g++")


@pytest.mark.skipif(CROSS is None, reason="aarch64-linux-gnu-g++ not installed")
def test_kernels_compile_for_aarch64():
    """The kernel files (no Python headers) must compile for aarch64 (NEON paths)."""
    for src in KERNEL_SOURCES:
        r = subprocess.run([CROSS, "-std=c++17", "-O2", "-fopenmp", "-Wall", "-fsyntax-only",
                            f"-I{CSRC}", str(src)], capture_output=True, text=True)
        assert r.returncode == 0, f"{src.name}:\n{r.stderr}"


NEON_DRIVER = r"""
#include <cmath>
#include <cstdio>
#include <vector>
#include "cpu_features.h"
#include "ops.h"
using namespace lingli;
static uint32_t s = 12345;
static uint32_t next() { return s = s * 1664525u + 1013904223u; }
static float rnd() { return ((next() >> 8) / 16777216.0f) * 2.f - 1.f; }
int main() {
    if (!cpu_has(Isa::Neon)) { std::puts("no neon"); return 2; }
    const int64_t shapes[][3] = {{1, 1, 1}, {1, 5, 7}, {3, 3, 33}, {5, 17, 577}, {17, 4, 64}, {1, 33, 4100}};
    double worst = 0;
    for (auto& sh : shapes) {
        const int64_t M = sh[0], N = sh[1], K = sh[2];
        std::vector<float> x(M * K), w(N * K), y[4];
        std::vector<uint16_t> wh(N * K);
        for (auto& v : x) v = rnd();
        for (auto& v : w) v = rnd();
        for (auto& v : wh) v = static_cast<uint16_t>(next() >> 16) & 0xbfffu;  // finite, |v| < 2
        for (auto& v : y) v.resize(M * N);
        for (int i = 0; i < 2; ++i) {
            set_isa(i ? Isa::Neon : Isa::Plain);
            linear_f32(x.data(), w.data(), y[i].data(), M, N, K);
            linear_f16(x.data(), wh.data(), y[2 + i].data(), M, N, K);
        }
        for (int64_t i = 0; i < M * N; ++i) {
            const double scale = std::sqrt(double(K)) + 1;
            worst = std::fmax(worst, std::fabs(y[0][i] - y[1][i]) / scale);
            worst = std::fmax(worst, std::fabs(y[2][i] - y[3][i]) / scale);
        }
    }
    set_isa(Isa::Neon);
    const double bw = read_bandwidth(1 << 20, 1);
    std::printf("neon-vs-plain worst scaled diff %.3g, bw %.3g GB/s\n", worst, bw);
    return worst < 1e-5 && bw > 0 ? 0 : 1;
}
"""


@pytest.mark.skipif(CROSS is None or shutil.which("qemu-aarch64") is None,
                    reason="needs aarch64-linux-gnu-g++ and qemu-aarch64")
def test_neon_linear_matches_plain_under_qemu(tmp_path):
    """Build the kernels for aarch64 and run NEON vs plain linear under qemu-user."""
    drv = tmp_path / "drv.cpp"
    drv.write_text(NEON_DRIVER)
    exe = tmp_path / "drv"
    srcs = [str(CSRC / n) for n in ("linear.cpp", "cpu_features.cpp", "membw.cpp")]
    r = subprocess.run([CROSS, "-std=c++17", "-O2", "-fopenmp", "-static", f"-I{CSRC}", str(drv),
                        *srcs, "-o", str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["qemu-aarch64", str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_kv_ranges_cover_the_blocks_attention_reads():
    """CpuBackend.kv_ranges: the byte spans of exactly the blocks a forward pass's
    attention reads (each sequence's blocks up to its last token's position),
    the same in every layer's K and V; none for a single token."""
    from runtime.backend_cpu import CpuBackend
    from runtime.kv_cache import BatchKV, PagedKVCache
    be = CpuBackend()
    cache = PagedKVCache(2, 30, 4, 3, 8, pool=be.kv_pool)
    tables = np.array([[7, 2, 9, 0], [11, 0, 0, 0], [5, 6, 1, 3]], np.int32)
    # seq 0 decodes at 9, seq 1 at 0; seq 2 runs a chunk at positions 4-12
    seq_ids = np.array([0, 1] + [2] * 9, np.int32)
    positions = np.array([9, 0] + list(range(4, 13)), np.int32)
    ranges = be.kv_ranges(cache, BatchKV(tables, seq_ids), positions)
    want = set()
    for s, p in zip(seq_ids, positions):
        want |= {int(tables[s, q // 4]) for q in range(p + 1)}
    assert sorted(want) == [1, 2, 3, 5, 6, 7, 9, 11]
    for layer in range(2):
        for a in (cache.k[layer], cache.v[layer]):
            spans = {(a[b].ctypes.data - a.ctypes.data, a[b].nbytes) for b in want}
            assert {tuple(r) for r in ranges.tolist()} == spans and len(ranges) == len(want)
    k, v, r = be.kv_prefetch(cache, 1, ranges)
    assert k is cache.k[1] and v is cache.v[1] and r is ranges
    assert be.kv_ranges(cache, BatchKV(tables[:1], seq_ids[:1]), positions[:1]) is None
    assert be.kv_prefetch(cache, 0, None) is None
