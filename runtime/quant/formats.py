"""Lingli's portable quantized weight formats, spelled out (format version 1).

A weight W [N, K] (N output rows, K inputs) is quantized group-wise along K:
each row is cut into groups of G = 32, 64 or 128 inputs with their own scale
(and, for int4/int3, their own offset). K is padded with zeros up to a
multiple of G, Kp = ceil(K / G) * G; padded codes are 0 and meet zero
activations, so they never contribute. Codes are laid out in 32-input
blocks so SIMD code unpacks a block into 32 bytes in natural order with
shifts and masks only.

int8, symmetric:        w = s * q,      q in [-127, 127]
    q:      int8  [N, Kp]          one byte per weight
    scales: f16   [N, Kp / G]
    -> 8 + 16/G bits per weight (G=32: 8.5, like ggml Q8_0)

int4, asymmetric:       w = s * q + m,  q in [0, 15]
    q:      uint8 [N, Kp / 2]      per 32-input block b, 16 bytes:
            byte 16b+i = q[32b+i] | q[32b+16+i] << 4      (i = 0..15)
              +---- byte i ----+
              | hi: q[16+i] | lo: q[i] |     lo nibbles -> inputs 0..15,
              +----------------+             hi nibbles -> inputs 16..31
    scales, mins: f16 [N, Kp / G]
    -> 4 + 32/G bits per weight (G=32: 5.0 like Q4_1; G=64: 4.5 like Q4_0)

int3, asymmetric:       w = s * q + m,  q in [0, 7], two bit planes
    ql:     uint8 [N, Kp / 4]      low 2 bits; per 32-input block b, 8 bytes:
            byte 8b+i = sum_j (q[32b+8j+i] & 3) << 2j     (i = 0..7, j = 0..3)
              bits 7..6     5..4      3..2     1..0
                  q[24+i]  q[16+i]   q[8+i]    q[i]
            (broadcast the 8 bytes to four 64-bit lanes, shift lane j by 2j,
             mask 3: 32 bytes in natural order)
    qh:     uint8 [N, Kp / 8]      high bit; per 32-input block b, 4 bytes:
            bit e of the little-endian 32-bit word 4b..4b+3 = q[32b+e] >> 2
    scales, mins: f16 [N, Kp / G]
    -> 3 + 32/G bits per weight (G=32: 4.0, G=64: 3.5, G=128: 3.25)

This module is the numpy reference for the layouts: pack, unpack and
dequantize here are what the C++ kernels are tested against.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

GROUP_SIZES = (32, 64, 128)
BITS = (8, 4, 3)
BLOCK = 32  # inputs per packed block; every group size is a multiple


def padded_k(k: int, group_size: int) -> int:
    return -(-k // group_size) * group_size


def bits_per_weight(bits: int, group_size: int) -> float:
    """Storage cost including scales (f16) and, for int4/int3, offsets (f16)."""
    params = 1 if bits == 8 else 2
    return bits + 16 * params / group_size


def check_format(bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise ValueError(f"unsupported bit width {bits}; Lingli has int8, int4 and int3")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"unsupported group size {group_size}; choose one of {GROUP_SIZES}")


# ------------------------------------------------------------------ packing
def pack_int4(q: np.ndarray) -> np.ndarray:
    """codes uint8 [N, Kp] (0..15) -> uint8 [N, Kp/2] in the 32-block nibble layout."""
    n, kp = q.shape
    b = q.reshape(n, kp // BLOCK, 2, 16).astype(np.uint8)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(n, kp // 2)


def unpack_int4(p: np.ndarray) -> np.ndarray:
    n, half = p.shape
    b = p.reshape(n, half // 16, 1, 16)
    return np.concatenate([b & 0xF, b >> 4], axis=2).reshape(n, half * 2)


def pack_int3(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """codes uint8 [N, Kp] (0..7) -> (ql [N, Kp/4], qh [N, Kp/8])."""
    n, kp = q.shape
    b = q.reshape(n, kp // BLOCK, 4, 8).astype(np.uint8)          # [n, blocks, j, i]
    low = b & 3
    ql = low[:, :, 0] | (low[:, :, 1] << 2) | (low[:, :, 2] << 4) | (low[:, :, 3] << 6)
    high = (q.reshape(n, kp // 8, 8) >> 2).astype(np.uint8)        # bit e%8 of byte e//8
    qh = np.zeros((n, kp // 8), dtype=np.uint8)
    for bit in range(8):
        qh |= high[:, :, bit] << bit
    return ql.reshape(n, kp // 4), qh


def unpack_int3(ql: np.ndarray, qh: np.ndarray) -> np.ndarray:
    n, quarter = ql.shape
    kp = quarter * 4
    b = ql.reshape(n, kp // BLOCK, 1, 8)
    low = np.concatenate([(b >> (2 * j)) & 3 for j in range(4)], axis=2).reshape(n, kp)
    high = np.stack([(qh >> bit) & 1 for bit in range(8)], axis=2).reshape(n, kp)
    return low | (high << 2)


# ------------------------------------------------------------ the tensor
@dataclass
class QuantizedTensor:
    """A quantized weight [N, K] in the portable layout above."""

    bits: int
    group_size: int
    shape: tuple[int, int]          # logical (N, K)
    q: np.ndarray                   # int8 [N,Kp] | uint8 [N,Kp/2] | uint8 [N,Kp/4] (int3 low plane)
    scales: np.ndarray              # float16 [N, Kp/G]
    mins: np.ndarray | None = None  # float16 [N, Kp/G] (int4, int3)
    qh: np.ndarray | None = None    # uint8 [N, Kp/8] (int3 high plane)
    # How the CPU kernels quantize activations for this matrix: 1 = int8 blocks,
    # 2 = int8 blocks plus their quantized residual (~14 bits). A runtime choice
    # (CpuBackend.weight sets it), not part of the stored format.
    act_steps: int = field(default=1, compare=False)

    def __post_init__(self) -> None:
        check_format(self.bits, self.group_size)
        n, k = self.shape
        kp = padded_k(k, self.group_size)
        g = kp // self.group_size
        want = {8: (np.int8, (n, kp)), 4: (np.uint8, (n, kp // 2)),
                3: (np.uint8, (n, kp // 4))}[self.bits]
        _expect("q", self.q, *want)
        _expect("scales", self.scales, np.float16, (n, g))
        if self.bits == 8:
            if self.mins is not None or self.qh is not None:
                raise ValueError("int8 is symmetric: it has no mins and no high plane")
        else:
            _expect("mins", self.mins, np.float16, (n, g))
        if self.bits == 3:
            _expect("qh", self.qh, np.uint8, (n, kp // 8))
        elif self.qh is not None:
            raise ValueError(f"int{self.bits} has no high bit plane")

    @property
    def padded_k(self) -> int:
        return padded_k(self.shape[1], self.group_size)

    @property
    def n_groups(self) -> int:
        return self.padded_k // self.group_size

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.q, self.scales, self.mins, self.qh) if a is not None)

    @property
    def dtype_name(self) -> str:
        return f"int{self.bits}"

    def codes(self, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """Unpacked codes [n, Kp] (int8 signed for int8, uint8 otherwise)."""
        sel = slice(None) if rows is None else rows
        if self.bits == 8:
            return self.q[sel]
        if self.bits == 4:
            return unpack_int4(self.q[sel])
        return unpack_int3(self.ql_rows(sel), self.qh[sel])

    def ql_rows(self, sel):
        return self.q[sel]

    def dequantize(self, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """float32 [n, K]: the weights the kernels compute with (numpy reference)."""
        sel = slice(None) if rows is None else rows
        q = self.codes(sel).astype(np.float32)
        n = q.shape[0]
        g = q.reshape(n, self.n_groups, self.group_size)
        w = g * self.scales[sel].astype(np.float32)[:, :, None]
        if self.mins is not None:
            w += self.mins[sel].astype(np.float32)[:, :, None]
        return w.reshape(n, self.padded_k)[:, :self.shape[1]]

    def take_rows(self, rows: np.ndarray) -> np.ndarray:
        """Dequantized rows (embedding lookup)."""
        return self.dequantize(np.asarray(rows))

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"q": self.q, "scales": self.scales}
        if self.mins is not None:
            out["mins"] = self.mins
        if self.qh is not None:
            out["qh"] = self.qh
        return out


def concat_rows(parts: list[QuantizedTensor]) -> QuantizedTensor:
    """Stack quantized matrices along N (fusing q/k/v or gate/up); same format and K."""
    first = parts[0]
    for p in parts[1:]:
        if (p.bits, p.group_size, p.shape[1]) != (first.bits, first.group_size, first.shape[1]):
            raise ValueError("concat_rows needs the same bits, group size and K")

    def cat(name):
        arrs = [getattr(p, name) for p in parts]
        return None if arrs[0] is None else np.ascontiguousarray(np.concatenate(arrs))

    n = sum(p.shape[0] for p in parts)
    return QuantizedTensor(first.bits, first.group_size, (n, first.shape[1]), cat("q"),
                           cat("scales"), cat("mins"), cat("qh"))


def _expect(name: str, a, dtype, shape) -> None:
    if a is None:
        raise ValueError(f"{name} is missing")
    if a.dtype != dtype or tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}: expected {np.dtype(dtype).name} {tuple(shape)}, "
                         f"got {a.dtype} {tuple(a.shape)}")


# ------------------------------------------------------------ quantizing
def pad_groups(w: np.ndarray, group_size: int) -> np.ndarray:
    """float32 [N, Kp/G, G] with zero padding past K."""
    n, k = w.shape
    kp = padded_k(k, group_size)
    wp = np.zeros((n, kp), dtype=np.float32)
    wp[:, :k] = w
    return wp.reshape(n, kp // group_size, group_size)


def group_mask(k: int, group_size: int) -> np.ndarray:
    """bool [Kp/G, G]: True for real inputs, False for padding."""
    kp = padded_k(k, group_size)
    return (np.arange(kp) < k).reshape(kp // group_size, group_size)


def from_codes(bits: int, group_size: int, shape: tuple[int, int], codes: np.ndarray,
               scales: np.ndarray, mins: np.ndarray | None) -> QuantizedTensor:
    """Pack codes [N, Kp] with per-group scales/mins [N, Kp/G] (any float dtype)."""
    n = shape[0]
    codes = codes.reshape(n, -1)
    s16 = scales.astype(np.float16)
    m16 = None if mins is None else mins.astype(np.float16)
    if bits == 8:
        return QuantizedTensor(8, group_size, shape, codes.astype(np.int8), s16)
    if bits == 4:
        return QuantizedTensor(4, group_size, shape, pack_int4(codes.astype(np.uint8)), s16, m16)
    ql, qh = pack_int3(codes.astype(np.uint8))
    return QuantizedTensor(3, group_size, shape, ql, s16, m16, qh)


def quantize_rtn(w: np.ndarray, bits: int, group_size: int) -> QuantizedTensor:
    """Round to nearest. int8: s = max|w| / 127. int4/int3: s = (max - min) / qmax, m = min.

    Scales and offsets are rounded to f16 first, and the codes are computed
    against the rounded values, so dequantize() is as close as RTN can be.
    """
    check_format(bits, group_size)
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    n, k = w.shape
    g = pad_groups(w, group_size)
    mask = group_mask(k, group_size)[None]
    if bits == 8:
        amax = np.max(np.abs(g), axis=2)
        s = (amax / 127.0).astype(np.float16).astype(np.float32)
        inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
        q = np.clip(np.rint(g * inv[:, :, None]), -127, 127)
        return from_codes(8, group_size, (n, k), np.where(mask, q, 0), s, None)
    qmax = (1 << bits) - 1
    lo = np.min(np.where(mask, g, np.inf), axis=2)
    hi = np.max(np.where(mask, g, -np.inf), axis=2)
    m = lo.astype(np.float16).astype(np.float32)
    s = ((hi - m) / qmax).astype(np.float16).astype(np.float32)
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
    q = np.clip(np.rint((g - m[:, :, None]) * inv[:, :, None]), 0, qmax)
    return from_codes(bits, group_size, (n, k), np.where(mask, q, 0), s, m)
