"""GPTQ (Frantar et al., arXiv 2210.17323) in numpy, plus calibration statistics.

Quantizing a linear layer y = x W^T, GPTQ minimizes the output error
||X W^T - X Q^T||^2 = tr((W - Q) H (W - Q)^T) with H = X^T X. It quantizes
one input column at a time and pushes that column's error onto the columns
not yet quantized, weighted by the inverse Hessian:

    H += damp * mean(diag H) * I;  U = chol(H^-1) (upper)
    for each column j (in blocks of `block` columns, updates applied lazily):
        when j starts a group: choose its (scale, min) from the current,
            error-updated weights of the group (the search quantizer's fit)
        q_j = quant(w_j);  e = (w_j - q_j) / U[j, j]
        w_{j+1:} -= e * U[j, j+1:]

The output is Lingli's portable format, columns in natural order. With
act_order=True columns are visited by decreasing H[j, j], with "static
groups" (parameters fitted on the original weights up front) so the stored
layout does not change.

``collect_hessians`` runs calibration text through the float model and
accumulates H for the input of every linear weight.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .formats import (QuantizedTensor, check_encoding, check_format, from_codes, group_mask,
                      pad_groups, padded_k, row_scales_of)
from .search import fit_groups, group_weights, quantize_search

_SUB = 16   # inner lazy-update width; divides every group size

__all__ = ["gptq_quantize", "collect_hessians", "default_calibration_text", "inverse_hessian_factor"]


def inverse_hessian_factor(H: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """Upper Cholesky factor of (H + damp * mean(diag) * I)^-1 (float64).

    Inputs never seen in calibration (H[j, j] == 0) get H[j, j] = 1 (they are
    quantized plainly). If the factorization fails the damping grows tenfold."""
    H = np.array(H, dtype=np.float64, copy=True)
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be square, got shape {H.shape}")
    if not np.all(np.isfinite(H)):
        raise ValueError("H has non-finite entries")
    d = np.diag(H).copy()
    dead = d <= 0
    H[dead, dead] = 1.0
    mean = float(np.mean(np.diag(H)))
    for attempt in range(6):
        Hd = H.copy()
        Hd[np.diag_indices_from(Hd)] += damp * mean
        try:
            L = np.linalg.cholesky(Hd)
            Linv = np.linalg.inv(L)
            Hinv = Linv.T @ Linv
            return np.linalg.cholesky(Hinv).T
        except np.linalg.LinAlgError:
            damp = damp * 10 if damp > 0 else 1e-4
    raise ValueError("H is not positive definite even with heavy damping")


def gptq_quantize(w: np.ndarray, H: np.ndarray, bits: int, group_size: int, damp: float = 0.01,
                  block: int = 128, act_order: bool = False,
                  weighted_fit: bool = True, encoding: str = "auto") -> QuantizedTensor:
    """Quantize w float32 [N, K] against the input Hessian H [K, K] (x^T x summed or averaged).

    weighted_fit: fit each group's parameters with diag(H) (mean x^2 of each
    input) as per-input importance; False fits plain squared error (on
    synthetic correlated inputs the weighted fit gives 10-25% lower output
    error at int4/int3). damp: 0.01 is the paper's value; quantize_weights
    uses 0.1, which gave lower held-out perplexity on SmolLM2 with 2k
    calibration tokens. encoding (int4/int3): "codes", "f16", or "auto": the
    one the search quantizer picks for these weights (formats.AUTO_F16_GAIN),
    so GPTQ itself runs once."""
    check_format(bits, group_size)
    check_encoding(encoding)
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    n, k = w.shape
    if np.shape(H) != (k, k):
        raise ValueError(f"H has shape {np.shape(H)}, expected ({k}, {k}) for weight {w.shape}")
    G = group_size
    block = max(G, block // G * G)                  # groups never straddle blocks
    hdiag = np.maximum(np.diag(np.asarray(H, np.float64)), 0.0)
    kp = padded_k(k, G)
    ng = kp // G
    mask = group_mask(k, G)
    codes = np.zeros((kp, n), dtype=np.float32)     # transposed while filling
    scales = np.zeros((n, ng), np.float32)
    mins = None if bits == 8 else np.zeros((n, ng), np.float32)
    if bits != 8 and encoding == "auto":
        encoding = quantize_search(w, bits, G, hdiag if weighted_fit else None, "auto").encoding
    # The coded parameters' grid comes from the original weights; its headroom
    # covers the error updates' drift (formats.row_scales_for).
    rs = row_scales_of(w, G, bits) if bits != 8 and encoding == "codes" else None

    perm = np.argsort(-hdiag, kind="stable") if act_order else np.arange(k)
    if act_order:                                   # static groups from the original weights
        wts = group_weights(hdiag, k, G) if weighted_fit else None
        scales, m = fit_groups(pad_groups(w, G), bits, mask, wts, rs)
        if mins is not None:
            mins = m

    WT = np.ascontiguousarray(w.T[perm], dtype=np.float64)    # [K, N]: row j = column perm[j]
    U = inverse_hessian_factor(np.asarray(H)[np.ix_(perm, perm)] if act_order else H, damp)

    qlo, qhi = (-127, 127) if bits == 8 else (0, (1 << bits) - 1)
    zero = np.zeros(n)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = WT[i1:i2].copy()
        E1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        # Two-level lazy updates: a column's error goes at once only to the rest of
        # its SUB-column slice, then to the rest of the block by one matmul. SUB
        # divides G, so a group's columns are up to date when the group starts.
        for a in range(0, i2 - i1, _SUB):
            b = min(a + _SUB, i2 - i1)
            for i in range(a, b):
                col = perm[i1 + i]
                gi = col // G
                if not act_order and col % G == 0:
                    _fit_group(W1[i:i + min(G, k - col)], gi, G, bits, mask, scales, mins,
                               hdiag[col:col + G] if weighted_fit else None, rs)
                s = scales[:, gi].astype(np.float64)
                m = zero if mins is None else mins[:, gi].astype(np.float64)
                inv = np.divide(1.0, s, out=np.zeros_like(s), where=s != 0)
                x = W1[i]
                q = np.rint((x - m) * inv)
                np.clip(q, qlo, qhi, out=q)
                codes[col] = q
                err = (x - (q * s + m)) / U1[i, i]
                E1[i] = err
                if i + 1 < b:
                    W1[i + 1:b] -= U1[i, i + 1:b, None] * err[None, :]
            if b < i2 - i1:
                W1[b:] -= U1[a:b, b:].T @ E1[a:b]
        WT[i2:] -= U[i1:i2, i2:].T @ E1

    return from_codes(bits, G, (n, k), np.ascontiguousarray(codes.T), scales, mins, rs)


def _fit_group(cols, gi, G, bits, mask, scales, mins, hd, rs):
    """Fit group gi's (scale, min) on its current columns cols [real, N] (float64)."""
    real, n = cols.shape
    x = np.zeros((n, 1, G), np.float32)
    x[:, 0, :real] = cols.T
    wts = None
    if hd is not None:
        wts = np.zeros((1, G), np.float32)
        mean = hd.mean()
        wts[0, :real] = hd / mean if mean > 0 else 1.0
    s, m = fit_groups(x, bits, mask[gi:gi + 1], wts, rs)
    scales[:, gi] = s[:, 0]
    if mins is not None:
        mins[:, gi] = m[:, 0]


