"""Weight-only quantized GEMM y = x @ W.T for int8 / int4 / int3 weights.

Lingli's portable layout (runtime/quant/formats.py) is row-major [N, K] in
32-input blocks for CPU SIMD. A GPU program wants the opposite: a tile of
BLOCK_N output columns reads, for each K step, one contiguous run along N
(coalesced), and every packed word holds consecutive K values of a single
column, so unpacking is shifts and masks on one word and never straddles two.
``repack`` converts once, offline. K is padded to Kp (a multiple of G) as in
the portable format; group g covers inputs [g*G, (g+1)*G).

int8, symmetric (w = s * q):
    qweight: int8  [Kp, N]        row k = input k, one byte per weight
    scales:  f16   [Kp/G, N]
    -> 8 + 16/G bits per weight (G=128: 8.125, G=32: 8.5)

int4, asymmetric (w = s * q + m):
    qweight: int32 [Kp/8, N]      word (j, n) holds inputs 8j..8j+7 of column n
              bits 31..28  27..24 ...  7..4    3..0
                  q[8j+7]  q[8j+6] ... q[8j+1]  q[8j]
    scales, mins: f16 [Kp/G, N]
    -> 4 + 32/G bits per weight (G=128: 4.25, G=32: 5.0)

int3, asymmetric (w = s * q + m), two bit planes so no value straddles a word:
    qweight: int32 [Kp/16, N]     low 2 bits; word (j, n), bits 2i+1..2i = q[16j+i] & 3
              bits 31..30   ...  3..2      1..0
                  q[16j+15] ... q[16j+1]  q[16j]
    qhigh:   int32 [Kp/32, N]     high bit; word (j, n), bit i = q[32j+i] >> 2
    scales, mins: f16 [Kp/G, N]
    -> 3 + 32/G bits per weight (G=128: 3.25, G=32: 4.0): int3 reads 3/4 of
       int4's code bytes, which is what makes it faster when decode is
       bandwidth-bound.

Two kernels share one dequantizing tile loader (fp32 math in registers):
a split-K kernel for decode (M <= 16: few rows, so parallelism comes from
splitting K and the partial sums are added with fp32 atomics), and a tiled
kernel with grouped program order for prefill. Both accumulate in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from runtime.quant.formats import QuantizedTensor, check_format, padded_k

from ._util import FLOATS, autotune, cdiv, check_tensor, interpreting
from ._util import device as default_device

SPLITK_MAX_M = 16          # the decode kernel pads M to one 16-row dot tile
# the packed K rows per int32 word of the main plane (int8 is one byte per row)
_K_PER_WORD = {8: 1, 4: 8, 3: 16}


def packed_shapes(n: int, k: int, bits: int,
                  group_size: int) -> dict[str, tuple[tuple[int, int], torch.dtype]]:
    """name -> (shape, dtype) of the repacked tensors of a weight [n, k]."""
    check_format(bits, group_size)
    kp = padded_k(k, group_size)
    out = {"qweight": ((kp // _K_PER_WORD[bits], n), torch.int8 if bits == 8 else torch.int32),
           "scales": ((kp // group_size, n), torch.float16)}
    if bits != 8:
        out["mins"] = ((kp // group_size, n), torch.float16)
    if bits == 3:
        out["qhigh"] = ((kp // 32, n), torch.int32)
    return out


@dataclass
class PackedWeight:
    """A quantized weight [n, k] in the K-major GPU layout above (tensors on one device)."""

    bits: int
    group_size: int
    n: int
    k: int
    kp: int
    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None = None
    qhigh: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.qweight, self.scales, self.mins, self.qhigh) if t is not None)


def _words(codes: np.ndarray, per_word: int, width: int) -> np.ndarray:
    """codes [N, Kp] -> int32 [Kp/per_word, N], `width` bits per code, code i of a word at bit i*width."""
    n, kp = codes.shape
    c = codes.astype(np.uint32).reshape(n, kp // per_word, per_word)
    shifts = (np.arange(per_word, dtype=np.uint32) * width)
    words = np.bitwise_or.reduce(c << shifts, axis=2)       # disjoint bit fields
    return np.ascontiguousarray(words.view(np.int32).T)


def repack(qt: QuantizedTensor, device: torch.device | str | None = None) -> PackedWeight:
    """Offline repacking of the portable format into the K-major GPU layout."""
    dev = torch.device(device) if device is not None else default_device()
    n, k = qt.shape
    codes = qt.codes()                                       # [N, Kp]
    if qt.bits == 8:
        qweight = np.ascontiguousarray(codes.astype(np.int8).T)
        qhigh = None
    elif qt.bits == 4:
        qweight, qhigh = _words(codes, 8, 4), None
    else:
        qweight, qhigh = _words(codes & 3, 16, 2), _words(codes >> 2, 32, 1)

    def t(a):
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(dev)

    # int4/int3 group parameters are stored as codes on the CPU (formats.py); the
    # GPU kernels read them as f16, decoded here once (f16 holds them to 11 bits).
    scales = qt.group_scales().astype(np.float16)
    mins = None if qt.bits == 8 else qt.group_mins().astype(np.float16)
    return PackedWeight(qt.bits, qt.group_size, n, k, qt.padded_k, t(qweight), t(scales.T),
                        t(None if mins is None else mins.T), t(qhigh))


def dequantize_packed(pw: PackedWeight) -> torch.Tensor:
    """float32 [N, K] decoded from the repacked layout in torch (the kernels' reference)."""
    dev = pw.device
    if pw.bits == 8:
        q = pw.qweight.float()
    else:
        def unpack(words, per_word, width):
            shifts = torch.arange(per_word, device=dev, dtype=torch.int32) * width
            vals = (words[:, None, :] >> shifts[None, :, None]) & ((1 << width) - 1)
            return vals.reshape(-1, pw.n)
        if pw.bits == 4:
            q = unpack(pw.qweight, 8, 4)
        else:
            q = unpack(pw.qweight, 16, 2) | (unpack(pw.qhigh, 32, 1) << 2)
        q = q.float()
    g = q.reshape(pw.kp // pw.group_size, pw.group_size, pw.n)
    w = g * pw.scales.float()[:, None, :]                    # same op order as formats.dequantize
    if pw.mins is not None:
        w = w + pw.mins.float()[:, None, :]
    return w.reshape(pw.kp, pw.n)[:pw.k].T.contiguous()


# ------------------------------------------------------------------ kernels
@triton.jit
def _load_w(qw_ptr, qh_ptr, s_ptr, m_ptr, k0, offs_n, n_mask, N, Kp,
            BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """fp32 weights [BLOCK_K, BLOCK_N] for inputs k0.. (k0 a multiple of BLOCK_K); zero past Kp."""
    if BITS == 8:
        rk = k0 + tl.arange(0, BLOCK_K)
        q = tl.load(qw_ptr + rk[:, None] * N + offs_n[None, :],
                    mask=(rk[:, None] < Kp) & n_mask[None, :], other=0)
    elif BITS == 4:
        rw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        w = tl.load(qw_ptr + rw[:, None] * N + offs_n[None, :],
                    mask=(rw[:, None] < Kp // 8) & n_mask[None, :], other=0)
        # arithmetic >> is fine: the mask drops the sign bits
        q = (w[:, None, :] >> (tl.arange(0, 8) * 4)[None, :, None]) & 0xF
        q = tl.reshape(q, (BLOCK_K, BLOCK_N))
    else:
        r2 = k0 // 16 + tl.arange(0, BLOCK_K // 16)
        w2 = tl.load(qw_ptr + r2[:, None] * N + offs_n[None, :],
                     mask=(r2[:, None] < Kp // 16) & n_mask[None, :], other=0)
        r1 = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        w1 = tl.load(qh_ptr + r1[:, None] * N + offs_n[None, :],
                     mask=(r1[:, None] < Kp // 32) & n_mask[None, :], other=0)
        lo = (w2[:, None, :] >> (tl.arange(0, 16) * 2)[None, :, None]) & 3
        hi = (w1[:, None, :] >> tl.arange(0, 32)[None, :, None]) & 1
        q = tl.reshape(lo, (BLOCK_K, BLOCK_N)) | (tl.reshape(hi, (BLOCK_K, BLOCK_N)) << 2)
    q = q.to(tl.float32)
    if BLOCK_K <= GROUP:
        # the whole tile is inside one group: one scale (and min) row
        g = k0 // GROUP
        gmask = n_mask & (g < Kp // GROUP)
        s = tl.load(s_ptr + g * N + offs_n, mask=gmask, other=0.0).to(tl.float32)
        w = q * s[None, :]
        if BITS != 8:
            w = w + tl.load(m_ptr + g * N + offs_n, mask=gmask, other=0.0).to(tl.float32)[None, :]
    else:
        rg = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
        gmask = (rg[:, None] < Kp // GROUP) & n_mask[None, :]
        s = tl.load(s_ptr + rg[:, None] * N + offs_n[None, :], mask=gmask, other=0.0).to(tl.float32)
        w = tl.reshape(q, (BLOCK_K // GROUP, GROUP, BLOCK_N)) * s[:, None, :]
        if BITS != 8:
            m = tl.load(m_ptr + rg[:, None] * N + offs_n[None, :], mask=gmask, other=0.0)
            w = w + m.to(tl.float32)[:, None, :]
        w = tl.reshape(w, (BLOCK_K, BLOCK_N))
    return w


@triton.jit
def _mma(x, w, acc, DOT_F32: tl.constexpr):
    if DOT_F32:
        # ieee: fp32 activations keep fp32 products (tf32 would drop to 10 mantissa bits)
        return tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
    return tl.dot(x, w.to(x.dtype), acc)


def _cfg(bn, bk, split, warps, stages, **kw):
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, **kw},
                         num_warps=warps, num_stages=stages)


# First config small for the interpreter; the rest trade tile size against the
# number of programs (decode needs enough of them in flight to saturate HBM).
_SPLITK_CONFIGS = [
    _cfg(32, 64, 2, 2, 1),
    _cfg(64, 128, 1, 4, 3), _cfg(64, 128, 2, 4, 3), _cfg(64, 128, 4, 4, 3), _cfg(64, 128, 8, 4, 3),
    _cfg(128, 128, 2, 4, 3), _cfg(128, 128, 4, 4, 3), _cfg(128, 128, 8, 4, 3),
    _cfg(128, 256, 4, 8, 3), _cfg(256, 64, 4, 8, 4), _cfg(256, 128, 8, 8, 3), _cfg(32, 256, 4, 4, 3),
]


@autotune(configs=_SPLITK_CONFIGS, key=["N", "Kp", "BITS", "GROUP", "BLOCK_M"], reset_to_zero=["y_ptr"])
@triton.jit
def _splitk_kernel(x_ptr, qw_ptr, qh_ptr, s_ptr, m_ptr, y_ptr, M, N, K, Kp, stride_xm, stride_xk,
                   BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, DOT_F32: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """y (fp32, zeroed) += x[:, Ks] @ W[Ks, cols] for this program's contiguous share Ks of K."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    n_kb = tl.cdiv(Kp, BLOCK_K)
    per = tl.cdiv(n_kb, SPLIT_K)
    kb_end = tl.minimum(pid_k * per + per, n_kb)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(pid_k * per, kb_end):
        rk = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        # x is zero past K: padded codes decode to the group min, not to 0
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=m_mask[:, None] & (rk[None, :] < K), other=0.0)
        w = _load_w(qw_ptr, qh_ptr, s_ptr, m_ptr, kb * BLOCK_K, offs_n, n_mask, N, Kp,
                    BITS, GROUP, BLOCK_K, BLOCK_N)
        if BLOCK_M == 1:
            # a GEMV: FMAs and a reduction, no 16-row padding of a dot
            acc += tl.sum(tl.trans(x.to(tl.float32)) * w, axis=0)[None, :]
        else:
            acc = _mma(x, w, acc, DOT_F32)
    y_ptrs = y_ptr + offs_m[:, None] * N + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc, mask=mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask, sem="relaxed")


def _tcfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


_TILED_CONFIGS = [
    _tcfg(32, 32, 64, 4, 2),
    _tcfg(32, 128, 128, 4, 4), _tcfg(64, 64, 64, 4, 4), _tcfg(64, 128, 64, 4, 4),
    _tcfg(64, 128, 128, 8, 3), _tcfg(128, 64, 64, 4, 4), _tcfg(128, 128, 64, 8, 3),
    _tcfg(128, 256, 64, 8, 3), _tcfg(64, 256, 64, 8, 3),
]


@autotune(configs=_TILED_CONFIGS, key=["M_BUCKET", "N", "Kp", "BITS", "GROUP"])
@triton.jit
def _tiled_kernel(x_ptr, qw_ptr, qh_ptr, s_ptr, m_ptr, y_ptr, M, N, K, Kp, stride_xm, stride_xk,
                  M_BUCKET, BITS: tl.constexpr, GROUP: tl.constexpr, DOT_F32: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of y over all of K."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M row tiles in a row reuse each dequantized column's
    # weights from L2 instead of reading them from HBM again
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, Kp, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=m_mask[:, None] & (rk[None, :] < K), other=0.0)
        w = _load_w(qw_ptr, qh_ptr, s_ptr, m_ptr, k0, offs_n, n_mask, N, Kp,
                    BITS, GROUP, BLOCK_K, BLOCK_N)
        acc = _mma(x, w, acc, DOT_F32)
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


# ------------------------------------------------------------------ host side
def _check(x: torch.Tensor, pw: PackedWeight, kernel: str) -> None:
    if not isinstance(pw, PackedWeight):
        raise ValueError(f"quant_matmul: pw must be a PackedWeight (see repack), got {type(pw).__name__}")
    check_tensor("quant_matmul", "x", x, ("M", "K"), floats=False)
    if x.shape[1] != pw.k:
        raise ValueError(f"quant_matmul: x has K={x.shape[1]} inputs but the weight [{pw.n}, {pw.k}] "
                         f"expects K={pw.k}")
    if x.dtype not in FLOATS:
        raise ValueError(f"quant_matmul: x dtype must be float16 or float32 (bfloat16 on a GPU), "
                         f"got {x.dtype}")
    if x.dtype == torch.bfloat16 and interpreting():
        raise ValueError("quant_matmul: bfloat16 x is not supported in the Triton interpreter "
                         "(its bf16 tl.dot is wrong); use float16 or float32")
    if x.device != pw.device:
        raise ValueError(f"quant_matmul: x is on {x.device} but the weight is on {pw.device}")
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(f"quant_matmul: x is on {x.device}; the kernels need CUDA tensors "
                         "(or TRITON_INTERPRET=1 set before importing triton)")
    if kernel not in ("auto", "splitk", "tiled"):
        raise ValueError(f"quant_matmul: kernel must be 'auto', 'splitk' or 'tiled', got {kernel!r}")
    if kernel == "splitk" and x.shape[0] > SPLITK_MAX_M:
        raise ValueError(f"quant_matmul: the split-K kernel handles M <= {SPLITK_MAX_M}, got M={x.shape[0]}")


def quant_matmul(x: torch.Tensor, pw: PackedWeight, kernel: str = "auto") -> torch.Tensor:
    """y [M, N] = x [M, K] @ W.T in x's dtype, fp32 accumulation.

    kernel: "auto" (split-K for M <= 16, tiled above), or "splitk" / "tiled" to force one.
    """
    _check(x, pw, kernel)
    m = x.shape[0]
    if m == 0:
        return torch.empty((0, pw.n), dtype=x.dtype, device=x.device)
    # unused planes still need a valid pointer
    qh = pw.qhigh if pw.qhigh is not None else pw.qweight
    mins = pw.mins if pw.mins is not None else pw.scales
    dot_f32 = x.dtype == torch.float32
    args = (x, pw.qweight, qh, pw.scales, mins)
    shape = (m, pw.n, pw.k, pw.kp, x.stride(0), x.stride(1))
    if kernel == "splitk" or (kernel == "auto" and m <= SPLITK_MAX_M):
        y = torch.zeros((m, pw.n), dtype=torch.float32, device=x.device)   # atomics add into it
        grid = lambda meta: (cdiv(pw.n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        _splitk_kernel[grid](*args, y, *shape, BITS=pw.bits, GROUP=pw.group_size,
                             BLOCK_M=1 if m == 1 else SPLITK_MAX_M, DOT_F32=dot_f32)
        return y if x.dtype == torch.float32 else y.to(x.dtype)
    y = torch.empty((m, pw.n), dtype=x.dtype, device=x.device)
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(pw.n, meta["BLOCK_N"]),)  # noqa: E731
    # autotune per power-of-two bucket of M, not per prompt length
    _tiled_kernel[grid](*args, y, *shape, triton.next_power_of_2(m), BITS=pw.bits,
                        GROUP=pw.group_size, DOT_F32=dot_f32)
    return y


def quant_matmul_ref(x: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """Plain torch reference: fp32 x @ fp32 dequantized W.T, cast to x's dtype."""
    return (x.float() @ dequantize_packed(pw).T).to(x.dtype)


def bytes_moved(pw: PackedWeight, m: int, act_bytes: int = 2) -> int:
    """Bytes one call reads and writes: packed weights, scales/mins, x [m, K] and y [m, N]."""
    return pw.nbytes + m * (pw.k + pw.n) * act_bytes
