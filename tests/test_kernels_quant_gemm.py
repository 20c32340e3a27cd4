"""kernels/quant_gemm.py: repacking is exact, both kernels match the torch
reference on awkward shapes, bad inputs fail clearly. Runs in Triton's CPU
interpreter (conftest sets TRITON_INTERPRET=1), where the autotuners keep only
their first config: split-K 32x64 tiles in 2 splits, tiled 32x32x64."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from kernels import quant_gemm as qg  # noqa: E402
from kernels._util import device  # noqa: E402
from runtime.quant.formats import quantize_rtn  # noqa: E402

DEV = device()


def gpu_weights(qt) -> np.ndarray:
    """The portable weights with the group parameters rounded to f16, as repack
    stores them (the CPU keeps int4/int3 parameters as codes, formats.py)."""
    n, k = qt.shape
    q = qt.codes().astype(np.float32).reshape(n, qt.n_groups, qt.group_size)
    w = q * qt.group_scales().astype(np.float16).astype(np.float32)[:, :, None]
    if qt.bits != 8:
        w += qt.group_mins().astype(np.float16).astype(np.float32)[:, :, None]
    return w.reshape(n, qt.padded_k)[:, :k]


def make(bits: int, g: int, n: int, k: int, seed: int = 0):
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    qt = quantize_rtn(w, bits, g)
    return qt, qg.repack(qt, DEV)


# ------------------------------------------------------------------ repacking
@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("n,k", [(1, 100), (7, 72), (33, 200)])
def test_repack_round_trip_is_exact(bits, g, n, k):
    qt, pw = make(bits, g, n, k, seed=n * k + bits)
    assert (pw.n, pw.k, pw.kp) == (n, k, qt.padded_k)
    for name, (shape, dtype) in qg.packed_shapes(n, k, bits, g).items():
        t = getattr(pw, name)
        assert tuple(t.shape) == shape and t.dtype == dtype and t.is_contiguous(), name
    got = qg.dequantize_packed(pw).cpu().numpy()
    np.testing.assert_array_equal(got, gpu_weights(qt))
    # f16 parameters: within f16 rounding of the CPU's float32 ones
    np.testing.assert_allclose(got, qt.dequantize(), rtol=0, atol=2e-3 * np.abs(qt.dequantize()).max())


def test_int3_reads_fewer_bytes_than_int4():
    for g in (32, 128):
        sizes = {b: make(b, g, 16, 256)[1].nbytes for b in (8, 4, 3)}
        assert sizes[3] < sizes[4] < sizes[8]
        assert sizes[3] * 8 == 16 * 256 * (3 + 32 / g)     # 3 + 32/G bits per weight
    pw = make(4, 128, 16, 256)[1]
    assert qg.bytes_moved(pw, 2) == pw.nbytes + 2 * (256 + 16) * 2


# ------------------------------------------------------------------ kernels
# (N, K, G): K never a multiple of the 64-wide K block, Kp sometimes not either,
# K=40 leaves the second split-K program without work.
SHAPES = [(33, 200, 32), (7, 72, 64), (17, 100, 128), (1, 40, 32)]


def check(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.dtype == ref.dtype and y.shape == ref.shape
    scale = ref.float().abs().max().item()
    if ref.dtype == torch.float32:
        tol = dict(rtol=1e-5, atol=1e-5 * scale)
    else:  # W rounded to fp16 in the dot, and y rounded: a few fp16 ulps
        tol = dict(rtol=4e-3, atol=2e-3 * scale)
    torch.testing.assert_close(y.float(), ref.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("kernel,m", [("splitk", m) for m in (1, 3, 16)]
                         + [("tiled", m) for m in (1, 3, 16, 17, 40)])
def test_kernel_matches_reference(kernel, m, bits, dtype):
    n, k, g = SHAPES[(m + bits) % len(SHAPES)]
    qt, pw = make(bits, g, n, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype).to(DEV)
    y = qg.quant_matmul(x, pw, kernel=kernel)
    check(y, qg.quant_matmul_ref(x, pw))
    # and the reference itself is the portable format's weights
    ref = (x.float().cpu().numpy() @ gpu_weights(qt).T)
    np.testing.assert_allclose(qg.quant_matmul_ref(x.float(), pw).cpu().numpy(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m", [16, 17])
def test_auto_picks_a_kernel_and_handles_strided_x(m):
    _, pw = make(4, 32, 33, 200)
    big = torch.randn(m, 2 * 200, generator=torch.Generator().manual_seed(1)).to(DEV)
    x = big[:, ::2]                                         # stride 2 along K
    check(qg.quant_matmul(x, pw), qg.quant_matmul_ref(x, pw))


def test_empty_m():
    _, pw = make(8, 32, 7, 72)
    assert qg.quant_matmul(torch.empty(0, 72, device=DEV), pw).shape == (0, 7)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("x,kw,match", [
    (lambda: torch.randn(72, device=DEV), {}, "2-D"),
    (lambda: torch.randn(2, 64, device=DEV), {}, "K=64.*expects K=72"),
    (lambda: torch.randn(2, 72, device=DEV).double(), {}, "dtype"),
    (lambda: torch.randn(2, 72, device=DEV).to(torch.int32), {}, "dtype"),
    (lambda: torch.randn(2, 72, device=DEV), {"kernel": "fast"}, "kernel must be"),
    (lambda: torch.randn(17, 72, device=DEV), {"kernel": "splitk"}, "M <= 16"),
])
def test_bad_inputs_raise(x, kw, match):
    _, pw = make(4, 64, 7, 72)
    with pytest.raises(ValueError, match=match):
        qg.quant_matmul(x(), pw, **kw)


def test_device_mismatch_and_bf16_raise():
    _, pw = make(4, 64, 7, 72)
    if DEV.type == "cpu":  # interpreter: put the weight on another device
        pw.qweight, pw.scales, pw.mins = (t.to("meta") for t in (pw.qweight, pw.scales, pw.mins))
        with pytest.raises(ValueError, match="x is on cpu but the weight is on meta"):
            qg.quant_matmul(torch.randn(2, 72), pw)
        with pytest.raises(ValueError, match="bfloat16"):
            qg.quant_matmul(torch.randn(2, 72, dtype=torch.bfloat16), make(4, 64, 7, 72)[1])
    else:
        with pytest.raises(ValueError, match="x is on cpu"):
            qg.quant_matmul(torch.randn(2, 72), pw)
