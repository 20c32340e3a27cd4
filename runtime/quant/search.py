"""Error-minimizing group-wise quantization (llama.cpp k-quant style), numpy only.

For each group of G inputs the quantizer looks for the parameters that
minimize the (optionally importance-weighted) squared error

    E = sum_i w_i (s * q_i + m - x_i)^2          (int8: m = 0)

int4 / int3 (asymmetric), like ggml's ``make_qkx2_quants``:
  1. candidates: codes L = round(c * (x - min) / (max - min)) for a sweep of
     c around qmax (c = qmax + rmin + rdelta * i), i.e. ranges slightly
     shrunk or widened around [min, max];
  2. for each candidate's codes the best (s, m) in closed form (weighted
     least squares in two unknowns); keep the lowest E per group;
  3. refine: round (s, m) to what the format stores (formats.py: the
     row-scale grid), re-choose the nearest codes against the rounded
     values, refit (s, m), a couple of times (alternating minimization);
  4. RTN (``quantize_rtn``'s parameters) is always a candidate, so the result
     is never worse than RTN on E.
int8 (symmetric): a short sweep of clipping scales s = f * max|x| / 127 plus a
least-squares refit; RTN is the f = 1 candidate.

Every E that decides between candidates is measured with stored (rounded)
parameters and the codes those parameters give, exactly as the stored tensor
dequantizes. Everything is vectorized over all groups of a matrix, in row
chunks that stay cache-sized.
"""
from __future__ import annotations

import numpy as np

from .formats import (ENCODINGS, QuantizedTensor, check_encoding, check_format, from_codes,
                      group_mask, pad_groups, padded_k, pick_encoding, round_group_params,
                      row_scales_of)
from .formats import f16_round as _f16

__all__ = ["quantize_search", "fit_groups", "nearest_codes", "group_weights", "group_error",
           "magnitude_importance"]

CHUNK_ELEMS = 1 << 18          # elements per vectorized chunk (~1 MiB of f32)
_ASYM_SWEEP = {4: (-1.0, 0.1, 20), 3: (-0.5, 0.1, 15)}   # rmin, rdelta, nstep (ggml's choices)
_INT8_FACTORS = (1.0, 0.995, 0.99, 0.98, 0.97, 0.96, 0.94, 0.92, 0.9)
_REFINE = 3
_MARGIN = 1e-6                 # a candidate must beat the incumbent by this relative amount


