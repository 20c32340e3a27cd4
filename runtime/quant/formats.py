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
    group parameters (below): scale codes, min codes, row scales
    -> 4 + 16/G bits per weight with coded parameters (below), 4 + 32/G with f16

int3, asymmetric:       w = s * q + m,  q in [0, 7], two bit planes
    ql:     uint8 [N, Kp / 4]      low 2 bits; per 32-input block b, 8 bytes:
            byte 8b+i = sum_j (q[32b+8j+i] & 3) << 2j     (i = 0..7, j = 0..3)
              bits 7..6     5..4      3..2     1..0
                  q[24+i]  q[16+i]   q[8+i]    q[i]
            (broadcast the 8 bytes to four 64-bit lanes, shift lane j by 2j,
             mask 3: 32 bytes in natural order)
    qh:     uint8 [N, Kp / 8]      high bit; per 32-input block b, 4 bytes:
            bit e of the little-endian 32-bit word 4b..4b+3 = q[32b+e] >> 2
    group parameters (below)
    -> 3 + 16/G bits per weight coded (G=32: 3.5), 3 + 32/G with f16 (G=32: 4.0)

int4 / int3 group parameters, in one of two encodings chosen per matrix:

  f16 (format version 1's only one): scales, mins: float16 [N, Kp / G]
    -> 4 + 32/G bits per weight for int4 (G=32: 5.0 like ggml Q4_1)

  codes (format version 2), one byte each per group:
    scales: uint8 [N, Kp / G]  log-coded scale c:  s = row_scale[r] * T[c],
            T[c] = 2^((c - 255) / 16) = F[c & 15] * 2^((c >> 4) - 15),
            F[j] = float32(2^((j - 15) / 16)): 16 steps per octave (4.4%),
            16 octaves below the row's scale; T[c] is exact in float32.
    mins:   int8  [N, Kp / G]  min code z:  m = float32(s * z) * 0.125,
            an eighth of a step, from -16 s to 15.875 s.
    row_scale: float32 [N]
    -> 4 + 16/G bits per weight for int4 (G=32: 4.5 like ggml Q4_0)
    The codes halve the parameters' cost (a decode step at G=32 reads 10%
    fewer bytes) for ~10% more squared weight error than f16 parameters on
    float weights. Weights that came from an f16-parameter format (a ggml
    Q4_1 file) sit exactly on f16 grids that the codes cannot reproduce, so
    the quantizers (encoding="auto") fit both and keep the codes unless the
    f16 parameters cut the error by more than AUTO_F16_GAIN. The codes are
    always computed against the stored (decoded) parameters.

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


ENCODINGS = ("codes", "f16")
# encoding="auto" keeps the coded parameters unless f16 ones have less than
# 1 / AUTO_F16_GAIN of their (weighted) squared error: ~1.1x on float weights,
# orders of magnitude on weights that were f16-parameter codes already.
AUTO_F16_GAIN = 1.5


def bits_per_weight(bits: int, group_size: int, encoding: str = "codes") -> float:
    """Storage cost including the group parameters (int8: an f16 scale; int4/int3:
    a scale code and a min code, or an f16 scale and min), without row scales."""
    if bits == 8 or encoding == "codes":
        return bits + 16 / group_size
    return bits + 32 / group_size


def check_encoding(encoding: str, auto: bool = True) -> None:
    allowed = ENCODINGS + (("auto",) if auto else ())
    if encoding not in allowed:
        raise ValueError(f"unknown group-parameter encoding {encoding!r}; choose one of {allowed}")


def check_format(bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise ValueError(f"unsupported bit width {bits}; Lingli has int8, int4 and int3")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"unsupported group size {group_size}; choose one of {GROUP_SIZES}")


# ------------------------------------------------------ group parameters
_F = np.array([2.0 ** ((j - 15) / 16) for j in range(16)], dtype=np.float32)
SCALE_TABLE = (_F[np.arange(256) & 15]
               * np.float32(2.0) ** ((np.arange(256) >> 4) - 15).astype(np.float32))
SCALE_TABLE.flags.writeable = False
MIN_CODE_RANGE = (-128, 127)
MIN_STEP = np.float32(0.125)   # a min code counts eighths of the group's scale