# ------------------------------------------------------------- calibration
def default_calibration_text() -> str:
    """The Python stdlib's pydoc topic help (always installed, never evaluation text)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _calibration_ids(llm, texts, n_tokens: int) -> list[int]:
    if texts is None:
        from pydoc_data.topics import topics
        texts = [topics[key] for key in sorted(topics)]
    if isinstance(texts, np.ndarray) or (isinstance(texts, Sequence) and texts
                                         and not isinstance(texts, str)
                                         and all(isinstance(t, (int, np.integer)) for t in texts)):
        return [int(t) for t in np.asarray(texts).reshape(-1)[:n_tokens]]
    if isinstance(texts, str):
        texts = [texts]
    if llm.tokenizer is None:
        raise ValueError(f"{llm.path} has no tokenizer; pass calibration data as token ids")
    ids: list[int] = []
    for t in texts:
        ids.extend(llm.tokenizer.encode(t + "\n\n"))
        if len(ids) >= n_tokens:
            break
    return ids[:n_tokens]


class _RecordingBackend:
    """Delegates everything to the real backend; `linear` first adds x^T x for known weights."""

    def __init__(self, inner, keys: dict[int, str]):
        self._inner = inner
        self._keys = keys
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def linear(self, x, w, bias=None, prefetch=None):
        key = self._keys.get(id(w))
        if key is not None:
            # One window's product in float32 BLAS (one term per token of the
            # window), accumulated across windows in float64.
            x32 = np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
            h = (x32.T @ x32).astype(np.float64)
            if key in self.sums:
                self.sums[key] += h
            else:
                self.sums[key] = h
            self.counts[key] = self.counts.get(key, 0) + x32.shape[0]
        return self._inner.linear(x, w, bias, prefetch)


def collect_hessians(model, texts=None, n_tokens: int = 2048, window: int = 512,
                     progress: bool = False) -> dict[str, np.ndarray]:
    """H = mean over calibration tokens of x^T x (float64 [K, K]) for every linear weight.

    model: a float checkpoint directory or a ``runtime.LLM``. texts: None (the
    stdlib pydoc topics), a string, a list of strings, or token ids. The
    tokens are cut into windows of `window` tokens, each run through
    ``LLM.logits`` separately. Returns HF weight names -> H; q/k/v share one
    array (the attention-norm output), gate/up another; "lm_head.weight" is
    included even when the head is tied to the embedding.
    """
    from runtime.llm import LLM

    llm = model if isinstance(model, LLM) else LLM(Path(model), max_model_len=window)
    if window > llm.max_model_len:
        raise ValueError(f"window {window} exceeds the model's max_model_len {llm.max_model_len}")
    ids = _calibration_ids(llm, texts, n_tokens)
    if not ids:
        raise ValueError("no calibration tokens")
    if len(ids) < n_tokens:
        warnings.warn(f"calibration data has only {len(ids)} tokens (asked for {n_tokens})",
                      stacklevel=2)
    m = llm.model
    keys: dict[int, str] = {id(m.lm_head): "lm_head"}
    for i, lw in enumerate(m.layers):
        keys[id(lw.wqkv)] = f"{i}.qkv"
        keys[id(lw.wo)] = f"{i}.o"
        keys[id(lw.w_gate_up)] = f"{i}.gate_up"
        keys[id(lw.w_down)] = f"{i}.down"
    rec = _RecordingBackend(m.backend, keys)
    windows = [ids[s:s + window] for s in range(0, len(ids), window)]
    it = windows
    if progress:
        it = _progress(windows, "calibrating")
    # The products' inputs show only in the op-by-op layer loop (not a backend's fused one).
    m.backend, run_layers, m.run_layers = rec, m.run_layers, m.layer_loop
    try:
        for win in it:
            llm.logits(win)
    finally:
        m.backend, m.run_layers = rec._inner, run_layers

    out: dict[str, np.ndarray] = {}
    for key, h in rec.sums.items():
        h = h / rec.counts[key]
        if key == "lm_head":
            out["lm_head.weight"] = h
            continue
        i, kind = key.split(".")
        p = f"model.layers.{i}."
        names = {"qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                 "o": ["self_attn.o_proj"], "gate_up": ["mlp.gate_proj", "mlp.up_proj"],
                 "down": ["mlp.down_proj"]}[kind]
        for nm in names:
            out[p + nm + ".weight"] = h
    return out


def _progress(items, desc):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return items
    return tqdm(items, desc=desc, unit="win")
