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

from .formats import BITS, GROUP_SIZES, QuantizedTensor, check_encoding, quantize_rtn
from .gptq import gptq_quantize
from .search import quantize_search

__all__ = ["quantize_weights", "quantize_model", "quantizable_names", "DEFAULT_GROUP_SIZE",
           "DEFAULT_ENCODING", "DEFAULT_METHOD", "GPTQ_DAMP", "METHODS", "RECIPE",
           "quantize_float", "default_mix", "use_more_bits"]

METHODS = ("rtn", "search", "gptq")
# int4 g32 (4.5 bits/weight with coded group parameters, 5.0 with f16 ones, see
# DEFAULT_ENCODING) keeps SmolLM2-135M within 0.4% of float perplexity where g64
# loses 39%; int3 needs the small groups even more.
DEFAULT_GROUP_SIZE = 32
# Chosen by held-out perplexity of SmolLM2-135M-Instruct (GPL-3 text, 4096 tokens,
# ctx 512; fp32 24.78), G=64, calibration 2048 tokens of pydoc topics:
#                       int4     int3
#   rtn                 37.9    487.4     (per-group min/max)
#   search              36.9    455.1     (no calibration)
#   search + diag(H)    27.8     42.2     (calibrated importance)
#   gptq damp 0.01      --       47.7     (48.7 with act_order)
#   gptq damp 0.1       27.2     40.7     (damp 0.3: 41.6)
# GPTQ with damp 0.1 is best at int4 and int3 (calibration overfits less
# with the stronger dampening; act_order with static groups was worse), and
# int3 without calibration is unusable. int8 is within noise of float with any
# method, so it takes the calibration-free search (about a second per model).
GPTQ_DAMP = 0.1
# Bumped whenever the defaults below change what a quantized checkpoint holds;
# stored in quantization_config so cached copies made by an older recipe are redone.
RECIPE = 8
DEFAULT_METHOD = {8: "search", 4: "search", 3: "gptq"}
# The int4/int3 group-parameter encoding per bit width (formats.py): int4 fits both
# and keeps f16 only where it is 1.5x more accurate (SmolLM2-135M, whose weights
# came from ggml Q4_1, keeps f16 everywhere: +0.32% on GPL-3 / 4096 tokens, where
# coded parameters give +3.7%; float weights take the codes, 10% fewer bytes).
# int3 stays f16: its mix with coded int3 matrices measured +4.9% / +7.2% (4096 /
# all tokens) against f16's +3.1% / +5.4%.
DEFAULT_ENCODING = {4: "auto", 3: "f16"}
# The embedding / lm_head format per bit width (see quantize_weights).
DEFAULT_EMBED_BITS = {8: 8, 4: 8, 3: 8}
# int3 is a mix, as llama.cpp's Q3_K_M is: the matrices whose 3-bit error costs the
# most perplexity per weight stay at int4 g32. Measured on SmolLM2-135M (GPL-3
# text, float 20.17; everything else int4): int3 on q_proj alone +0.6%, v_proj
# -0.1%, o_proj +1.4%, gate_proj +3.7%, k_proj +2.4% (a tenth of q's size),
# down_proj +6.5%, up_proj +7.6%. So k, up and down stay int4, and gate too in
# llama.cpp's "use_more_bits" layers (first and last eighth, every third between);
# o_proj too (Q3_K_M keeps attn_output at Q4_K), which the whole text needs:
#                                    first 4096 tokens   all 7638     bits/weight
#   int3 everywhere but down_proj   23.84  +18.2%                        5.15
#   + k, up at int4                 21.52   +6.7%                        5.37
#   + gate at int4 in 14/30 layers  21.03   +4.2%     18.93  +7.3%       5.47
#     + o at int4 in those layers   21.04   +4.3%     18.88  +7.0%
#     + o at int4 everywhere        20.80   +3.1%     18.60  +5.4%       5.54 <- default
#   llama.cpp Q3_K_M                        +16.2%           +16.6%      5.46
# Calibration variants of the recipe before o_proj (4096 tokens; sequential GPTQ on
# already-quantized inputs) land at +5.3% and +6.4%: the GPTQ path's noise.


def use_more_bits(layer: int, num_layers: int) -> bool:
    """llama.cpp's rule for the layers that get more bits in its mixed formats."""
    n = num_layers
    return layer < n // 8 or layer >= 7 * n // 8 or (layer - n // 8) % 3 == 2


