"""What every kernel file shares: the interpreter switch, the device, autotune."""
from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device() -> torch.device:
    """Where kernel tensors live: CUDA, or the CPU under the interpreter."""
    if torch.cuda.is_available() and not interpreting():
        return torch.device("cuda")
    if interpreting():
        return torch.device("cpu")
    raise RuntimeError("the Triton kernels need a CUDA GPU (torch.cuda.is_available() is False); "
                       "set TRITON_INTERPRET=1 before importing triton to run them on the CPU interpreter")


def autotune(configs: list, key: list[str], **kw):
    """triton.autotune, but with only the first config under the interpreter
    (its autotuner cannot benchmark several: "0 active drivers"). Put a
    small, test-friendly config first."""
    return triton.autotune(configs=configs[:1] if interpreting() else configs, key=key, **kw)


FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def shape_str(a) -> str:
    """A tensor's shape, or the type of whatever was passed instead (error messages)."""
    return str(tuple(a.shape)) if isinstance(a, torch.Tensor) else type(a).__name__


def check_tensor(op: str, name: str, a, dims: tuple[str, ...], floats: bool = True) -> None:
    """ValueError naming `op` unless `a` is a tensor with one dimension per name
    in `dims` and, with `floats`, a float32/float16/bfloat16 dtype."""
    if not isinstance(a, torch.Tensor) or a.dim() != len(dims):
        raise ValueError(f"{op}: {name} must be a {len(dims)}-D tensor [{', '.join(dims)}], "
                         f"got {shape_str(a)}")
    if floats and a.dtype not in FLOATS:
        raise ValueError(f"{op}: {name} dtype must be float32, float16 or bfloat16, got {a.dtype}")


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def out_buffer(op: str, out: "torch.Tensor | None", shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """`out` if it is a usable [shape] buffer of like's dtype with unit stride along
    the last dim, a new one if out is None; else a ValueError naming `op`."""
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or out.stride(-1) != 1:
        raise ValueError(f"{op}: out must be {list(shape)} {like.dtype} with unit column stride, "
                         f"got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
    return out