def _wsum(a: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    """sum_g w * a over the last axis (float64). a [n, ng, G], w [ng, G], [n, ng, G] or None."""
    if w is None:
        return a.sum(axis=-1, dtype=np.float64)
    return np.einsum("ijg,jg->ij" if w.ndim == 2 else "ijg,ijg->ij", a, w, dtype=np.float64)


def _wdot(a: np.ndarray, b: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    if w is None:
        return np.einsum("ijg,ijg->ij", a, b, dtype=np.float64)
    return np.einsum("ijg,ijg->ij", a * w, b, dtype=np.float64)


def nearest_codes(x: np.ndarray, s: np.ndarray, m: np.ndarray | None, bits: int) -> np.ndarray:
    """The nearest codes for x [n, ng, G] given stored s, m [n, ng] (float32 result).

    Same arithmetic as ``quantize_rtn`` (multiply by 1/s), so RTN's parameters
    reproduce RTN's codes exactly.
    """
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s != 0)[..., None]
    if bits == 8:
        q = x * inv
        np.rint(q, out=q)
        return np.clip(q, -127, 127, out=q)
    q = (x - m[..., None]) * inv
    np.rint(q, out=q)
    return np.clip(q, 0, (1 << bits) - 1, out=q)


def _exact_error(x, w, s, m, bits):
    """(codes, E) with stored s, m."""
    q = nearest_codes(x, s, m, bits)
    d = q * s[..., None]
    if m is not None:
        d += m[..., None]
    d -= x
    return q, _wdot(d, d, w)


def _ls_asym(L, x, w, sw, swx):
    """Weighted least-squares (s, m) for fixed codes L; ok=False where degenerate."""
    sl = _wsum(L, w)
    sll = _wdot(L, L, w)
    slx = _wdot(L, x, w)
    det = sw * sll - sl * sl
    ok = det > 1e-12 * np.maximum(sw * sll, 1e-30)
    det = np.where(ok, det, 1.0)
    s = (sw * slx - swx * sl) / det
    m = (sll * swx - sl * slx) / det
    return s, m, sl, sll, slx, ok


def _fit_asym(x, w, mask, bits, rs):
    nmax = (1 << bits) - 1
    # what the format stores: the coded grid under row scales rs, or f16 (rs None)
    store = (lambda s, m: (_f16(s), _f16(m))) if rs is None else \
        (lambda s, m: round_group_params(s, m, rs))
    rmin, rdelta, nstep = _ASYM_SWEEP[bits]
    if mask is None:
        lo, hi = x.min(axis=-1), x.max(axis=-1)
    else:
        lo = np.min(np.where(mask, x, np.inf), axis=-1)
        hi = np.max(np.where(mask, x, -np.inf), axis=-1)
    # Incumbent: RTN, with quantize_rtn's exact arithmetic.
    best_s, best_m = store((hi - lo) / nmax, lo)
    _, best_e = _exact_error(x, w, best_s, best_m, bits)

    sw = np.broadcast_to(float(x.shape[-1]) if w is None else w.sum(-1, dtype=np.float64),
                         lo.shape)
    swx = _wsum(x, w)
    swxx = _wdot(x, x, w)
    rng = (hi - lo).astype(np.float64)
    xs = x - lo[..., None]
    if mask is not None:
        xs = np.where(mask, xs, 0.0).astype(np.float32)

    # 1-2. sweep the range, closed-form (s, m) per candidate; E from the sums.
    cand_e = np.full(lo.shape, np.inf)
    cand_s = np.zeros(lo.shape)
    cand_m = np.zeros(lo.shape)
    L = np.empty_like(xs)
    for i in range(nstep + 1):
        iscale = np.divide(nmax + rmin + rdelta * i, rng, out=np.zeros_like(rng), where=rng > 0)
        np.multiply(xs, iscale.astype(np.float32)[..., None], out=L)
        np.rint(L, out=L)
        np.minimum(L, nmax, out=L)
        s, m, sl, sll, slx, ok = _ls_asym(L, x, w, sw, swx)
        e = s * s * sll + 2 * s * m * sl + m * m * sw - 2 * s * slx - 2 * m * swx + swxx
        better = ok & (e < cand_e)
        cand_e = np.where(better, e, cand_e)
        cand_s = np.where(better, s, cand_s)
        cand_m = np.where(better, m, cand_m)
    found = np.isfinite(cand_e)

    # 3. round, re-code, refit; keep whatever measures best exactly.
    s16, m16 = store(cand_s, cand_m)
    for it in range(_REFINE + 1):
        q, e = _exact_error(x, w, s16, m16, bits)
        better = found & (e < best_e * (1 - _MARGIN))
        best_e = np.where(better, e, best_e)
        best_s = np.where(better, s16, best_s)
        best_m = np.where(better, m16, best_m)
        if it == _REFINE:
            break
        s, m, *_, ok = _ls_asym(q, x, w, sw, swx)
        found &= ok
        s16, m16 = store(np.where(ok, s, 0), np.where(ok, m, 0))
    return best_s, best_m


def _fit_sym8(x, w):
    amax = np.max(np.abs(x), axis=-1)
    best_s = _f16(amax / 127.0)
    q, best_e = _exact_error(x, w, best_s, None, 8)
    for f in _INT8_FACTORS[1:]:
        s = _f16(amax * np.float32(f) / 127.0)
        _, e = _exact_error(x, w, s, None, 8)
        better = e < best_e * (1 - _MARGIN)
        best_e = np.where(better, e, best_e)
        best_s = np.where(better, s, best_s)
    # least-squares refit of the scale for the best codes
    q = nearest_codes(x, best_s, None, 8)
    sqq = _wdot(q, q, w)
    s = _f16(np.divide(_wdot(q, x, w), sqq, out=np.zeros_like(sqq), where=sqq > 0))
    _, e = _exact_error(x, w, s, None, 8)
    better = (s > 0) & (e < best_e * (1 - _MARGIN))
    return np.where(better, s, best_s), None


def fit_groups(x: np.ndarray, bits: int, mask: np.ndarray | None = None,
               weights: np.ndarray | None = None,
               row_scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Best storable (scales, mins) for groups x float32 [n, ng, G].

    mask: bool [ng, G] (False = padding, excluded), weights: float32 [ng, G]
    (per input) or [n, ng, G] (per weight) importance, already zero on
    padding, or None. row_scale: float32 [n], int4/int3 with coded
    parameters: the grid they are chosen on (formats.row_scales_of); None:
    f16 parameters. Returns float32 [n, ng] arrays of representable values
    (mins None for int8).
    """
    x = np.asarray(x, dtype=np.float32)
    n, ng, g = x.shape
    if row_scale is not None and np.shape(row_scale) != (n,):
        raise ValueError(f"row_scale has shape {np.shape(row_scale)}, expected [{n}]")
    if weights is None and mask is not None and not mask.all():
        weights = mask.astype(np.float32)
    if mask is not None and mask.all():
        mask = None
    rows = max(1, CHUNK_ELEMS // (ng * g))
    s_out = np.empty((n, ng), np.float32)
    m_out = None if bits == 8 else np.empty((n, ng), np.float32)
    for r0 in range(0, n, rows):
        xc = x[r0:r0 + rows]
        wc = weights[r0:r0 + rows] if weights is not None and weights.ndim == 3 else weights
        if bits == 8:
            s, _ = _fit_sym8(xc, wc)
        else:
            s, m = _fit_asym(xc, wc, mask, bits,
                             None if row_scale is None else row_scale[r0:r0 + rows])
            m_out[r0:r0 + rows] = m
        s_out[r0:r0 + rows] = s
    return s_out, m_out


def group_weights(weights: np.ndarray | None, k: int, group_size: int) -> np.ndarray | None:
    """Importance per input [K] -> float32 [ng, G], or per weight [N, K] -> [N, ng, G];
    scaled to mean 1, 0 on padding. None stays None when K is a multiple of G
    (the unweighted fast path)."""
    mask = group_mask(k, group_size)
    if weights is None:
        return None if mask.all() else mask.astype(np.float32)
    wt = np.asarray(weights, dtype=np.float32)
    if wt.ndim not in (1, 2) or wt.shape[-1] != k:
        raise ValueError(f"weights has shape {wt.shape}; expected [K={k}] or [N, K={k}]")
    if not np.all(np.isfinite(wt)) or np.any(wt < 0):
        raise ValueError("weights must be finite and non-negative")
    mean = float(wt.mean(dtype=np.float64))
    wt = wt / np.float32(mean) if mean > 0 else np.ones_like(wt)
    if wt.ndim == 1:
        out = np.zeros(padded_k(k, group_size), np.float32)
        out[:k] = wt
        return out.reshape(mask.shape)
    return pad_groups(wt, group_size)


def magnitude_importance(w: np.ndarray, group_size: int) -> np.ndarray:
    """Calibration-free per-weight importance [N, K]: rms(group) + |w| (ggml's
    ``make_qkx2_quants`` rule without an imatrix). It keeps large weights, which
    tend to meet large activations, from being clipped by the range search."""
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    g = pad_groups(w, group_size)
    cnt = group_mask(k, group_size).sum(-1)
    rms = np.sqrt(np.einsum("ijg,ijg->ij", g, g) / cnt)
    return (np.abs(g) + rms[..., None]).reshape(n, -1)[:, :k]


def group_error(w: np.ndarray, qt: QuantizedTensor, weights: np.ndarray | None = None) -> float:
    """sum over the matrix of weights * (w - dequant(qt))^2 (float64); weights [K] or [N, K]."""
    d = (np.asarray(w, np.float64) - qt.dequantize().astype(np.float64)) ** 2
    if weights is not None:
        wt = np.asarray(weights, np.float64)
        d = d * (wt[None, :] if wt.ndim == 1 else wt)
    return float(d.sum())


def quantize_search(w: np.ndarray, bits: int, group_size: int,
                    weights: np.ndarray | None = None, encoding: str = "auto") -> QuantizedTensor:
    """Quantize w float32 [N, K] with per-group parameters that minimize the
    squared error, weighted by `weights`: [K] per input channel (e.g. mean x^2
    of each input from calibration), [N, K] per weight (e.g.
    ``magnitude_importance``) or None (plain squared error). encoding (int4/int3):
    "codes", "f16" or "auto" (formats.AUTO_F16_GAIN)."""
    check_format(bits, group_size)
    check_encoding(encoding)
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    n, k = w.shape
    g = pad_groups(w, group_size)
    mask = group_mask(k, group_size)
    wts = group_weights(weights, k, group_size)
    encs = ("codes",) if bits == 8 else ENCODINGS if encoding == "auto" else (encoding,)
    out = {}
    for enc in encs:
        rs = row_scales_of(w, group_size, bits) if bits != 8 and enc == "codes" else None
        s, m = fit_groups(g, bits, mask, wts, rs)
        rows = max(1, CHUNK_ELEMS * 4 // g[0].size)
        codes = np.empty(g.shape, np.int8 if bits == 8 else np.uint8)
        for r0 in range(0, n, rows):
            sl = slice(r0, r0 + rows)
            q = nearest_codes(g[sl], s[sl], None if m is None else m[sl], bits)
            codes[sl] = np.where(mask[None], q, 0)
        out[enc] = from_codes(bits, group_size, (n, k), codes, s, m, rs)
    return pick_encoding(w, out, weights)
