"""The portable quantized layouts (runtime/quant/formats.py): packing, sizes, error bounds."""
from __future__ import annotations

import numpy as np
import pytest

from runtime.quant.formats import (QuantizedTensor, bits_per_weight, concat_rows, from_codes,
                                   pack_int3, pack_int4, padded_k, quantize_rtn, unpack_int3,
                                   unpack_int4)
from runtime.quant.search import quantize_search

FORMATS = [(b, g) for b in (8, 4, 3) for g in (32, 64, 128)]
SHAPES = [(7, 100), (16, 576), (5, 1000), (3, 32)]

# Stated storage cost, bits per weight including f16 scales (and mins).
BITS_PER_WEIGHT = {
    (8, 32): 8.5, (8, 64): 8.25, (8, 128): 8.125,
    (4, 32): 5.0, (4, 64): 4.5, (4, 128): 4.25,
    (3, 32): 4.0, (3, 64): 3.5, (3, 128): 3.25,
}

# Largest relative RMS error ||W - deq(Q(W))|| / ||W|| for N(0, 1) weights, like
# ggml's test-quantize-fns table. Measured values (RTN / search, seed 0) are about
# 1/1.15 of these bounds (worst over SHAPES); a layout or rounding bug blows far past them.
MAX_REL_RMS = {
    "rtn": {(8, 32): 0.0062, (8, 64): 0.0067, (8, 128): 0.0074,
            (4, 32): 0.093, (4, 64): 0.104, (4, 128): 0.115,
            (3, 32): 0.198, (3, 64): 0.221, (3, 128): 0.243},
    "search": {(8, 32): 0.0060, (8, 64): 0.0066, (8, 128): 0.0073,
               (4, 32): 0.082, (4, 64): 0.094, (4, 128): 0.104,
               (3, 32): 0.168, (3, 64): 0.193, (3, 128): 0.210},
}


