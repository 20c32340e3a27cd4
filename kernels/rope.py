"""Rotary position embedding, in place on x [T, H, Dh], as runtime._C.rope_.

The pair rotated by angle theta[pos, i] is (i, i + R/2) in the rotate-half
(Hugging Face) layout and (2i, 2i + 1) in the interleaved (Meta) layout:
    x1' = x1*c - x2*s,  x2' = x2*c + x1*s.
R = 2 * cos.shape[1] may be less than Dh (partial rotary): dims >= R are not
touched. x may be a view into a fused qkv output: rows (tokens) and heads can
have any stride as long as each head's Dh values are contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import FLOATS, cdiv, check_tensor, device
from ._util import shape_str as _shape

_MAX_TILE = 4096  # heads x pairs per program, so the tile stays in registers


@triton.jit
def _rope_kernel(X, POS, COS, SIN, stride_xt, stride_xh, stride_c, H, HALF,
                 INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    t = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    pairs = tl.arange(0, BLOCK_P)
    pmask = pairs < HALF
    # cos/sin are read once per token and reused by every head in the tile.
    pos = tl.load(POS + t).to(tl.int64)
    c = tl.load(COS + pos * stride_c + pairs, mask=pmask, other=0.0).to(tl.float32)
    s = tl.load(SIN + pos * stride_c + pairs, mask=pmask, other=0.0).to(tl.float32)
    if INTERLEAVED:
        off1 = 2 * pairs
        off2 = 2 * pairs + 1
    else:
        off1 = pairs
        off2 = pairs + HALF
    base = X + t.to(tl.int64) * stride_xt + heads[:, None].to(tl.int64) * stride_xh
    mask = (heads[:, None] < H) & pmask[None, :]
    p1 = base + off1[None, :]
    p2 = base + off2[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    c = c[None, :]
    s = s[None, :]
    tl.store(p1, (x1 * c - x2 * s).to(X.dtype.element_ty), mask=mask)
    tl.store(p2, (x2 * c + x1 * s).to(X.dtype.element_ty), mask=mask)


def _check(x, positions, cos, sin, check_positions: bool) -> None:
    check_tensor("rope_", "x", x, ("T", "H", "Dh"))
    T, H, Dh = x.shape
    if x.stride(2) != 1 and Dh > 1:
        raise ValueError(f"rope_: each head's Dh values must be contiguous (x.stride(2) == 1), "
                         f"got strides {x.stride()}")
    if not isinstance(positions, torch.Tensor) or tuple(positions.shape) != (T,):
        raise ValueError(f"rope_: positions must be [T] = [{T}] (T from x), got {_shape(positions)}")
    if positions.dtype != torch.int32:
        raise ValueError(f"rope_: positions must be int32, got {positions.dtype}")
    check_tensor("rope_", "cos", cos, ("P", "R/2"), floats=False)
    if not isinstance(sin, torch.Tensor) or sin.shape != cos.shape:
        raise ValueError(f"rope_: sin must have cos's shape {tuple(cos.shape)}, got {_shape(sin)}")
    if cos.dtype not in FLOATS or sin.dtype not in FLOATS:
        raise ValueError(f"rope_: cos/sin must be float tensors, got {cos.dtype}/{sin.dtype}")
    if 2 * cos.shape[1] > Dh:
        raise ValueError(f"rope_: rotary dim R = 2*cos.shape[1] = {2 * cos.shape[1]} exceeds "
                         f"head dim Dh = {Dh} of x {tuple(x.shape)}")
    for name, a in (("positions", positions), ("cos", cos), ("sin", sin)):
        if a.device != x.device:
            raise ValueError(f"rope_: x is on {x.device} but {name} is on {a.device}")
    if check_positions and T > 0:
        lo, hi = (int(v) for v in torch.aminmax(positions))  # one host sync
        P = cos.shape[0]
        if lo < 0 or hi >= P:
            bad = lo if lo < 0 else hi
            raise ValueError(f"rope_: position {bad} is out of range [0, {P}) of the cos/sin tables")


def rope_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          interleaved: bool, check_positions: bool = True) -> None:
    """Rotates x [T, H, Dh] in place by the angles of cos/sin [P, R/2] at positions [T].

    check_positions=False skips the range check, which costs a host sync (and
    so cannot run inside a CUDA graph); positions must then be in [0, P).
    """
    _check(x, positions, cos, sin, check_positions)
    if x.device.type != device().type:
        raise ValueError(f"rope_: x is on {x.device} but the kernels run on {device()}")
    T, H, Dh = x.shape
    half = cos.shape[1]
    if T == 0 or H == 0 or half == 0:
        return
    cos, sin = cos.contiguous(), sin.contiguous()
    positions = positions.contiguous()
    block_p = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(H), max(1, _MAX_TILE // block_p))
    grid = (T, cdiv(H, block_h))
    _rope_kernel[grid](x, positions, cos, sin, x.stride(0), x.stride(1), cos.stride(0), H, half,
                       INTERLEAVED=bool(interleaved), BLOCK_H=block_h, BLOCK_P=block_p,
                       num_warps=4)


def rope_ref(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             interleaved: bool) -> torch.Tensor:
    """Plain torch RoPE: returns the rotated copy of x (fp32 math, x's dtype)."""
    out = x.float().clone()
    half = cos.shape[1]
    c = cos.float()[positions.long()][:, None, :]  # [T, 1, R/2]
    s = sin.float()[positions.long()][:, None, :]
    if interleaved:
        i1, i2 = slice(0, 2 * half, 2), slice(1, 2 * half, 2)
    else:
        i1, i2 = slice(0, half), slice(half, 2 * half)
    x1, x2 = out[..., i1].clone(), out[..., i2].clone()
    out[..., i1] = x1 * c - x2 * s
    out[..., i2] = x2 * c + x1 * s
    return out.to(x.dtype)