def default_mix(bits: int, num_layers: int) -> dict[str, tuple[int, int]]:
    """Name suffix -> (bits, group size) for the matrices that leave the default format."""
    if bits != 3:
        return {}
    mix = {s: (4, 32) for s in ("self_attn.k_proj.weight", "self_attn.o_proj.weight",
                                "mlp.up_proj.weight", "mlp.down_proj.weight")}
    mix.update({f"model.layers.{i}.mlp.gate_proj.weight": (4, 32)
                for i in range(num_layers) if use_more_bits(i, num_layers)})
    return mix


def _mix_format(name: str, mix: dict[str, tuple[int, int]], bits: int,
                group_size: int) -> tuple[int, int]:
    for suffix, fmt in mix.items():
        if name.endswith(suffix):
            return fmt
    return bits, group_size

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
                                   pick(qt.scales), pick(qt.mins), pick(qt.qh),
                                   pick(qt.row_scale)))
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


def _importance(H, is_embed: bool) -> np.ndarray | None:
    """Per-input importance for the search quantizer: mean x^2 of each input
    channel (diag H). A tied embedding is both a lookup table (plain error
    matters) and lm_head (diag H matters): it gets the blend diag/mean + 1."""
    if H is None:
        return None
    d = np.maximum(np.diag(H), 0.0)
    mean = d.mean()
    if mean <= 0:
        return None
    return d / mean + 1.0 if is_embed else d


def quantize_weights(weights: dict[str, np.ndarray], config: ModelConfig, bits: int,
                     group_size: int = DEFAULT_GROUP_SIZE, method: str = "search",
                     hessians: dict | None = None, progress: bool = True,
                     act_order: bool = False, damp: float | None = None,
                     embed_bits: int | None = None, embed_group_size: int = 32,
                     mix: dict[str, tuple[int, int]] | None = None,
                     encoding: str | None = None) -> dict[str, np.ndarray | QuantizedTensor]:
    """HF name -> float32 array (norms, biases) or QuantizedTensor (every matrix).

    hessians: HF name -> H [K, K] from ``collect_hessians``; required for
    "gptq", optional for "search" (then each input channel's error is
    weighted by its mean x^2). act_order: GPTQ visits columns by decreasing
    mean x^2 (static groups; the stored layout is unchanged). damp: GPTQ's
    dampening, default GPTQ_DAMP. embed_bits: format of the embedding and
    lm_head (None: DEFAULT_EMBED_BITS[bits]); like llama.cpp, which keeps the
    output tensor at 6+ bits, Lingli keeps them at int8 by default: on small
    models with tied embeddings a 4-bit output layer costs tens of percent
    of perplexity (SmolLM2-135M int4 g64: +39% either way, g32: +0.4% with an
    int8 embedding). encoding: the int4/int3 group parameters, "codes", "f16"
    or "auto" (per matrix, formats.AUTO_F16_GAIN); None: DEFAULT_ENCODING by
    each matrix's bit width.
    """
    if encoding is not None:
        check_encoding(encoding)

    def enc(b: int) -> str:
        return encoding or DEFAULT_ENCODING.get(b, "auto")

    embed_bits = DEFAULT_EMBED_BITS.get(bits, 8) if embed_bits is None else embed_bits
    mix = default_mix(bits, config.num_layers) if mix is None else mix
    if embed_bits not in BITS:
        raise ValueError(f"unsupported embedding bit width {embed_bits}")
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
            is_embed = names[0] == "model.embed_tokens.weight"
            H = None
            if hessians is not None:
                # A tied embedding is also the output layer: weight by lm_head's input.
                H = hessians.get("lm_head.weight" if is_embed else names[0])
                if is_embed and not config.tie_word_embeddings:
                    H = None
            is_out = names[0] in ("model.embed_tokens.weight", "lm_head.weight")
            # The job's format: the output layers' own, a mix override (default_mix), or
            # the default; a GPTQ job's matrices may differ (resolved per name below).
            jb, jg = (embed_bits, embed_group_size) if is_out else \
                _mix_format(names[0], mix, bits, group_size)
            if is_out and (jb, jg) != (bits, group_size):
                qts = [quantize_search(mats[0], jb, jg, _importance(H, is_embed), enc(jb))]
            elif method == "rtn":
                qts = [quantize_rtn(mats[0], jb, jg, enc(jb))]
            elif method == "search" or is_embed:
                qts = [quantize_search(m, jb, jg, _importance(H, is_embed), enc(jb))
                       for m in mats]
            else:
                if H is None:
                    raise ValueError(f"method 'gptq': no Hessian for {names[0]!r}")
                # GPTQ treats rows independently, so matrices sharing an input run
                # as one call per format (int3 q/v next to int4 k take two).
                fmts = [_mix_format(n, mix, bits, group_size) for n in names]
                qts = []
                for fmt in dict.fromkeys(fmts):
                    part = [m for m, f in zip(mats, fmts) if f == fmt]
                    w = part[0] if len(part) == 1 else np.concatenate(part)
                    qt = gptq_quantize(w, H, *fmt, act_order=act_order,
                                       damp=GPTQ_DAMP if damp is None else damp,
                                       encoding=enc(fmt[0]))
                    qts += _split_rows(qt, [m.shape[0] for m in part]) if len(part) > 1 else [qt]
                order = [i for fmt in dict.fromkeys(fmts) for i, f in enumerate(fmts) if f == fmt]
                qts = [qt for _, qt in sorted(zip(order, qts), key=lambda t: t[0])]
            for n, qt in zip(names, qts):
                out[n] = qt
            bar.step(sum(m.size for m in mats), names[0].rsplit(".", 2)[0])
    finally:
        bar.close()
    for n in expected:
        if n not in out:
            out[n] = np.ascontiguousarray(weights[n], dtype=np.float32)
    return {n: out[n] for n in expected}


