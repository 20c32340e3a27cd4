"""Fused elementwise Triton kernels (kernels/norm.py, rope.py, activation.py).

Each kernel is checked against its torch reference and against the CPU op of
runtime._C on the same float32 data, over awkward shapes, fp32 and fp16
inputs and strided views. Runs in Triton's interpreter without a GPU
(conftest.py sets TRITON_INTERPRET=1 before triton is imported).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ref_ops as ref
from kernels._util import device
from kernels.activation import silu_mul, silu_mul_ref
from kernels.norm import rms_norm, rms_norm_ref
from kernels.rope import rope_, rope_ref
from runtime import _C

DEV = device()
# fp16 results are rounded to 11 significant bits.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def gen(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEV)


def npy(t: torch.Tensor) -> np.ndarray:
    """A float32 numpy copy for the CPU ops (exact for fp16 values; never shares memory with t)."""
    return t.float().cpu().numpy().copy()


def close(got: torch.Tensor, want, dtype: torch.dtype, scale: float = 1.0) -> None:
    """got against want (tensor or numpy), atol scaled to the data's magnitude."""
    want = torch.as_tensor(want).to(torch.float32)
    tol = TOL[dtype]
    torch.testing.assert_close(got.float().cpu(), want, rtol=tol["rtol"], atol=tol["atol"] * scale)


# ---------------------------------------------------------------- rms_norm --

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,H", [(T, H) for T in (1, 3, 17) for H in (100, 576)]
                         + [(2, 4096), (2, 8192 + 37)])  # the last one streams the row twice
def test_rms_norm(T, H, dtype):
    x32 = gen(T * H, T, H, scale=30.0)
    w = gen(H, H)
    x = x32.to(dtype)
    for eps in (1e-5, 1e-6):
        y = rms_norm(x, w, eps)
        assert y.shape == (T, H) and y.dtype == dtype
        want = rms_norm_ref(x, w, eps)
        scale = want.float().abs().max().item()
        close(y, want, dtype, scale)
        # The CPU op sees the very values the kernel read (x rounded to dtype).
        close(y, _C.rms_norm(npy(x), npy(w), eps), dtype, scale)


def test_rms_norm_strided_rows_and_out():
    T, H = 3, 100
    big = gen(1, T, H + 13, scale=5.0)
    x = big[:, 7:7 + H]  # row stride H + 13
    w = gen(2, H)
    out = torch.full((T, H), float("nan"), device=DEV)
    assert rms_norm(x, w, 1e-6, out=out) is out
    close(out, ref.rms_norm(npy(x), npy(w), 1e-6), torch.float32, 5.0)
    # fp16 activations with an fp32 weight, as the runtime stores them
    y = rms_norm(x.half(), w, 1e-6)
    assert y.dtype == torch.float16
    close(y, rms_norm_ref(x.half(), w, 1e-6), torch.float16, y.float().abs().max().item())


# -------------------------------------------------------------------- rope --

P = 40  # positions in the cos/sin tables


def tables(R: int):
    cos, sin = ref.rope_tables(P, R)
    return torch.from_numpy(cos).to(DEV), torch.from_numpy(sin).to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("T,H,Dh,R", [(1, 1, 64, 64), (3, 4, 40, 40), (17, 3, 64, 32),
                                      (3, 2, 7, 6), (3, 5, 7, 4)])
def test_rope(T, H, Dh, R, interleaved, dtype):
    cos, sin = tables(R)
    x = gen(T * H * Dh + R, T, H, Dh).to(dtype)
    g = torch.Generator().manual_seed(T + R)
    pos = torch.randint(0, P, (T,), generator=g, dtype=torch.int32).to(DEV)
    pos[0] = P - 1  # the last row of the table is reachable
    want = rope_ref(x, pos, cos, sin, interleaved)
    want_c = npy(x)
    _C.rope_(want_c, npy(pos).astype(np.int32), npy(cos), npy(sin), interleaved)
    x0 = x.clone()
    assert rope_(x, pos, cos, sin, interleaved) is None
    close(x, want, dtype)
    close(x, want_c, dtype)
    assert torch.equal(x[..., R:], x0[..., R:])  # partial rotary: untouched
    if R > 0:
        assert not torch.equal(x[..., :R], x0[..., :R])


def test_rope_fused_qkv_view():
    """q and k rotated in place inside one fused qkv output with padded rows."""
    T, Hq, Hkv, Dh, R = 5, 4, 2, 40, 32
    width = (Hq + 2 * Hkv) * Dh + 8  # row stride is not H * Dh
    qkv = gen(7, T, width)
    before = qkv.clone()
    q = qkv[:, : Hq * Dh].view(T, Hq, Dh)
    k = qkv[:, Hq * Dh: (Hq + Hkv) * Dh].view(T, Hkv, Dh)
    assert q.stride(0) == width
    cos, sin = tables(R)
    pos = torch.arange(T, dtype=torch.int32, device=DEV) + 3
    want_q = rope_ref(q, pos, cos, sin, False)
    want_k = rope_ref(k, pos, cos, sin, False)
    rope_(q, pos, cos, sin, False)
    rope_(k, pos, cos, sin, False)
    close(q, want_q, torch.float32)
    close(k, want_k, torch.float32)
    assert torch.equal(qkv[:, (Hq + Hkv) * Dh:], before[:, (Hq + Hkv) * Dh:])  # v and padding


