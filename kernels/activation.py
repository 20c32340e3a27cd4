"""SiLU gate of the LLaMA MLP: out = silu(gate) * up, as runtime._C.silu_mul.

gate and up may be row-strided views, e.g. the two halves of one fused
gate_up projection output [T, 2F], so the halves are never copied apart.
silu(g) is computed as g / (1 + exp(-g)) in fp32: for g -> -inf, exp
overflows to inf and the quotient is -0, the right limit, never nan.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import FLOATS, cdiv, check_tensor, device, out_buffer



@triton.jit
def _silu_mul_kernel(G, U, O, stride_g, stride_u, stride_o, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(O + row * stride_o + cols, y.to(O.dtype.element_ty), mask=mask)


def _check(gate, up) -> None:
    for name, a in (("gate", gate), ("up", up)):
        check_tensor("silu_mul", name, a, ("T", "F"))
    if up.shape != gate.shape:
        raise ValueError(f"silu_mul: up must have gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
    if up.dtype != gate.dtype:
        raise ValueError(f"silu_mul: gate and up must have one dtype, got {gate.dtype} and {up.dtype}")
    if up.device != gate.device:
        raise ValueError(f"silu_mul: gate is on {gate.device} but up is on {up.device}")


def silu_mul(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up for gate, up [T, F] (rows may be strided); result in their dtype."""
    _check(gate, up)
    if gate.device.type != device().type:
        raise ValueError(f"silu_mul: gate is on {gate.device} but the kernels run on {device()}")
    T, F = gate.shape
    # The kernel needs unit stride along F; a view with another one is rare, so copy it.
    gate = gate if gate.stride(1) == 1 else gate.contiguous()
    up = up if up.stride(1) == 1 else up.contiguous()
    out = out_buffer("silu_mul", out, (T, F), gate)
    if T == 0 or F == 0:
        return out
    block = min(triton.next_power_of_2(F), 1024)  # F = 11008 still gives 11 programs at T = 1
    _silu_mul_kernel[(T, cdiv(F, block))](gate, up, out, gate.stride(0), up.stride(0), out.stride(0),
                                          F, BLOCK=block, num_warps=4)
    return out


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain torch silu(gate) * up, fp32 math, result in gate's dtype."""
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(gate.dtype)