def _codes(rng, bits, n, kp):
    if bits == 8:
        return rng.integers(-127, 128, size=(n, kp)).astype(np.int8)
    return rng.integers(0, 1 << bits, size=(n, kp)).astype(np.uint8)


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("kp", [32, 64, 192, 1024])
def test_pack_unpack_round_trip(bits, kp):
    rng = np.random.default_rng(kp + bits)
    q = _codes(rng, bits, 5, kp)
    if bits == 4:
        p = pack_int4(q)
        assert p.shape == (5, kp // 2) and p.dtype == np.uint8
        np.testing.assert_array_equal(unpack_int4(p), q)
    else:
        ql, qh = pack_int3(q)
        assert ql.shape == (5, kp // 4) and qh.shape == (5, kp // 8)
        np.testing.assert_array_equal(unpack_int3(ql, qh), q)


def test_int4_layout_by_hand():
    # byte i of block b = q[32b+i] | q[32b+16+i] << 4
    q = np.zeros((1, 32), np.uint8)
    q[0, 3], q[0, 19] = 5, 9
    p = pack_int4(q)
    assert p[0, 3] == 5 | (9 << 4) and p.sum() == p[0, 3]


def test_int3_layout_by_hand():
    q = np.zeros((1, 32), np.uint8)
    q[0, 8 * 2 + 1] = 6          # j=2, i=1: low bits 2 at bits 5..4 of byte 1; high bit e=17
    ql, qh = pack_int3(q)
    assert ql[0, 1] == (6 & 3) << 4 and ql.sum() == ql[0, 1]
    word = int.from_bytes(qh[0, :4].tobytes(), "little")
    assert word == 1 << 17


@pytest.mark.parametrize("bits,g", FORMATS)
def test_from_codes_round_trip(bits, g):
    rng = np.random.default_rng(bits * g)
    n, k = 6, 200
    kp = padded_k(k, g)
    q = _codes(rng, bits, n, kp)
    s = rng.random((n, kp // g)).astype(np.float16)
    m = None if bits == 8 else rng.standard_normal((n, kp // g)).astype(np.float16)
    qt = from_codes(bits, g, (n, k), q, s, m)
    np.testing.assert_array_equal(qt.codes(), q)
    want = q.reshape(n, -1, g).astype(np.float32) * s.astype(np.float32)[:, :, None]
    if m is not None:
        want += m.astype(np.float32)[:, :, None]
    np.testing.assert_array_equal(qt.dequantize(), want.reshape(n, kp)[:, :k])
    np.testing.assert_array_equal(qt.take_rows(np.array([4, 1])), qt.dequantize()[[4, 1]])


@pytest.mark.parametrize("bits,g", FORMATS)
@pytest.mark.parametrize("shape", [(16, 576), (8, 1024)])
def test_byte_size_is_bits_per_weight(bits, g, shape):
    assert bits_per_weight(bits, g) == BITS_PER_WEIGHT[(bits, g)]
    n, k = shape
    qt = quantize_rtn(np.random.default_rng(0).standard_normal(shape).astype(np.float32), bits, g)
    kp = padded_k(k, g)
    assert qt.nbytes * 8 == BITS_PER_WEIGHT[(bits, g)] * n * kp


@pytest.mark.parametrize("method", ["rtn", "search"])
@pytest.mark.parametrize("bits,g", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_error_bound(method, bits, g, shape):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32)
    qt = (quantize_rtn if method == "rtn" else quantize_search)(w, bits, g)
    assert qt.shape == shape and qt.padded_k == padded_k(shape[1], g)
    deq = qt.dequantize()
    assert deq.shape == shape and deq.dtype == np.float32
    rel = np.linalg.norm(deq - w) / np.linalg.norm(w)
    assert rel < MAX_REL_RMS[method][(bits, g)], (method, bits, g, shape, rel)
    # padding codes are zero (they meet zero activations but must not hold garbage)
    k = shape[1]
    if k % g:
        assert not qt.codes()[:, k:].any()


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_constant_and_zero_groups(bits):
    w = np.zeros((3, 64), np.float32)
    w[1] = 0.5
    w[2, :32] = -2.0
    for qt in (quantize_rtn(w, bits, 32), quantize_search(w, bits, 32)):
        np.testing.assert_allclose(qt.dequantize(), w, atol=1e-3)


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_concat_rows(bits):
    rng = np.random.default_rng(bits)
    a = quantize_rtn(rng.standard_normal((5, 100)).astype(np.float32), bits, 32)
    b = quantize_rtn(rng.standard_normal((3, 100)).astype(np.float32), bits, 32)
    c = concat_rows([a, b])
    assert c.shape == (8, 100)
    np.testing.assert_array_equal(c.dequantize(), np.concatenate([a.dequantize(), b.dequantize()]))
    with pytest.raises(ValueError, match="same bits"):
        concat_rows([a, quantize_rtn(np.zeros((2, 96), np.float32), bits, 32)])
    with pytest.raises(ValueError, match="same bits"):
        concat_rows([a, quantize_rtn(np.zeros((2, 100), np.float32), bits, 64)])


def test_quantized_tensor_validation():
    n, k = 4, 64
    s = np.ones((n, 2), np.float16)
    with pytest.raises(ValueError, match="unsupported bit width 5"):
        QuantizedTensor(5, 32, (n, k), np.zeros((n, k), np.uint8), s)
    with pytest.raises(ValueError, match="unsupported group size 48"):
        QuantizedTensor(4, 48, (n, k), np.zeros((n, 32), np.uint8), s, s)
    with pytest.raises(ValueError, match=r"q: expected uint8 \(4, 32\)"):
        QuantizedTensor(4, 32, (n, k), np.zeros((n, 31), np.uint8), s, s)
    with pytest.raises(ValueError, match=r"q: expected int8"):
        QuantizedTensor(8, 32, (n, k), np.zeros((n, k), np.uint8), s)
    with pytest.raises(ValueError, match="scales: expected float16"):
        QuantizedTensor(8, 32, (n, k), np.zeros((n, k), np.int8), s.astype(np.float32))
    with pytest.raises(ValueError, match="mins is missing"):
        QuantizedTensor(4, 32, (n, k), np.zeros((n, 32), np.uint8), s)
    with pytest.raises(ValueError, match="qh is missing"):
        QuantizedTensor(3, 32, (n, k), np.zeros((n, 16), np.uint8), s, s)
    with pytest.raises(ValueError, match="int8 is symmetric"):
        QuantizedTensor(8, 32, (n, k), np.zeros((n, k), np.int8), s, s)
    with pytest.raises(ValueError, match="no high bit plane"):
        QuantizedTensor(4, 32, (n, k), np.zeros((n, 32), np.uint8), s, s,
                        np.zeros((n, 8), np.uint8))
    with pytest.raises(ValueError, match="2-D"):
        quantize_rtn(np.zeros(10, np.float32), 4, 32)
    with pytest.raises(ValueError, match="2-D"):
        quantize_search(np.zeros(10, np.float32), 4, 32)