def test_rope_layouts_differ():
    cos, sin = tables(8)
    x = torch.arange(8, dtype=torch.float32, device=DEV).reshape(1, 1, 8)
    a, b = x.clone(), x.clone()
    pos = torch.tensor([3], dtype=torch.int32, device=DEV)
    rope_(a, pos, cos, sin, False)
    rope_(b, pos, cos, sin, True)
    assert not torch.allclose(a, b)


# -------------------------------------------------------------- silu_mul --

@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy exp at g = -1e4
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,F", [(1, 1), (3, 7), (17, 33), (3, 2051)])
def test_silu_mul(T, F, dtype):
    g32 = gen(T * F, T, F, scale=5.0)
    g32.view(-1)[0] = -1e4  # exp(-g) overflows: must give -0, not nan
    if g32.numel() > 1:
        g32.view(-1)[1] = 1e4
    gate, up = g32.to(dtype), gen(F + 1, T, F).to(dtype)
    y = silu_mul(gate, up)
    assert y.shape == (T, F) and y.dtype == dtype
    assert torch.isfinite(y).all()
    scale = max(1.0, up.float().abs().max().item())
    close(y, silu_mul_ref(gate, up), dtype, scale)
    close(y, _C.silu_mul(npy(gate), npy(up)), dtype, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_mul_fused_halves(dtype):
    """gate and up as the two halves of one [T, 2F] tensor, no copies made."""
    T, F = 3, 37
    gu = gen(3, T, 2 * F, scale=4.0).to(dtype)
    gate, up = gu[:, :F], gu[:, F:]
    assert gate.stride(0) == 2 * F and not gate.is_contiguous()
    out = torch.empty(T, F, dtype=dtype, device=DEV)
    assert silu_mul(gate, up, out=out) is out
    close(out, silu_mul_ref(gate, up), dtype, 4.0)
    close(out, _C.silu_mul(npy(gate), npy(up)), dtype, 4.0)


# ------------------------------------------------------------- bad inputs --

def _rope_args(**kw):
    a = dict(x=torch.zeros(2, 3, 8), positions=torch.zeros(2, dtype=torch.int32),
             cos=torch.zeros(5, 4), sin=torch.zeros(5, 4), interleaved=False)
    a.update(kw)
    return a


BAD = [
    ("rms_x_1d", lambda: rms_norm(torch.zeros(8), torch.zeros(8), 1e-5), "2-D"),
    ("rms_x_int", lambda: rms_norm(torch.zeros(2, 8, dtype=torch.int32), torch.zeros(8), 1e-5), "dtype"),
    ("rms_w_shape", lambda: rms_norm(torch.zeros(2, 8), torch.zeros(7), 1e-5), r"weight must be \[H\]"),
    ("rms_eps", lambda: rms_norm(torch.zeros(2, 8), torch.zeros(8), -1.0), "eps"),
    ("rms_out", lambda: rms_norm(torch.zeros(2, 8), torch.zeros(8), 1e-5, out=torch.zeros(2, 7)), "out"),
    ("rope_x_2d", lambda: rope_(**_rope_args(x=torch.zeros(2, 8))), "3-D"),
    ("rope_x_int", lambda: rope_(**_rope_args(x=torch.zeros(2, 3, 8, dtype=torch.int64))), "dtype"),
    ("rope_x_stride", lambda: rope_(**_rope_args(x=torch.zeros(2, 8, 3).transpose(1, 2))), "contiguous"),
    ("rope_pos_dtype", lambda: rope_(**_rope_args(positions=torch.zeros(2, dtype=torch.int64))), "int32"),
    ("rope_pos_shape", lambda: rope_(**_rope_args(positions=torch.zeros(3, dtype=torch.int32))), r"\[T\]"),
    ("rope_sin_shape", lambda: rope_(**_rope_args(sin=torch.zeros(5, 3))), "sin"),
    ("rope_R_gt_Dh", lambda: rope_(**_rope_args(cos=torch.zeros(5, 5), sin=torch.zeros(5, 5))), "exceeds"),
    ("rope_pos_high", lambda: rope_(**_rope_args(positions=torch.tensor([0, 5], dtype=torch.int32))),
     "out of range"),
    ("rope_pos_neg", lambda: rope_(**_rope_args(positions=torch.tensor([-1, 0], dtype=torch.int32))),
     "out of range"),
    ("silu_shape", lambda: silu_mul(torch.zeros(2, 8), torch.zeros(2, 7)), "shape"),
    ("silu_dtype", lambda: silu_mul(torch.zeros(2, 8), torch.zeros(2, 8, dtype=torch.float16)), "dtype"),
    ("silu_1d", lambda: silu_mul(torch.zeros(8), torch.zeros(8)), "2-D"),
]


@pytest.mark.parametrize("call,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_rope_bad_position_leaves_x_alone():
    a = _rope_args(x=torch.ones(2, 3, 8), positions=torch.tensor([0, 9], dtype=torch.int32))
    with pytest.raises(ValueError):
        rope_(**a)
    assert torch.equal(a["x"], torch.ones(2, 3, 8))


def test_empty_inputs():
    z = dict(device=DEV)
    assert rms_norm(torch.zeros(0, 8, **z), torch.ones(8, **z), 1e-5).shape == (0, 8)
    assert silu_mul(torch.zeros(0, 8, **z), torch.zeros(0, 8, **z)).shape == (0, 8)
    rope_(torch.zeros(0, 3, 8, **z), torch.zeros(0, dtype=torch.int32, **z),
          torch.zeros(5, 4, **z), torch.zeros(5, 4, **z), False)
