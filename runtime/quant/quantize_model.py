"""Quantize every matrix of a LLaMA checkpoint: the layer linears, the embedding, lm_head.

    qweights = quantize_weights(weights, config, bits=4, method="search")
    quantize_model("smollm2-dir", "smollm2-int4", bits=4)      # + calibration + save

Methods
  rtn     round to nearest with min/max group parameters (``quantize_rtn``).
  search  per-group parameter search minimizing squared weight error
          (``quantize_search``); weighted by mean x^2 of each input channel
          when calibration Hessians are given. No calibration needed.
  gptq    GPTQ with error feedback against calibration Hessians
          (``gptq_quantize``); the embedding (a lookup table) uses search.

Norm weights and biases stay float32. When the embedding and lm_head are
tied, the embedding's QuantizedTensor serves both.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from runtime.config import ModelConfig

from .formats import BITS, GROUP_SIZES, QuantizedTensor, quantize_rtn
from .gptq import gptq_quantize
from .search import quantize_search

__all__ = ["quantize_weights", "quantize_model", "quantizable_names", "DEFAULT_GROUP_SIZE",
           "DEFAULT_METHOD", "METHODS"]

METHODS = ("rtn", "search", "gptq")
DEFAULT_GROUP_SIZE = 64
# Measured on SmolLM2-135M (relative output error ||X W^T - X Q^T|| / ||X W^T|| on
# calibration activations, averaged over all layer matrices, G=64; see
# tests/test_quantizers.py and the report in the quantization notes):
#   int8: rtn ~0.4%, search slightly lower; both far below what matters, and
#         search costs ~1 s for the whole model -> "search".
#   int4/int3: gptq has the lowest output error by a wide margin (int3: the
#         difference between a usable and a broken model); it costs a
#         calibration pass (~2k tokens through the float model) plus tens of
#         seconds of numpy -> "gptq".
DEFAULT_METHOD = {8: "search", 4: "gptq", 3: "gptq"}

_GROUPS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "o": ("self_attn.o_proj",), "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
           "down": ("mlp.down_proj",)}


def quantizable_names(config: ModelConfig) -> list[str]:
    """The 2-D tensors that get quantized, in checkpoint order."""
    return [n for n, shape in config.weight_shapes().items() if len(shape) == 2]


def _check_args(bits: int, group_size: int, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {METHODS}")
    if bits not in BITS:
        raise ValueError(f"unsupported bit width {bits}; Lingli has int8, int4 and int3")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"unsupported group size {group_size}; choose one of {GROUP_SIZES}")


def _split_rows(qt: QuantizedTensor, sizes: list[int]) -> list[QuantizedTensor]:
    out, r0 = [], 0
    for n in sizes:
        sl = slice(r0, r0 + n)
        pick = lambda a: None if a is None else np.ascontiguousarray(a[sl])  # noqa: E731
        out.append(QuantizedTensor(qt.bits, qt.group_size, (n, qt.shape[1]), pick(qt.q),
                                   pick(qt.scales), pick(qt.mins), pick(qt.qh)))
        r0 += n
    return out


class _Progress:
    """tqdm on stderr when available, otherwise one line per step."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar = None
        self.enabled = enabled
        self.total, self.done, self.desc = total, 0, desc
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, unit="w", file=sys.stderr)
            except ImportError:  # pragma: no cover
                pass

    def step(self, n: int, what: str) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(n)
        elif self.enabled:  # pragma: no cover
            print(f"{self.desc}: {self.done}/{self.total} {what}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def quantize_weights(weights: dict[str, np.ndarray], config: ModelConfig, bits: int,
                     group_size: int = DEFAULT_GROUP_SIZE, method: str = "search",
                     hessians: dict | None = None, progress: bool = True,
                     act_order: bool = True) -> dict[str, np.ndarray | QuantizedTensor]:
    """HF name -> float32 array (norms, biases) or QuantizedTensor (every matrix).

    hessians: HF name -> H [K, K] from ``collect_hessians``; required for
    "gptq", optional for "search" (then each input channel's error is
    weighted by its mean x^2). act_order: GPTQ visits columns by decreasing
    mean x^2 (static groups; the stored layout is unchanged).
    """
    _check_args(bits, group_size, method)
    if method == "gptq" and not hessians:
        raise ValueError("method 'gptq' needs calibration Hessians (hessians=collect_hessians(...))")
    expected = config.weight_shapes()
    missing = [n for n in expected if n not in weights]
    if missing:
        raise ValueError(f"weights lack {len(missing)} tensor(s) the config needs, e.g. {missing[0]!r}")

    out: dict[str, np.ndarray | QuantizedTensor] = {}
    # Jobs: (names sharing one input, HF names); fused names share a Hessian under GPTQ.
    jobs: list[tuple[str, ...]] = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        for parts in _GROUPS.values():
            names = tuple(p + x + ".weight" for x in parts)
            if method == "gptq":
                jobs.append(names)
            else:
                jobs.extend((n,) for n in names)
    jobs.append(("model.embed_tokens.weight",))
    if not config.tie_word_embeddings:
        jobs.append(("lm_head.weight",))

    total = sum(int(np.prod(expected[n])) for job in jobs for n in job)
    bar = _Progress(total, progress, f"int{bits} g{group_size} {method}")
    try:
        for names in jobs:
            mats = [np.asarray(weights[n], dtype=np.float32) for n in names]
            H = None if hessians is None else hessians.get(names[0])
            is_embed = names[0] == "model.embed_tokens.weight"
            if method == "rtn":
                qts = [quantize_rtn(mats[0], bits, group_size)]
            elif method == "search" or is_embed or H is None:
                if method == "gptq" and not is_embed:
                    raise ValueError(f"method 'gptq': no Hessian for {names[0]!r}")
                imp = None if (H is None or is_embed) else np.diag(H)
                qts = [quantize_search(m, bits, group_size, imp) for m in mats]
            else:
                w = mats[0] if len(mats) == 1 else np.concatenate(mats)
                qt = gptq_quantize(w, H, bits, group_size, act_order=act_order)
                qts = _split_rows(qt, [m.shape[0] for m in mats]) if len(mats) > 1 else [qt]
            for n, qt in zip(names, qts):
                out[n] = qt
            bar.step(sum(m.size for m in mats), names[0].rsplit(".", 2)[0])
    finally:
        bar.close()
    for n in expected:
        if n not in out:
            out[n] = np.ascontiguousarray(weights[n], dtype=np.float32)
    return {n: out[n] for n in expected}