def decode_group_params(scales: np.ndarray, mins: np.ndarray,
                        row_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(s, m) float32 [N, ng] from scale codes, min codes and row scales, in the
    kernels' float32 arithmetic: s = row_scale * T[c], m = (s * z) * 0.125."""
    s = np.asarray(row_scale, np.float32)[:, None] * SCALE_TABLE[scales]
    m = (s * mins.astype(np.float32)) * MIN_STEP
    return s, m


def encode_group_params(s: np.ndarray, m: np.ndarray, row_scale: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(scale codes uint8, min codes int8) [N, ng] for float s, m under row scales [N].

    The scale code is the nearest step of the log grid, raised when the min
    would not fit in 16 steps of that scale (a group far from zero relative
    to its spread, a constant one); the min code is then the nearest eighth.
    Representable (s, m) encode to themselves."""
    rs32 = np.asarray(row_scale, np.float32)[:, None]
    s = np.asarray(s, np.float64)
    m = np.asarray(m, np.float64)
    # the least s whose codes reach m (less a float32 ulp or so: representable
    # pairs must keep their code)
    reach = np.where(m < 0, -m / 16.0, m / 15.875) * (1 - 1e-6)
    s_eff = np.maximum(s, reach)
    rs = rs32.astype(np.float64)
    ratio = np.divide(s_eff, rs, out=np.zeros(np.broadcast_shapes(s_eff.shape, rs.shape)),
                      where=(rs > 0) & (s_eff > 0))
    c = np.rint(16.0 * np.log2(ratio, out=np.full_like(ratio, -np.inf), where=ratio > 0))
    c = np.clip(c + 255, 0, 255)
    c = np.where((rs32 * SCALE_TABLE[c.astype(np.uint8)] < reach) & (c < 255), c + 1, c)
    sc = c.astype(np.uint8)
    sq = (rs32 * SCALE_TABLE[sc]).astype(np.float64)
    z = np.divide(m, sq * 0.125, out=np.zeros_like(sq), where=sq > 0)
    mc = np.clip(np.rint(z), *MIN_CODE_RANGE).astype(np.int8)
    return sc, mc


def round_group_params(s: np.ndarray, m: np.ndarray, row_scale: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The nearest representable (s, m) [N, ng] (float32) under row scales [N]."""
    return decode_group_params(*encode_group_params(s, m, row_scale), row_scale)


def row_scales_for(lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    """A row scale [N] from each group's range lo, hi [N, ng]: above every scale
    the quantizers may pick (a range search can widen RTN's by a few %, and a
    group's min needs s >= |m| / 16), so the top code is never clipped; the
    headroom costs nothing but the 2^-16 floor, far below any real scale."""
    qmax = (1 << bits) - 1
    need = np.maximum((hi - lo) / qmax, np.abs(lo) / 15.0)
    need = np.where(np.isfinite(need), need, 0.0)
    return (1.25 * need.max(axis=-1, initial=0.0)).astype(np.float32)


def row_scales_of(w: np.ndarray, group_size: int, bits: int) -> np.ndarray:
    """row_scales_for over the groups of a weight float32 [N, K]."""
    g = pad_groups(np.asarray(w, np.float32), group_size)
    return row_scales_for(*group_range(g, group_mask(w.shape[1], group_size)), bits)


def group_range(g: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) [N, Kp/G] of padded groups g [N, Kp/G, G] over the real inputs
    (mask [Kp/G, G], False on padding)."""
    return np.min(np.where(mask, g, np.inf), axis=2), np.max(np.where(mask, g, -np.inf), axis=2)


def f16_round(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to float16 (what f16 group parameters store)."""
    return np.asarray(a, dtype=np.float32).astype(np.float16).astype(np.float32)


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
    scales: np.ndarray              # float16 [N, Kp/G]; int4/int3 coded: uint8 scale codes
    mins: np.ndarray | None = None  # int4/int3: float16, or int8 min codes when coded
    qh: np.ndarray | None = None    # uint8 [N, Kp/8] (int3 high plane)
    row_scale: np.ndarray | None = None  # int4/int3 coded: float32 [N]
    # How the CPU kernels quantize activations for this matrix: 1 = int8 blocks,
    # 2 = int8 blocks plus their quantized residual (~14 bits). A runtime choice
    # (CpuBackend.weight sets it), not part of the stored format.
    act_steps: int = field(default=1, compare=False)
    # int8: each 32-code block's sum, int16 [N, Kp/32] (block_code_sums), kept
    # next to the codes by CpuBackend.weight (6% more bytes) so the batched
    # kernel need not re-read the codes for them. Runtime data, never stored.
    code_sums: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_format(self.bits, self.group_size)
        n, k = self.shape
        kp = padded_k(k, self.group_size)
        g = kp // self.group_size
        want = {8: (np.int8, (n, kp)), 4: (np.uint8, (n, kp // 2)),
                3: (np.uint8, (n, kp // 4))}[self.bits]
        _expect("q", self.q, *want)
        if self.bits == 8:
            _expect("scales", self.scales, np.float16, (n, g))
            if self.mins is not None or self.qh is not None or self.row_scale is not None:
                raise ValueError("int8 is symmetric with f16 scales: it has no mins, "
                                 "no high plane and no row scales")
        elif self.coded:
            _expect("scales", self.scales, np.uint8, (n, g))
            _expect("mins", self.mins, np.int8, (n, g))
            _expect("row_scale", self.row_scale, np.float32, (n,))
        else:
            if getattr(self.scales, "dtype", None) == np.uint8:
                raise ValueError("scales are uint8 codes but row_scale is missing")
            _expect("scales", self.scales, np.float16, (n, g))
            _expect("mins", self.mins, np.float16, (n, g))
        if self.code_sums is not None:
            if self.bits != 8:
                raise ValueError(f"code_sums are for int8 only, not int{self.bits}")
            _expect("code_sums", self.code_sums, np.int16, (n, kp // 32))
        if self.bits == 3:
            _expect("qh", self.qh, np.uint8, (n, kp // 8))
        elif self.qh is not None:
            raise ValueError(f"int{self.bits} has no high bit plane")

    @property
    def coded(self) -> bool:
        """int4/int3 with coded group parameters (else f16 ones; int8: False)."""
        return self.row_scale is not None

    @property
    def encoding(self) -> str:
        return "codes" if self.coded else "f16"

    @property
    def padded_k(self) -> int:
        return padded_k(self.shape[1], self.group_size)

    @property
    def n_groups(self) -> int:
        return self.padded_k // self.group_size

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays().values())

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
        w = g * self.group_scales(sel)[:, :, None]
        if self.mins is not None:
            w += self.group_mins(sel)[:, :, None]
        return w.reshape(n, self.padded_k)[:, :self.shape[1]]

    def group_scales(self, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """float32 [n, Kp/G]: every group's scale, as the kernels compute it."""
        sel = slice(None) if rows is None else rows
        if not self.coded:
            return self.scales[sel].astype(np.float32)
        return decode_group_params(self.scales[sel], self.mins[sel], self.row_scale[sel])[0]

    def group_mins(self, rows: np.ndarray | slice | None = None) -> np.ndarray | None:
        """float32 [n, Kp/G]: every group's min (None for int8)."""
        if self.bits == 8:
            return None
        sel = slice(None) if rows is None else rows
        if not self.coded:
            return self.mins[sel].astype(np.float32)
        return decode_group_params(self.scales[sel], self.mins[sel], self.row_scale[sel])[1]

    def take_rows(self, rows: np.ndarray) -> np.ndarray:
        """Dequantized rows (embedding lookup)."""
        return self.dequantize(np.asarray(rows))

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"q": self.q, "scales": self.scales}
        if self.mins is not None:
            out["mins"] = self.mins
        if self.qh is not None:
            out["qh"] = self.qh
        if self.row_scale is not None:
            out["row_scale"] = self.row_scale
        return out


def block_code_sums(q: np.ndarray) -> np.ndarray:
    """int8 codes [N, Kp] -> the sum of each 32-code block, int16 [N, Kp/32]
    (|sum| <= 32 * 128, so int16 holds it exactly)."""
    n, kp = q.shape
    return q.reshape(n, kp // 32, 32).sum(axis=2, dtype=np.int16)


def concat_rows(parts: list[QuantizedTensor]) -> QuantizedTensor:
    """Stack quantized matrices along N (fusing q/k/v or gate/up); same format and K."""
    first = parts[0]
    for p in parts[1:]:
        if ((p.bits, p.group_size, p.shape[1], p.coded)
                != (first.bits, first.group_size, first.shape[1], first.coded)):
            raise ValueError("concat_rows needs the same bits, group size, K and encoding")

    def cat(name):
        arrs = [getattr(p, name) for p in parts]
        return None if arrs[0] is None else np.ascontiguousarray(np.concatenate(arrs))

    n = sum(p.shape[0] for p in parts)
    return QuantizedTensor(first.bits, first.group_size, (n, first.shape[1]), cat("q"),
                           cat("scales"), cat("mins"), cat("qh"), cat("row_scale"))


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
               scales: np.ndarray, mins: np.ndarray | None,
               row_scale: np.ndarray | None = None) -> QuantizedTensor:
    """Pack codes [N, Kp] with per-group scales/mins [N, Kp/G].

    int8, and int4/int3 without row_scale: s and m stored as f16 (callers round
    first and choose codes against the rounded values). int4/int3 with
    row_scale [N]: coded parameters; s and m must be representable
    (round_group_params' output), anything else is a quantizer bug."""
    n = shape[0]
    codes = codes.reshape(n, -1)
    if bits == 8:
        return QuantizedTensor(8, group_size, shape, codes.astype(np.int8),
                               scales.astype(np.float16))
    if row_scale is None:
        sc, mc, rs = scales.astype(np.float16), mins.astype(np.float16), None
    else:
        rs = np.ascontiguousarray(row_scale, dtype=np.float32)
        sc, mc = encode_group_params(scales, mins, rs)
        s2, m2 = decode_group_params(sc, mc, rs)
        if not (np.array_equal(s2, np.asarray(scales, np.float32))
                and np.array_equal(m2, np.asarray(mins, np.float32))):
            raise ValueError(f"int{bits} group parameters are not on the row-scale grid "
                             "(round them with round_group_params first)")
    if bits == 4:
        return QuantizedTensor(4, group_size, shape, pack_int4(codes.astype(np.uint8)), sc, mc,
                               row_scale=rs)
    ql, qh = pack_int3(codes.astype(np.uint8))
    return QuantizedTensor(3, group_size, shape, ql, sc, mc, qh, rs)


def quantize_rtn(w: np.ndarray, bits: int, group_size: int,
                 encoding: str = "auto") -> QuantizedTensor:
    """Round to nearest. int8: s = max|w| / 127. int4/int3: s = (max - min) / qmax, m = min.

    Scales and offsets are rounded to what the format stores first (f16 or
    the coded grid, by `encoding`: "codes", "f16" or "auto", see
    AUTO_F16_GAIN), and the codes are computed against the rounded values, so
    dequantize() is as close as RTN can be.
    """
    check_format(bits, group_size)
    check_encoding(encoding)
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    n, k = w.shape
    g = pad_groups(w, group_size)
    mask = group_mask(k, group_size)[None]
    if bits == 8:
        amax = np.max(np.abs(g), axis=2)
        s = f16_round(amax / 127.0)
        inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
        q = np.clip(np.rint(g * inv[:, :, None]), -127, 127)
        return from_codes(8, group_size, (n, k), np.where(mask, q, 0), s, None)
    qmax = (1 << bits) - 1
    lo, hi = group_range(g, mask)
    out = {}
    for enc in (ENCODINGS if encoding == "auto" else (encoding,)):
        rs = row_scales_for(lo, hi, bits) if enc == "codes" else None
        s, m = (round_group_params((hi - lo) / qmax, lo, rs) if enc == "codes"
                else (f16_round((hi - lo) / qmax), f16_round(lo)))
        inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
        q = np.clip(np.rint((g - m[:, :, None]) * inv[:, :, None]), 0, qmax)
        out[enc] = from_codes(bits, group_size, (n, k), np.where(mask, q, 0), s, m, rs)
    return pick_encoding(w, out)


def pick_encoding(w: np.ndarray, candidates: dict[str, QuantizedTensor],
                  weights: np.ndarray | None = None) -> QuantizedTensor:
    """The coded candidate unless the f16 one has under 1 / AUTO_F16_GAIN of its
    squared error (weighted per input [K] or per weight [N, K])."""
    if len(candidates) == 1:
        return next(iter(candidates.values()))
    err = {}
    for enc, qt in candidates.items():
        d = (np.asarray(w, np.float64) - qt.dequantize()) ** 2
        if weights is not None:
            d = d * np.asarray(weights, np.float64)
        err[enc] = float(d.sum())
    return candidates["f16" if err["f16"] * AUTO_F16_GAIN < err["codes"] else "codes"]
