"""The portable quantized layouts (runtime/quant/formats.py): packing, sizes, error bounds."""
from __future__ import annotations

import numpy as np
import pytest

from runtime.quant.formats import (SCALE_TABLE, QuantizedTensor, bits_per_weight, concat_rows,
                                   decode_group_params, encode_group_params, from_codes,
                                   pack_int3, pack_int4, padded_k, quantize_rtn,
                                   round_group_params, row_scales_of, unpack_int3, unpack_int4)
from runtime.quant.search import quantize_search

FORMATS = [(b, g) for b in (8, 4, 3) for g in (32, 64, 128)]
# int4/int3 in both group-parameter encodings; int8 has one
ENC_FORMATS = [(b, g, e) for b, g in FORMATS for e in (("codes",) if b == 8 else ("codes", "f16"))]
SHAPES = [(7, 100), (16, 576), (5, 1000), (3, 32)]

# Stated storage cost, bits per weight including the group parameters (int8: f16
# scales; int4/int3: a scale code and a min code), plus 32 bits per row (int4/int3).
BITS_PER_WEIGHT = {
    (8, 32): 8.5, (8, 64): 8.25, (8, 128): 8.125,
    (4, 32): 4.5, (4, 64): 4.25, (4, 128): 4.125,
    (3, 32): 3.5, (3, 64): 3.25, (3, 128): 3.125,
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


def _group_params(rng, n, ng):
    """Random representable int4/int3 parameters: codes, row scales and their (s, m)."""
    sc = rng.integers(0, 256, size=(n, ng)).astype(np.uint8)
    mc = rng.integers(-128, 128, size=(n, ng)).astype(np.int8)
    rs = (rng.random(n) * 10.0 ** rng.integers(-4, 3, size=n)).astype(np.float32)
    return sc, mc, rs, *decode_group_params(sc, mc, rs)


def test_scale_table_is_the_log_grid():
    c = np.arange(256)
    assert SCALE_TABLE.dtype == np.float32 and SCALE_TABLE[255] == 1.0
    np.testing.assert_allclose(SCALE_TABLE, 2.0 ** ((c - 255) / 16), rtol=6e-8)   # one f32 rounding
    # exact powers of two apart every 16 codes (the kernels add to the exponent)
    np.testing.assert_array_equal(SCALE_TABLE[16:], SCALE_TABLE[:-16] * np.float32(2))


def test_group_params_encode_decode():
    rng = np.random.default_rng(3)
    sc, mc, rs, s, m = _group_params(rng, 40, 30)
    got_sc, got_mc = encode_group_params(s, m, rs)
    np.testing.assert_array_equal(got_sc, sc)
    np.testing.assert_array_equal(got_mc, mc)
    np.testing.assert_array_equal(m, (s * mc.astype(np.float32)) * np.float32(0.125))
    # arbitrary values round to within half a step: 2^(1/32) - 1 for s, s/16 for m
    rs = np.full(200, 1.0, np.float32)
    s0 = 2.0 ** rng.uniform(-10, 0, size=(200, 8))
    m0 = -s0 * rng.uniform(0, 15, size=s0.shape)
    s1, m1 = round_group_params(s0, m0, rs)
    assert np.max(np.abs(np.log2(s1 / s0))) <= 1 / 32 + 1e-6
    assert np.all(np.abs(m1 - m0) <= s1 / 16 * (1 + 1e-6))
    # a min beyond 16 steps raises the scale until it is reachable
    s2, m2 = round_group_params(np.array([[1e-3]]), np.array([[-2.0]]), np.array([1.0]))
    assert s2[0, 0] >= 2.0 / 16 * (1 - 1e-6) and abs(m2[0, 0] + 2.0) <= s2[0, 0] / 16
    # an all-zero row (row scale 0) stays zero
    s3, m3 = round_group_params(np.zeros((1, 3)), np.zeros((1, 3)), np.zeros(1, np.float32))
    assert not s3.any() and not m3.any()


def test_from_codes_rejects_parameters_off_the_grid():
    rng = np.random.default_rng(4)
    _, _, rs, s, m = _group_params(rng, 3, 2)
    q = _codes(rng, 4, 3, 64)
    from_codes(4, 32, (3, 64), q, s, m, rs)
    with pytest.raises(ValueError, match="not on the row-scale grid"):
        from_codes(4, 32, (3, 64), q, s * np.float32(1.01), m, rs)
    # without row scales the parameters are stored as f16
    qt = from_codes(4, 32, (3, 64), q, s, m)
    assert not qt.coded and qt.scales.dtype == np.float16 and qt.mins.dtype == np.float16


@pytest.mark.parametrize("enc", ["codes", "f16"])
@pytest.mark.parametrize("bits,g", FORMATS)
def test_from_codes_round_trip(bits, g, enc):
    rng = np.random.default_rng(bits * g)
    n, k = 6, 200
    kp = padded_k(k, g)
    q = _codes(rng, bits, n, kp)
    if bits == 8:
        s, m, rs = rng.random((n, kp // g)).astype(np.float16), None, None
    elif enc == "f16":
        s = rng.random((n, kp // g)).astype(np.float16)
        m, rs = rng.standard_normal((n, kp // g)).astype(np.float16), None
    else:
        sc, mc, rs, s, m = _group_params(rng, n, kp // g)
    qt = from_codes(bits, g, (n, k), q, s, m, rs)
    np.testing.assert_array_equal(qt.codes(), q)
    if bits != 8 and enc == "codes":
        np.testing.assert_array_equal(qt.scales, sc)
        np.testing.assert_array_equal(qt.mins, mc)
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
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    kp = padded_k(k, g)
    qt = quantize_rtn(w, bits, g, "codes")
    assert qt.nbytes * 8 == BITS_PER_WEIGHT[(bits, g)] * n * kp + (0 if bits == 8 else 32 * n)
    if bits != 8:  # f16 parameters: 16 more bits per group, no row scale
        qt = quantize_rtn(w, bits, g, "f16")
        assert bits_per_weight(bits, g, "f16") == BITS_PER_WEIGHT[(bits, g)] + 16 / g
        assert qt.nbytes * 8 == bits_per_weight(bits, g, "f16") * n * kp


@pytest.mark.parametrize("method", ["rtn", "search"])
@pytest.mark.parametrize("bits,g,enc", ENC_FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_error_bound(method, bits, g, shape, enc):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32)
    qt = (quantize_rtn if method == "rtn" else quantize_search)(w, bits, g, encoding=enc)
    assert qt.encoding == enc or bits == 8
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
    # int4/int3 reach a group's min in eighths of a scale of about |min| / 16 or more
    rtol = 1e-3 if bits == 8 else 1 / 128
    for qt in (quantize_rtn(w, bits, 32), quantize_search(w, bits, 32)):
        np.testing.assert_allclose(qt.dequantize(), w, rtol=rtol, atol=1e-6)


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
    sc, mc, rs = np.ones((n, 2), np.uint8), np.zeros((n, 2), np.int8), np.ones(n, np.float32)
    q4 = np.zeros((n, 32), np.uint8)
    with pytest.raises(ValueError, match="unsupported bit width 5"):
        QuantizedTensor(5, 32, (n, k), np.zeros((n, k), np.uint8), s)
    with pytest.raises(ValueError, match="unsupported group size 48"):
        QuantizedTensor(4, 48, (n, k), q4, sc, mc, row_scale=rs)
    with pytest.raises(ValueError, match=r"q: expected uint8 \(4, 32\)"):
        QuantizedTensor(4, 32, (n, k), np.zeros((n, 31), np.uint8), sc, mc, row_scale=rs)
    with pytest.raises(ValueError, match=r"q: expected int8"):
        QuantizedTensor(8, 32, (n, k), np.zeros((n, k), np.uint8), s)
    with pytest.raises(ValueError, match="scales: expected float16"):
        QuantizedTensor(8, 32, (n, k), np.zeros((n, k), np.int8), s.astype(np.float32))
    with pytest.raises(ValueError, match=r"scales: expected uint8 \(4, 2\), got float16"):
        QuantizedTensor(4, 32, (n, k), q4, s, mc, row_scale=rs)
    with pytest.raises(ValueError, match="mins is missing"):
        QuantizedTensor(4, 32, (n, k), q4, sc, row_scale=rs)
    with pytest.raises(ValueError, match=r"mins: expected int8 \(4, 2\), got uint8"):
        QuantizedTensor(4, 32, (n, k), q4, sc, sc, row_scale=rs)
    with pytest.raises(ValueError, match="row_scale is missing"):
        QuantizedTensor(4, 32, (n, k), q4, sc, mc)
    with pytest.raises(ValueError, match=r"row_scale: expected float32 \(4,\)"):
        QuantizedTensor(4, 32, (n, k), q4, sc, mc, row_scale=rs[:3])
    with pytest.raises(ValueError, match="qh is missing"):
        QuantizedTensor(3, 32, (n, k), np.zeros((n, 16), np.uint8), sc, mc, row_scale=rs)
    with pytest.raises(ValueError, match="int8 is symmetric"):
        QuantizedTensor(8, 32, (n, k), np.zeros((n, k), np.int8), s, mc)
    with pytest.raises(ValueError, match="int8 is symmetric"):
        QuantizedTensor(8, 32, (n, k), np.zeros((n, k), np.int8), s, row_scale=rs)
    with pytest.raises(ValueError, match="no high bit plane"):
        QuantizedTensor(4, 32, (n, k), q4, sc, mc, np.zeros((n, 8), np.uint8), rs)
    # f16 group parameters: no row scale; codes need one
    assert not QuantizedTensor(4, 32, (n, k), q4, s, s).coded
    with pytest.raises(ValueError, match="uint8 codes but row_scale is missing"):
        QuantizedTensor(4, 32, (n, k), q4, sc, s)
    with pytest.raises(ValueError, match=r"mins: expected float16"):
        QuantizedTensor(4, 32, (n, k), q4, s, mc)
    with pytest.raises(ValueError, match="unknown group-parameter encoding 'f32'"):
        quantize_rtn(np.zeros((2, 64), np.float32), 4, 32, "f32")


def test_auto_encoding_keeps_f16_for_f16_lattice_weights():
    """Weights that are f16-parameter int4 already (a converted ggml Q4_1 file) stay
    exact with encoding="auto"; float weights get the smaller coded parameters."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((16, 256)).astype(np.float32)
    lattice = quantize_rtn(w, 4, 32, "f16").dequantize()
    for quant in (quantize_rtn, quantize_search):
        qt = quant(lattice, 4, 32, encoding="auto")
        assert qt.encoding == "f16"
        np.testing.assert_array_equal(qt.dequantize(), lattice)
        assert quant(w, 4, 32, encoding="auto").encoding == "codes"
    with pytest.raises(ValueError, match="2-D"):
        quantize_rtn(np.zeros(10, np.float32), 4, 32)
    with pytest.raises(ValueError, match="2-D"):
        quantize_search(np.zeros(10, np.float32), 4, 32)