def quantize_model(src: str | Path, out_dir: str | Path, bits: int,
                   group_size: int = DEFAULT_GROUP_SIZE, method: str | None = None,
                   calibration_texts=None, n_tokens: int = 2048, window: int = 512,
                   progress: bool = True, overwrite: bool = False) -> Path:
    """Float checkpoint directory -> Lingli quantized checkpoint directory.

    method None picks ``DEFAULT_METHOD[bits]``; "gptq" (and "search", to
    weight its error) runs calibration text through the float model first.
    """
    from runtime.loader import load_weights

    from .checkpoint import save_quantized
    from .gptq import collect_hessians

    method = method or DEFAULT_METHOD.get(bits, "search")
    _check_args(bits, group_size, method)
    src = Path(src)
    config = ModelConfig.from_dir(src)
    if config.quantization_config is not None:
        raise ValueError(f"{src} is already quantized ({config.quantization_config.get('quant_method')}); "
                         "quantize from the float checkpoint")
    t0 = time.time()
    hessians = None
    if method in ("gptq", "search"):
        hessians = collect_hessians(src, calibration_texts, n_tokens=n_tokens, window=window,
                                    progress=progress)
    weights = load_weights(src, config, "fp32")
    q = quantize_weights(weights, config, bits, group_size, method, hessians, progress)
    info = {"bits": bits, "group_size": group_size, "method": method,
            "calibration": None if hessians is None else
            {"tokens": n_tokens, "window": window,
             "text": "pydoc_data.topics" if calibration_texts is None else "user"},
            "seconds": round(time.time() - t0, 1)}
    return save_quantized(out_dir, src, q, config, info, overwrite=overwrite)
