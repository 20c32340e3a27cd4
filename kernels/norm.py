"""Fused RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, one program per row.

Matches runtime._C.rms_norm (csrc/norm.cpp) except that the sum of squares is
accumulated in fp32 (a tree reduction in registers, not a serial sum, so it
loses far fewer digits than a serial fp32 loop would) where the CPU uses double.
Math is fp32 whatever x's dtype; y has x's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import FLOATS, check_tensor, device, out_buffer, shape_str

# A row up to this many elements is held in registers (one read of x); longer
# rows are streamed twice in chunks of this size.
_MAX_BLOCK = 8192


@triton.jit
def _rms_norm_kernel(X, W, Y, stride_x, stride_y, H, eps,
                     BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: T * stride can pass 2^31
    x_row = X + row * stride_x
    y_row = Y + row * stride_y
    cols = tl.arange(0, BLOCK)
    if ONE_PASS:
        mask = cols < H
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, (x * inv * w).to(Y.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, H, BLOCK):
            mask = start + cols < H
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            acc += x * x
        inv = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / H + eps)
        for start in range(0, H, BLOCK):
            mask = start + cols < H
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + start + cols, (x * inv * w).to(Y.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    check_tensor("rms_norm", "x", x, ("T", "H"))
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (x.shape[1],):
        raise ValueError(f"rms_norm: weight must be [H] = [{x.shape[1]}] (H from x), "
                         f"got {shape_str(weight)}")
    if weight.dtype not in FLOATS:
        raise ValueError(f"rms_norm: weight dtype must be a float type, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: x is on {x.device} but weight is on {weight.device}")
    if not eps >= 0:  # also rejects nan
        raise ValueError(f"rms_norm: eps must be >= 0, got {eps}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of each row of x [T, H] (rows may be strided) scaled by weight [H].

    Returns y [T, H] in x's dtype (written into ``out`` when given).
    """
    _check(x, weight, eps)
    if x.device.type != device().type:
        raise ValueError(f"rms_norm: x is on {x.device} but the kernels run on {device()}")
    T, H = x.shape
    if x.stride(1) != 1:  # the kernel needs unit stride along H
        x = x.contiguous()
    weight = weight.contiguous()
    out = out_buffer("rms_norm", out, (T, H), x)
    if T == 0 or H == 0:
        return out
    block = min(triton.next_power_of_2(H), _MAX_BLOCK)
    _rms_norm_kernel[(T,)](x, weight, out, x.stride(0), out.stride(0), H, float(eps),
                           BLOCK=block, ONE_PASS=block >= H,
                           num_warps=4 if block <= 2048 else 8)
    return out


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain torch RMSNorm, fp32 math, result in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype)
