"""Correctness of the quantized CPU kernels: runtime._C.quantize_acts and qlinear.

Weights come from runtime.quant.formats.quantize_rtn (the portable layouts).
The checks, for int8/int4/int3 and group sizes 32/64/128:
  (a) quantize_acts equals a NumPy reimplementation of the formula bit for bit,
      on every SIMD path;
  (b) the plain C++ path equals a NumPy reference that uses the same quantized
      activations and exact integer block dots (float64), to ~1e-5 of the
      magnitude of the summed terms;
  (c) every SIMD path (with 1 and 2 threads) matches the same reference;
  (d) all paths are within the activation-quantization error bound of the
      float product x @ dequantize().T.
Shapes have K not divisible by the group size, odd N and M around the 4-row
tile, and enough blocks to hit the 8-block unit of the AVX-512 kernel and its
tails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from dataclasses import replace

import numpy as np
import pytest

from runtime import _C
from runtime.quant.formats import padded_k, quantize_rtn

ISAS = _C.available_isas()
BITS = (8, 4, 3)
# (bits, int4/int3 group-parameter encoding): int8 has f16 scales only.
FORMATS = [(8, "codes"), (4, "codes"), (4, "f16"), (3, "codes"), (3, "f16")]
FORMAT_IDS = [f"int{b}" + ("-f16" if e == "f16" else "") for b, e in FORMATS]
GROUPS = (32, 64, 128)
# (M, N, K): every K in (32, 40, 100, 576, 1000), N in (1, 3, 7, 33, 129) and
# M in (1, 2, 3, 5, 17) appears; 2080 gives 65-68 blocks (8-block units + a
# tail); N=700 spans several prefill row blocks and two threads.
SHAPES = [
    (1, 1, 32), (2, 3, 40), (3, 7, 100), (5, 33, 576), (17, 129, 1000), (1, 129, 576),
    (17, 7, 32), (5, 1, 1000), (2, 33, 100), (3, 129, 40), (1, 33, 1000), (17, 3, 576),
    (4, 5, 2080), (1, 300, 2080), (5, 700, 1000),
    # Batched decode (1 < M < 32 at K >= 1024, 1 < M < 10 below) vs the 16-row prefill
    # tiles: both sides of each switch, K with a tail of 1-15 blocks past 512 inputs.
    (9, 37, 576), (10, 21, 576), (24, 19, 1100), (31, 9, 2080), (32, 11, 1056), (33, 5, 1024),
    # One tile over several 32-row blocks (each prefetching the next), odd N.
    (12, 101, 576), (16, 70, 100),
]


def rng_for(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


@pytest.fixture
def restore_isa():
    old_isa, old_nt = _C.isa(), _C.get_num_threads()
    yield
    _C.set_isa(old_isa)
    _C.set_num_threads(old_nt)


def each_path():
    """Yield (isa, threads) with that path active (the caller restores it)."""
    for isa in ISAS:
        for nt in (1, 2):
            _C.set_isa(isa)
            _C.set_num_threads(nt)
            yield isa, nt


# ------------------------------------------------------------ references --

def np_quantize_acts(x: np.ndarray, kp: int):
    """The quantize_acts formula in float32 NumPy: d = amax/127, q = rint(x * (127/amax))."""
    m, k = x.shape
    xp = np.zeros((m, kp), np.float32)
    xp[:, :k] = x
    b = xp.reshape(m, kp // 32, 32)
    amax = np.max(np.abs(b), axis=2)
    iscale = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    v = np.clip(b * iscale[:, :, None], np.float32(-127), np.float32(127))
    q = np.rint(v).astype(np.int8)
    return q.reshape(m, kp), amax / np.float32(127), q.astype(np.int32).sum(axis=2, dtype=np.int32)


def exact_reference(qt, qx, d, sums):
    """float64 y and the magnitude of its summed terms, from exact integer block dots."""
    n = qt.shape[0]
    kp, g = qt.padded_k, qt.group_size
    codes = qt.codes().astype(np.int64).reshape(n, kp // 32, 32)
    xb = qx.astype(np.int64).reshape(qx.shape[0], kp // 32, 32)
    dots = np.einsum("mbk,nbk->mnb", xb, codes).astype(np.float64)  # exact in float64
    # The magnitude bounds every partial sum a kernel may form within a block.
    absdots = np.einsum("mbk,nbk->mnb", np.abs(xb), np.abs(codes)).astype(np.float64)
    s = np.repeat(qt.group_scales().astype(np.float64), g // 32, axis=1)[None]        # [1, n, nb]
    mn = (np.zeros_like(s) if qt.mins is None
          else np.repeat(qt.group_mins().astype(np.float64), g // 32, axis=1)[None])
    dd = d.astype(np.float64)[:, None, :]
    ss = sums.astype(np.float64)[:, None, :]
    y = (dd * (s * dots + mn * ss)).sum(axis=2)
    mag = (np.abs(dd) * (np.abs(s) * absdots + np.abs(mn * ss))).sum(axis=2)
    return y, mag


def assert_scaled(got, want, scale, rtol, what):
    err = np.abs(got.astype(np.float64) - want)
    bound = rtol * scale + 1e-30
    bad = err > bound
    assert not bad.any(), (f"{what}: {bad.sum()} of {bad.size} off; worst err {err.max():.3g}, "
                           f"worst err/bound {(err / bound).max():.3g}")


def make_weights(rng, n, k, outliers=True):
    w = rng.standard_normal((n, k)).astype(np.float32)
    if outliers and w.size:
        idx = rng.integers(0, w.size, size=max(1, w.size // 200))
        w.flat[idx] *= 30.0
    return w


def make_x(rng, m, k, outliers=True):
    x = rng.standard_normal((m, k)).astype(np.float32)
    if outliers and x.size:
        idx = rng.integers(0, x.size, size=max(1, x.size // 100))
        x.flat[idx] *= 50.0
    return x


def run_qlinear(x, qt, out=None):
    return _C.qlinear(x, qt.bits, qt.group_size, qt.q, qt.qh, qt.scales, qt.mins, qt.row_scale, out)


def check_all_paths(x, qt, what, rtol=1e-5):
    """(b)-(d) on every path: exact reference, and float reference with the act-quant bound."""
    kp = qt.padded_k
    qx, d, sums = np_quantize_acts(x, kp)
    y_ref, mag = exact_reference(qt, qx, d, sums)
    wd = qt.dequantize().astype(np.float64)
    y_float = x.astype(np.float64) @ wd.T
    # |x - d q| <= d/2 per input (and <= d*|x| rounding slack), so the float
    # product differs by at most sum |w| d/2; plus the f32 summation slack.
    dk = np.repeat(d.astype(np.float64), 32, axis=1)[:, : x.shape[1]]
    quant_bound = 0.5 * dk @ np.abs(wd).T * 1.001 + 1e-5 * (np.abs(x) @ np.abs(wd).T)
    for isa, nt in each_path():
        y = run_qlinear(x, qt)
        assert y.dtype == np.float32 and y.shape == (x.shape[0], qt.shape[0])
        assert_scaled(y, y_ref, mag, rtol, f"{what} {isa} t{nt} vs exact")
        err = np.abs(y.astype(np.float64) - y_float)
        assert (err <= quant_bound + 1e-30).all(), (
            f"{what} {isa} t{nt} vs float: worst err/bound {(err / (quant_bound + 1e-30)).max():.3g}")


# ---------------------------------------------------------- (a) quantizer --

@pytest.mark.parametrize("m,k", [(1, 32), (2, 40), (3, 100), (5, 576), (17, 1000), (64, 1000)])
def test_quantize_acts_bit_exact(restore_isa, m, k):
    rng = rng_for("qa", m, k)
    x = make_x(rng, m, k)
    x[0, : min(k, 32)] = 0.0                       # an all-zero block
    if m > 1:
        x[1] *= 1e-30                              # tiny but normal scales
    if m > 2:
        x[2] *= 1e25                               # huge
    if m > 3:
        x[3, :8] = np.float32(1e-41)               # subnormal inputs
        x[3, 8:16] = np.arange(8) - 3.5            # exact halves: round to even
    for kp in sorted({padded_k(k, 32), padded_k(k, 128)}):
        want_q, want_d, want_s = np_quantize_acts(x, kp)
        for isa, nt in each_path():
            q, d, s = _C.quantize_acts(x, kp)
            assert q.dtype == np.int8 and q.shape == (m, kp)
            assert d.dtype == np.float32 and d.shape == (m, kp // 32)
            assert s.dtype == np.int32 and s.shape == (m, kp // 32)
            np.testing.assert_array_equal(q, want_q, err_msg=f"{isa} t{nt} codes")
            np.testing.assert_array_equal(d.view(np.int32), want_d.view(np.int32),
                                          err_msg=f"{isa} t{nt} scales")
            np.testing.assert_array_equal(s, want_s, err_msg=f"{isa} t{nt} sums")


def test_quantize_acts_round_half_even(restore_isa):
    # amax = 127 makes iscale 1, so x * iscale keeps exact halves.
    x = np.zeros((1, 32), np.float32)
    x[0, :8] = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.0]
    for isa, nt in each_path():
        q, d, s = _C.quantize_acts(x, 32)
        assert q[0, :8].tolist() == [0, 2, 2, 0, -2, -2, 126, 127], isa
        assert d[0, 0] == np.float32(1.0) and s[0, 0] == 0 + 2 + 2 - 2 - 2 + 126 + 127


# ------------------------------------------------------- (b)-(d) qlinear --

@pytest.mark.parametrize("bits,enc", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("m,n,k", SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in SHAPES])
def test_qlinear_paths(restore_isa, bits, enc, group_size, m, n, k):
    rng = rng_for("ql", bits, group_size, m, n, k)
    qt = quantize_rtn(make_weights(rng, n, k), bits, group_size, enc)
    assert qt.encoding == enc or bits == 8
    x = make_x(rng, m, k)
    check_all_paths(x, qt, f"int{bits} g{group_size} {m}x{n}x{k}")


# Two-step activations (act_steps=2): the residual x - d*q is quantized again
# and its product added, as the CPU backend runs int8 weights.
TWO_STEP_SHAPES = [(1, 7, 100), (1, 129, 1056), (3, 33, 576), (17, 5, 1000), (33, 9, 1024)]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("m,n,k", TWO_STEP_SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in TWO_STEP_SHAPES])
def test_qlinear_two_step_activations(restore_isa, bits, m, n, k):
    rng = rng_for("two-step", bits, m, n, k)
    qt = quantize_rtn(make_weights(rng, n, k), bits, 32)
    x = make_x(rng, m, k)
    kp = qt.padded_k
    q1, d1, s1 = np_quantize_acts(x, kp)
    resid = x - (np.repeat(d1, 32, axis=1) * q1.astype(np.float32))[:, :k]
    q2, d2, s2 = np_quantize_acts(resid, kp)
    y1, mag1 = exact_reference(qt, q1, d1, s1)
    y2, mag2 = exact_reference(qt, q2, d2, s2)
    wd = qt.dequantize().astype(np.float64)
    y_float = x.astype(np.float64) @ wd.T
    # What is left after two steps is at most d2/2 per input, d2 <= d1/254.
    d2k = np.repeat(d2.astype(np.float64), 32, axis=1)[:, :k]
    bound = 0.5 * d2k @ np.abs(wd).T * 1.001 + 1e-5 * (np.abs(x) @ np.abs(wd).T)
    one_step_err = np.abs(run_qlinear(x, qt).astype(np.float64) - y_float)
    for isa, nt in each_path():
        y = _C.qlinear(x, qt.bits, 32, qt.q, qt.qh, qt.scales, qt.mins, qt.row_scale, act_steps=2)
        assert_scaled(y, y1 + y2, mag1 + mag2, 1e-5, f"int{bits} {m}x{n}x{k} {isa} t{nt} vs exact")
        err = np.abs(y.astype(np.float64) - y_float)
        assert (err <= bound + 1e-30).all(), f"{isa} t{nt}: worst err/bound {(err / bound).max():.3g}"
        # Far closer to the float product than one step (the reason it exists).
        assert err.max() < one_step_err.max() / 20, (isa, err.max(), one_step_err.max())
    with pytest.raises(ValueError, match="act_steps must be 1 or 2, got 3"):
        _C.qlinear(x, qt.bits, 32, qt.q, qt.qh, qt.scales, qt.mins, qt.row_scale, act_steps=3)


@pytest.mark.parametrize("bits,enc", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("group_size", GROUPS)
def test_qlinear_special_values(restore_isa, bits, enc, group_size):
    rng = rng_for("special", bits, group_size)
    m, n, k = 6, 9, 300
    w = make_weights(rng, n, k)
    w[1, :group_size] = 0.75                 # all-equal group: scale 0 (int4/int3 keep it as min)
    w[2] = 0.0                               # an all-zero row
    w[3] *= 1e2                              # large weights (f16 offsets up to ~1e4)
    w[4] *= 1e-5                             # tiny weights (f16 subnormal scales)
    qt = quantize_rtn(w, bits, group_size, enc)
    x = make_x(rng, m, k)
    x[0] = 0.0                               # zero row -> exactly zero output
    x[1] *= 1e20
    x[2] *= 1e-20
    x[3, 32:64] = 0.0                        # a zero block inside a row
    check_all_paths(x, qt, f"special int{bits} g{group_size}")
    for isa, nt in each_path():
        y = run_qlinear(x, qt)
        assert (y[0] == 0.0).all(), f"{isa} t{nt}: zero activations gave nonzero output"
        if bits == 8:
            assert (y[:, 2] == 0.0).all(), f"{isa} t{nt}: zero weights gave nonzero output"


def test_qlinear_out_and_empty(restore_isa):
    rng = rng_for("out")
    qt = quantize_rtn(make_weights(rng, 7, 100), 4, 32)
    x = make_x(rng, 3, 100)
    want = run_qlinear(x, qt)
    out = np.full((3, 7), np.nan, np.float32)
    assert run_qlinear(x, qt, out) is out
    np.testing.assert_array_equal(out, want)
    y0 = run_qlinear(np.zeros((0, 100), np.float32), qt)
    assert y0.shape == (0, 7)


@pytest.mark.skipif("avx512" not in ISAS, reason="no AVX-512 on this CPU")
def test_int3_without_bitalg():
    """The int3 AVX-512 kernel for VNNI CPUs without AVX512_BITALG (forced by env)."""
    code = (
        "import numpy as np; from runtime import _C; from runtime.quant.formats import quantize_rtn\n"
        "rng = np.random.default_rng(5)\n"
        "for g in (32, 64, 128):\n"
        "    for (m, n, k), enc in zip(((1, 7, 1000), (5, 33, 2080), (3, 3, 40)) * 2,\n"
        "                              ['codes'] * 3 + ['f16'] * 3):\n"
        "        qt = quantize_rtn(rng.standard_normal((n, k)).astype(np.float32), 3, g, enc)\n"
        "        assert qt.encoding == enc\n"
        "        x = rng.standard_normal((m, k)).astype(np.float32)\n"
        "        ys = []\n"
        "        for isa in ('plain', 'avx512'):\n"
        "            _C.set_isa(isa)\n"
        "            ys.append(_C.qlinear(x, 3, g, qt.q, qt.qh, qt.scales, qt.mins, qt.row_scale))\n"
        "        scale = np.abs(x) @ np.abs(qt.dequantize()).T\n"
        "        assert (np.abs(ys[0] - ys[1]) <= 1e-5 * scale + 1e-30).all(), (g, m, n, k)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, LINGLI_NO_BITALG="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_qlinear_path_names(restore_isa):
    for isa in ISAS:
        _C.set_isa(isa)
        path = _C.qlinear_path()
        assert path.startswith(isa) or (isa == "avx512" and path == "avx2"), (isa, path)


# -------------------------------------------------------------- bad input --

def _args(bits=4, group_size=64, n=5, k=100, enc="codes"):
    rng = rng_for("bad", bits, group_size)
    qt = quantize_rtn(rng.standard_normal((n, k)).astype(np.float32), bits, group_size, enc)
    x = rng.standard_normal((2, k)).astype(np.float32)
    return dict(x=x, bits=bits, group_size=group_size, q=qt.q, qh=qt.qh, scales=qt.scales,
                mins=qt.mins, row_scale=qt.row_scale)


def _fortran(a):
    return np.asfortranarray(a)


BAD = [
    # (name, format, change, message fragment)
    ("bits5", 4, dict(bits=5), "bits"),
    ("group48", 4, dict(group_size=48), "group_size"),
    ("x_f64", 4, lambda a: dict(x=a["x"].astype(np.float64)), "x"),
    ("x_1d", 4, lambda a: dict(x=a["x"][0]), "x"),
    ("x_strided", 4, lambda a: dict(x=np.repeat(a["x"], 2, axis=1)[:, ::2]), "x"),
    ("k_gt_kp", 4, lambda a: dict(x=np.zeros((2, 129), np.float32)), "K"),
    ("k_too_small", 4, lambda a: dict(x=np.zeros((2, 64), np.float32)), "K"),
    ("q_dtype_int4", 4, lambda a: dict(q=a["q"].view(np.int8)), "q"),
    ("q_dtype_int8", 8, lambda a: dict(q=a["q"].view(np.uint8)), "q"),
    ("q_shape", 4, lambda a: dict(q=a["q"][:, :-1].copy()), "q"),
    ("q_rows", 3, lambda a: dict(q=a["q"][:-1].copy()), "q"),
    ("q_fortran", 4, lambda a: dict(q=_fortran(a["q"])), "q"),
    ("qh_missing", 3, dict(qh=None), "qh"),
    ("qh_extra", 4, lambda a: dict(qh=np.zeros((5, 16), np.uint8)), "qh"),
    ("qh_shape", 3, lambda a: dict(qh=a["qh"][:, :-1].copy()), "qh"),
    ("qh_dtype", 3, lambda a: dict(qh=a["qh"].view(np.int8)), "qh"),
    ("scales_f32", 4, lambda a: dict(scales=a["scales"].astype(np.float32)), "scales"),
    ("scales_fortran", 4, lambda a: dict(scales=_fortran(a["scales"])), "scales"),
    ("scales_1d", 4, lambda a: dict(scales=a["scales"].ravel()), "scales"),
    ("mins_missing", 4, dict(mins=None), "mins"),
    ("mins_extra", 8, lambda a: dict(mins=a["scales"].copy()), "mins"),
    ("mins_shape", 3, lambda a: dict(mins=a["mins"][:-1].copy()), "mins"),
    ("mins_dtype", 4, lambda a: dict(mins=a["mins"].astype(np.float32)), "mins"),
    ("mins_notarray", 4, dict(mins=[1.0]), "mins"),
    ("scales_f16_int4", 4, lambda a: dict(scales=a["scales"].astype(np.float16)), "scales"),
    ("scales_u8_int8", 8, lambda a: dict(scales=a["scales"].view(np.uint8)), "scales"),
    ("mins_uint8", 3, lambda a: dict(mins=a["mins"].view(np.uint8)), "mins"),
    ("row_scale_missing", 4, dict(row_scale=None), "row_scale"),
    ("row_scale_extra", 8, lambda a: dict(row_scale=np.ones(5, np.float32)), "row_scale"),
    ("row_scale_f64", 3, lambda a: dict(row_scale=a["row_scale"].astype(np.float64)), "row_scale"),
    ("row_scale_shape", 4, lambda a: dict(row_scale=a["row_scale"][:-1].copy()), "row_scale"),
    ("row_scale_2d", 4, lambda a: dict(row_scale=a["row_scale"][:, None].copy()), "row_scale"),
    # mixtures of the two int4/int3 encodings
    ("f16_scales_with_row_scale", 4, lambda a: dict(scales=np.ones(a["scales"].shape, np.float16),
                                                    mins=np.ones(a["mins"].shape, np.float16)),
     "row_scale"),
    ("f16_mins_with_codes", 3, lambda a: dict(mins=a["mins"].astype(np.float16)), "mins"),
]

BAD_F16 = [  # int4/int3 with f16 group parameters
    ("mins_missing", 4, dict(mins=None), "mins"),
    ("mins_f32", 3, lambda a: dict(mins=a["mins"].astype(np.float32)), "mins"),
    ("mins_codes", 4, lambda a: dict(mins=np.zeros(a["mins"].shape, np.int8)), "mins"),
    ("scales_shape", 4, lambda a: dict(scales=a["scales"][:-1].copy()), "scales"),
    ("row_scale_extra", 3, lambda a: dict(row_scale=np.ones(5, np.float32)), "row_scale"),
]


@pytest.mark.parametrize("name,bits,change,frag", BAD, ids=[b[0] for b in BAD])
def test_qlinear_bad_input(name, bits, change, frag):
    a = _args(bits=bits)
    a.update(change(a) if callable(change) else change)
    with pytest.raises(ValueError, match=rf"\b{frag}\b"):
        _C.qlinear(a["x"], a["bits"], a["group_size"], a["q"], a["qh"], a["scales"], a["mins"],
                   a["row_scale"])


@pytest.mark.parametrize("name,bits,change,frag", BAD_F16, ids=[b[0] for b in BAD_F16])
def test_qlinear_bad_input_f16_params(name, bits, change, frag):
    a = _args(bits=bits, enc="f16")
    assert a["row_scale"] is None and a["scales"].dtype == np.float16
    _C.qlinear(a["x"], a["bits"], a["group_size"], a["q"], a["qh"], a["scales"], a["mins"], None)
    a.update(change(a) if callable(change) else change)
    with pytest.raises(ValueError, match=rf"\b{frag}\b"):
        _C.qlinear(a["x"], a["bits"], a["group_size"], a["q"], a["qh"], a["scales"], a["mins"],
                   a["row_scale"])


def test_qlinear_bad_out():
    a = _args()
    call = lambda out: _C.qlinear(a["x"], 4, 64, a["q"], None, a["scales"], a["mins"],
                                  a["row_scale"], out)
    for out in (np.zeros((2, 4), np.float32), np.zeros((2, 5), np.float64),
                np.zeros((5, 2), np.float32).T, "no"):
        with pytest.raises(ValueError, match=r"\bout\b"):
            call(out)
    ro = np.zeros((2, 5), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"\bout\b"):
        call(ro)


def test_quantize_acts_bad_input():
    x = np.zeros((2, 40), np.float32)
    for kp in (40, 32, 48, -32):
        with pytest.raises(ValueError, match=r"\bkp\b"):
            _C.quantize_acts(x, kp)
    with pytest.raises(ValueError, match=r"\bx\b"):
        _C.quantize_acts(x.astype(np.float64), 64)
    with pytest.raises(ValueError, match=r"\bx\b"):
        _C.quantize_acts(np.zeros((4, 80), np.float32)[:, ::2], 64)


@pytest.mark.parametrize("bits,enc", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("m", [16, 40])
def test_prefill_tile_path_matches_plain(bits, enc, group_size, m):
    """M >= 16 takes the tiled prefill kernel on VNNI CPUs; it must agree with plain."""
    from runtime.quant.formats import quantize_rtn

    rng = np.random.default_rng(bits * 100 + group_size + m)
    k, n = 200, 37                                  # K not a multiple of G, odd N
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[3, 5] = 40.0                                  # an outlier in one group
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[2] = 0.0                                      # a zero row
    x[5, :7] = 1e3                                  # a huge block
    qt = quantize_rtn(w, bits, group_size, enc)
    args = (bits, group_size, qt.q, qt.qh, qt.scales, qt.mins, qt.row_scale)
    prev = _C.isa()
    try:
        _C.set_isa("plain")
        ref = _C.qlinear(x, *args)
        for isa in _C.available_isas():
            _C.set_isa(isa)
            got = _C.qlinear(x, *args)
            scale = np.abs(ref).max()
            assert np.abs(got - ref).max() <= 1e-5 * scale, isa
    finally:
        _C.set_isa(prev)


def test_cpu_backend_runs_int8_in_two_steps():
    """The backend's policy: int8 layer weights take act_steps=2; int4/int3 and the
    output layer (even int8) one step."""
    from runtime.backend_cpu import CpuBackend
    rng = rng_for("backend-steps")
    x = make_x(rng, 2, 300)
    backend = CpuBackend()
    for bits, output, steps in ((8, False, 2), (8, True, 1), (4, False, 1), (3, False, 1)):
        qt = quantize_rtn(make_weights(rng, 11, 300), bits, 32)
        want = _C.qlinear(x, bits, 32, qt.q, qt.qh, qt.scales, qt.mins, qt.row_scale, act_steps=steps)
        other = _C.qlinear(x, bits, 32, qt.q, qt.qh, qt.scales, qt.mins, qt.row_scale, act_steps=3 - steps)
        got = backend.linear(x, backend.weight(qt, output=output))
        np.testing.assert_array_equal(got, want, err_msg=f"int{bits} output={output}")
        assert not np.array_equal(got, other), f"int{bits}: both step counts agree"


@pytest.mark.parametrize("m,n,k", [(16, 37, 200), (12, 101, 576), (40, 70, 1000), (3, 9, 100)])
def test_int8_code_sums_give_the_same_products(m, n, k, restore_isa):
    """int8 with its block code sums passed in (what the batched kernel uses instead
    of summing the codes itself) gives bit-identical products on every ISA, in one
    and two activation steps; the sums match a plain int64 sum."""
    from runtime.quant.formats import block_code_sums
    rng = rng_for("code-sums", m, n, k)
    qt = quantize_rtn(make_weights(rng, n, k), 8, 32)
    sums = block_code_sums(qt.q)
    assert sums.dtype == np.int16
    np.testing.assert_array_equal(
        sums, qt.q.astype(np.int64).reshape(n, -1, 32).sum(axis=2))
    x = make_x(rng, m, k)
    args = (8, 32, qt.q, None, qt.scales, None, None)
    for isa in ISAS:
        _C.set_isa(isa)
        for steps in (1, 2):
            want = _C.qlinear(x, *args, act_steps=steps)
            got = _C.qlinear(x, *args, act_steps=steps, code_sums=sums)
            np.testing.assert_array_equal(got, want, err_msg=f"{isa} act_steps={steps}")


def test_int8_code_sums_bad_input():
    rng = rng_for("code-sums-bad")
    qt = quantize_rtn(make_weights(rng, 5, 64), 8, 32)
    x = make_x(rng, 2, 64)
    args = (8, 32, qt.q, None, qt.scales, None, None)
    good = np.zeros((5, 2), np.int16)
    for bad, what in ((good.astype(np.int32), "int16"), (good[:4], "code_sums"),
                      (np.zeros((5, 3), np.int16), "code_sums"), (np.zeros((5, 4), np.int16)[:, ::2], "code_sums")):
        with pytest.raises(ValueError, match=what):
            _C.qlinear(x, *args, code_sums=bad)
    q4 = quantize_rtn(make_weights(rng, 5, 64), 4, 32)
    with pytest.raises(ValueError, match="only int8"):
        _C.qlinear(x, 4, 32, q4.q, q4.qh, q4.scales, q4.mins, q4.row_scale, code_sums=good)
    with pytest.raises(ValueError, match="code_sums"):
        replace(qt, code_sums=good[:, :1])


def test_cpu_backend_keeps_int8_code_sums():
    """CpuBackend.weight gives int8 matrices their block code sums (and only int8)."""
    from runtime.backend_cpu import CpuBackend
    from runtime.quant.formats import block_code_sums
    rng = rng_for("backend-sums")
    backend = CpuBackend()
    for bits in (8, 4, 3):
        qt = quantize_rtn(make_weights(rng, 7, 96), bits, 32)
        w = backend.weight(qt)
        if bits == 8:
            np.testing.assert_array_equal(w.code_sums, block_code_sums(qt.q))
            assert backend.weight(w) is w  # already prepared
        else:
            assert w.code_sums is None


def test_scale_table_matches_the_python_format():
    """The kernels decode int4/int3 scale codes with the same 256 float32 values."""
    from runtime.quant.formats import SCALE_TABLE
    np.testing.assert_array_equal(_C.scale_table(), SCALE_TABLE)


def _kv_arrays(blocks=40, per=(3, 16, 64)):
    k = np.zeros((blocks,) + per, np.float16)
    return k, np.ones_like(k), k[0].nbytes


@pytest.mark.parametrize("m,n,k", [(1, 70, 300), (16, 200, 576), (12, 101, 576), (40, 70, 1000),
                                   (16, 300, 2048), (5, 33, 1100)])
def test_prefetch_plan_gives_the_same_products(m, n, k, restore_isa):
    """qlinear's prefetch plan (the next attention's KV blocks) changes no bit of
    the products on any ISA or kernel (decode, batched decode, one tile, many
    tiles) or thread count, whether the plan is empty, used up after one range
    (one thread then goes on through more row blocks asking for more) or larger
    than the rows can spread."""
    rng = rng_for("prefetch-plan", m, n, k)
    kc, vc, per = _kv_arrays()
    plans = [np.zeros((0, 2), np.int64),
             np.array([[3 * per, per]], np.int64),
             np.stack([np.arange(40) * per, np.full(40, per)], 1).astype(np.int64),
             np.array([[0, 40 * per]] * 50, np.int64)]
    for bits in (8, 4, 3):
        qt = quantize_rtn(make_weights(rng, n, k), bits, 32)
        x = make_x(rng, m, k)
        args = (bits, 32, qt.q, qt.qh, qt.scales, qt.mins, qt.row_scale)
        for isa in ISAS:
            _C.set_isa(isa)
            for threads in (1, 2):
                _C.set_num_threads(threads)
                want = _C.qlinear(x, *args)
                for i, plan in enumerate(plans):
                    got = _C.qlinear(x, *args, prefetch=(kc, vc, plan))
                    np.testing.assert_array_equal(got, want, err_msg=f"int{bits} {isa} {threads} threads plan {i}")


def test_prefetch_plan_bad_input():
    rng = rng_for("prefetch-plan-bad")
    qt = quantize_rtn(make_weights(rng, 5, 64), 4, 32)
    x = make_x(rng, 2, 64)
    args = (4, 32, qt.q, qt.qh, qt.scales, qt.mins, qt.row_scale)
    kc, vc, per = _kv_arrays(4)
    good = np.array([[0, per], [3 * per, per], [per, 2 * per]], np.int64)
    for bad, what in (((kc, vc), "tuple"), ([kc, vc, good], "tuple"), ((kc, "v", good), "tuple"),
                      ((kc, vc[:2], good), "same byte size"), ((kc, vc[:, ::2], good), "C-contiguous"),
                      ((kc, vc, good.astype(np.int32)), "int32"), ((kc, vc, good.T.copy()), r"\(n, 2\)"),
                      ((kc, vc, good[:, :1]), "C-contiguous"), ((kc, vc, good[0]), "2-D"),
                      ((kc, vc, np.array([[3 * per, per + 1]], np.int64)), "range 0 .* outside"),
                      ((kc, vc, np.array([[0, per], [-64, 64]], np.int64)), "range 1 .* outside")):
        with pytest.raises(ValueError, match=what):
            _C.qlinear(x, *args, prefetch=bad)
    np.testing.assert_array_equal(_C.qlinear(x, *args, prefetch=(kc, vc, good)), _C.qlinear(x, *args))


# ------------------------------------------------------------ qlinear_parts --

def part_args(qt, act_steps=1):
    return (qt.bits, qt.group_size, qt.q, qt.qh, qt.scales, qt.mins, qt.row_scale, act_steps, None)


# (formats as (bits, group size, encoding), m, n per part, K): an int3 q/v beside an
# int4 k (the int3 mix's q/k/v), group sizes whose padded K differ, a lone part,
# chunks much smaller and larger than a part, K with a group tail.
PARTS_CASES = [
    ([(3, 32, "f16"), (4, 32, "codes"), (3, 32, "f16")], (1, 2, 17), (40, 9, 9), 576),
    ([(4, 32, "codes"), (4, 128, "f16"), (8, 64, "")], (1, 3, 12), (33, 5, 70), 1000),
    ([(4, 64, "codes")], (1, 5), (129,), 100),
    ([(3, 128, "codes"), (8, 32, ""), (4, 32, "f16"), (3, 64, "f16")], (1, 16), (300, 1, 64, 7), 2080),
]


@pytest.mark.parametrize("fmts,ms,ns,k", PARTS_CASES, ids=[f"{len(c[0])}parts-k{c[3]}" for c in PARTS_CASES])
def test_qlinear_parts_equal_one_product_per_part(restore_isa, fmts, ms, ns, k):
    """Side by side, bit for bit what qlinear gives each part, on every path."""
    rng = rng_for("parts", k, len(fmts))
    qts = [quantize_rtn(make_weights(rng, n, k), b, g, e or "codes") for (b, g, e), n in zip(fmts, ns)]
    for m in ms:
        x = make_x(rng, m, k)
        for isa, nt in each_path():
            want = np.concatenate([run_qlinear(x, qt) for qt in qts], axis=1)
            got = _C.qlinear_parts(x, [part_args(qt) for qt in qts])
            assert got.shape == (m, sum(ns)) and got.dtype == np.float32
            np.testing.assert_array_equal(got, want, err_msg=f"{isa} t{nt} m={m}")


def test_qlinear_parts_two_step_out_and_prefetch(restore_isa):
    rng = rng_for("parts-two-step")
    qts = [quantize_rtn(make_weights(rng, n, 300), 8, 32) for n in (20, 13)]
    k = np.zeros((4, 64), np.float32)
    plan = (k, k.copy(), np.array([[0, 256], [512, 64]], np.int64))
    for m in (1, 3, 16):
        x = make_x(rng, m, 300)
        want = np.concatenate([_C.qlinear(x, 8, 32, qt.q, None, qt.scales, None, None, None, 2)
                               for qt in qts], axis=1)
        out = np.full((m, 33), np.nan, np.float32)
        assert _C.qlinear_parts(x, [part_args(qt, 2) for qt in qts], out, plan) is out
        np.testing.assert_array_equal(out, want)


def test_qlinear_parts_bad_input():
    rng = rng_for("parts-bad")
    a, b = (quantize_rtn(make_weights(rng, n, 100), 4, 32) for n in (5, 6))
    wide = quantize_rtn(make_weights(rng, 5, 200), 4, 32)
    x = make_x(rng, 2, 100)
    cases = [
        ([], r"1 to 8 matrices, got 0"),
        ([part_args(a)] * 9, r"1 to 8 matrices, got 9"),
        ([part_args(a), part_args(b)[:8]], r"part 1 must be a tuple"),
        ([part_args(a), part_args(b, 2)], r"part 1: act_steps 2 differs from part 0's 1"),
        ([part_args(a), part_args(wide)], r"part 1: x has K = 100"),
        ([part_args(a), (3,) + part_args(b)[1:]], r"part 1: q has shape \(6, 64\), expected \[6, 32\]"),
        ([part_args(a, 3)], r"part 0: act_steps must be 1 or 2"),
    ]
    for parts, frag in cases:
        with pytest.raises(ValueError, match=frag):
            _C.qlinear_parts(x, parts)
    with pytest.raises(ValueError, match=r"qlinear_parts: out has shape"):
        _C.qlinear_parts(x, [part_args(a), part_args(b)], np.zeros((2, 10), np.float32))