def quantize_float(src: str | Path, config: ModelConfig, bits: int,
                   group_size: int = DEFAULT_GROUP_SIZE, method: str | None = None,
                   calibration_texts=None, n_tokens: int = 2048, window: int = 512,
                   progress: bool = True, calibrate: bool | None = None,
                   encoding: str | None = None) -> tuple[dict, dict]:
    """A float checkpoint's quantized weights, the one recipe behind `lingli quantize`,
    ``LLM(quant=...)`` and ``quantize_model``. Returns (weights, info for quantization_config).

    method None picks ``DEFAULT_METHOD[bits]``. calibrate: run calibration
    text through the float model (needed by "gptq"; lets "search" weight its
    error by each input's mean x^2). None: only for gptq.
    """
    from runtime.loader import load_weights

    from .gptq import collect_hessians

    method = method or DEFAULT_METHOD.get(bits, "search")
    _check_args(bits, group_size, method)
    t0 = time.time()
    hessians = None
    if method == "gptq" or calibrate:
        hessians = collect_hessians(src, calibration_texts, n_tokens=n_tokens, window=window,
                                    progress=progress)
    weights = load_weights(src, config, "fp32")
    q = quantize_weights(weights, config, bits, group_size, method, hessians, progress,
                         encoding=encoding)
    encs = sorted({t.encoding for t in q.values() if isinstance(t, QuantizedTensor) and t.bits != 8})
    info = {"bits": bits, "group_size": group_size, "method": method, "recipe": RECIPE,
            "group_params": encs,
            "calibration": None if hessians is None else
            {"tokens": n_tokens, "window": window,
             "text": "pydoc_data.topics" if calibration_texts is None else "user"},
            "seconds": round(time.time() - t0, 1)}
    return q, info


def quantize_model(src: str | Path, out_dir: str | Path, bits: int,
                   group_size: int = DEFAULT_GROUP_SIZE, method: str | None = None,
                   calibration_texts=None, n_tokens: int = 2048, window: int = 512,
                   progress: bool = True, overwrite: bool = False,
                   calibrate: bool | None = None, encoding: str | None = None) -> Path:
    """Float checkpoint directory -> Lingli quantized checkpoint directory (``quantize_float``)."""
    from .checkpoint import save_quantized

    src = Path(src)
    config = ModelConfig.from_dir(src)
    if config.quantization_config is not None:
        raise ValueError(f"{src} is already quantized ({config.quantization_config.get('quant_method')}); "
                         "quantize from the float checkpoint")
    if calibrate is None:
        calibrate = (method or DEFAULT_METHOD.get(bits, "search")) == "search" and bits < 8
    q, info = quantize_float(src, config, bits, group_size, method, calibration_texts, n_tokens,
                             window, progress, calibrate, encoding)
    return save_quantized(out_dir, src, q, config, info, overwrite=overwrite)
