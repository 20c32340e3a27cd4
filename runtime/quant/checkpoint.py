"""The Lingli quantized checkpoint (format version 2): save, load, validate.

A directory like a Hugging Face one:
  config.json        the source config plus
                     "quantization_config": {"quant_method": "lingli",
                        "format_version": 2, "bits": 4, "group_size": 64,
                        "method": "gptq", "quantized_embeddings": true,
                        "modules": [quantized tensor names], ...}
  model.safetensors  for each quantized weight NAME (formats.py layouts):
                        NAME.q       int8 [N, Kp] | uint8 [N, Kp/2] | uint8 [N, Kp/4]
                        NAME.scales  f16 [N, Kp/G]
                        NAME.mins    f16 [N, Kp/G]      (int4, int3)
                        or, with coded group parameters (int4, int3):
                        NAME.scales  uint8 [N, Kp/G]    scale codes
                        NAME.mins    int8 [N, Kp/G]     min codes
                        NAME.row_scale  f32 [N]
                        NAME.qh      uint8 [N, Kp/8]    (int3)
                     other tensors (norms, biases) float32 under their own names;
                     __metadata__ {"format": "lingli", "lingli.shapes":
                        JSON {NAME: [N, K]}} (K cannot be read off padded arrays)
  tokenizer files    copied from the source
Version 1 knew only f16 group parameters; version 2 adds the coded ones
(formats.py), chosen per tensor: a tensor with NAME.row_scale is coded.

Loading is zero-copy: every array is a read-only view of the memory map.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from runtime.config import ModelConfig
from runtime.errors import CheckpointError
from runtime.safetensors_io import open_safetensors, save_safetensors

from .formats import BITS, GROUP_SIZES, QuantizedTensor, padded_k

__all__ = ["save_quantized", "load_quantized", "is_quantized_checkpoint", "QUANT_METHOD",
           "FORMAT_VERSION", "TOKENIZER_FILES"]

QUANT_METHOD = "lingli"
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
WEIGHTS_FILE = "model.safetensors"
SHAPES_KEY = "lingli.shapes"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json", "chat_template.jinja",
                   "added_tokens.json")
_PARTS = {8: ("q", "scales"), 4: ("q", "scales", "mins"), 3: ("q", "scales", "mins", "qh")}


def is_quantized_checkpoint(config: ModelConfig) -> bool:
    """True when config.json carries a Lingli quantization_config."""
    qc = config.quantization_config
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def part_shapes(bits: int, group_size: int, n: int, k: int,
                coded: bool = False) -> dict[str, tuple[str, tuple]]:
    """Stored part -> (safetensors dtype, shape) for a [n, k] weight (coded:
    int4/int3 with coded group parameters)."""
    kp = padded_k(k, group_size)
    g = kp // group_size
    shapes = {8: {"q": ("I8", (n, kp))}, 4: {"q": ("U8", (n, kp // 2))},
              3: {"q": ("U8", (n, kp // 4)), "qh": ("U8", (n, kp // 8))}}[bits]
    if bits == 8:
        out = {"q": shapes["q"], "scales": ("F16", (n, g))}
    elif coded:
        out = {"q": shapes["q"], "scales": ("U8", (n, g)), "mins": ("I8", (n, g)),
               "row_scale": ("F32", (n,))}
    else:
        out = {"q": shapes["q"], "scales": ("F16", (n, g)), "mins": ("F16", (n, g))}
    if bits == 3:
        out["qh"] = shapes["qh"]
    return out


# ------------------------------------------------------------------ save
def save_quantized(out_dir: str | Path, src_dir: str | Path | None,
                   qweights: dict, config: ModelConfig, quant_info: dict,
                   overwrite: bool = False) -> Path:
    """Write a Lingli quantized checkpoint to out_dir (atomically: temp dir + rename).

    quant_info: at least {"bits", "group_size", "method"}; other JSON-able
    entries are kept in quantization_config. src_dir provides config.json and
    tokenizer files (None: config.to_hf_dict(), no tokenizer).
    """
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise CheckpointError(f"{out}: exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise CheckpointError(f"{out}: directory is not empty; pass overwrite=True to replace it")
    bits, gs = quant_info.get("bits"), quant_info.get("group_size")
    if bits not in BITS:
        raise ValueError(f"unsupported bit width {bits}; Lingli has int8, int4 and int3")
    if gs not in GROUP_SIZES:
        raise ValueError(f"unsupported group size {gs}; choose one of {GROUP_SIZES}")

    expected = config.weight_shapes()
    tensors: dict[str, np.ndarray] = {}
    shapes: dict[str, list[int]] = {}
    modules: list[str] = []
    formats: dict[str, list[int]] = {}
    for name, shape in expected.items():
        if name not in qweights:
            raise ValueError(f"qweights lacks {name!r}")
        t = qweights[name]
        if isinstance(t, QuantizedTensor):
            if (t.bits, t.group_size) != (bits, gs):
                # e.g. an int8 embedding in an int4 checkpoint: recorded per tensor.
                formats[name] = [t.bits, t.group_size]
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: shape {t.shape}, config says {shape}")
            for part, arr in t.arrays().items():
                tensors[f"{name}.{part}"] = arr
            shapes[name] = list(t.shape)
            modules.append(name)
        else:
            a = np.asarray(t)
            if tuple(a.shape) != tuple(shape):
                raise ValueError(f"{name}: shape {a.shape}, config says {shape}")
            tensors[name] = a if a.dtype in (np.float32, np.float16) else a.astype(np.float32)

    if src_dir is not None and (Path(src_dir) / "config.json").is_file():
        cfg = json.loads((Path(src_dir) / "config.json").read_text(encoding="utf-8"))
    else:
        cfg = config.to_hf_dict()
    qc = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "bits": bits,
          "group_size": gs, "method": quant_info.get("method", "rtn"),
          "quantized_embeddings": "model.embed_tokens.weight" in modules}
    qc.update({k: v for k, v in quant_info.items() if k not in qc})
    qc["modules"] = modules
    if formats:
        qc["tensor_formats"] = formats      # name -> [bits, group_size] where not the default
    cfg["quantization_config"] = qc

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_safetensors(tmp / WEIGHTS_FILE, tensors,
                         metadata={"format": QUANT_METHOD, SHAPES_KEY: json.dumps(shapes)})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        if src_dir is not None:
            for f in TOKENIZER_FILES:
                if (Path(src_dir) / f).is_file():
                    shutil.copyfile(Path(src_dir) / f, tmp / f)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------ load
def _check_qc(qc, src: str) -> tuple[int, int, list[str] | None]:
    if not isinstance(qc, dict):
        raise CheckpointError(f"{src}: no quantization_config; not a Lingli quantized checkpoint")
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        raise CheckpointError(f"{src}: quantization_config.quant_method is {method!r}; Lingli "
                              f"reads only its own {QUANT_METHOD!r} format (GPTQ/AWQ/bitsandbytes "
                              f"checkpoints need converting)")
    ver = qc.get("format_version")
    if ver not in SUPPORTED_VERSIONS:
        raise CheckpointError(f"{src}: quantization format_version {ver!r} is not supported "
                              f"(this Lingli reads {list(SUPPORTED_VERSIONS)}); upgrade Lingli")
    bits = qc.get("bits")
    if bits not in BITS:
        raise CheckpointError(f"{src}: unsupported bit width {bits} in quantization_config "
                              f"(Lingli has int8, int4 and int3)")
    gs = qc.get("group_size")
    if gs not in GROUP_SIZES:
        raise CheckpointError(f"{src}: unsupported group size {gs} in quantization_config "
                              f"(choose one of {list(GROUP_SIZES)})")
    modules = qc.get("modules")
    if modules is not None and not (isinstance(modules, list)
                                    and all(isinstance(m, str) for m in modules)):
        raise CheckpointError(f"{src}: quantization_config.modules must be a list of tensor names")
    return bits, gs, modules


def load_quantized(path: str | Path, config: ModelConfig) -> dict[str, np.ndarray | QuantizedTensor]:
    """HF name -> QuantizedTensor (quantized weights) or float array (the rest), validated
    against config.json's quantization_config and ``config.weight_shapes()``; zero-copy."""
    p = Path(path)
    f = p / WEIGHTS_FILE if p.is_dir() else p
    cfg_src = str(p / "config.json" if p.is_dir() else f)
    bits, gs, modules = _check_qc(config.quantization_config, cfg_src)
    ver = config.quantization_config.get("format_version")
    st = open_safetensors(f)
    expected = config.weight_shapes()
    if modules is None:
        modules = [n for n in expected if f"{n}.q" in st]
    unknown = [m for m in modules if m not in expected]
    if unknown:
        raise CheckpointError(f"{cfg_src}: quantization_config.modules names {unknown[0]!r}, "
                              f"which the {config.arch} config has no weight for")
    shapes_meta = {}
    if st.metadata and SHAPES_KEY in st.metadata:
        try:
            shapes_meta = json.loads(st.metadata[SHAPES_KEY])
        except json.JSONDecodeError:
            raise CheckpointError(f"{f}: metadata {SHAPES_KEY!r} is not valid JSON") from None

    formats = config.quantization_config.get("tensor_formats") or {}
    if not isinstance(formats, dict):
        raise CheckpointError(f"{cfg_src}: quantization_config.tensor_formats must be an object")
    out: dict[str, np.ndarray | QuantizedTensor] = {}
    qset = set(modules)
    default_format = (bits, gs)
    for name, shape in expected.items():
        if name in qset:
            if len(shape) != 2:
                raise CheckpointError(f"{cfg_src}: {name!r} is not a matrix and cannot be quantized")
            n, k = shape
            fmt = formats.get(name, default_format)
            if (not isinstance(fmt, (list, tuple)) or len(fmt) != 2 or fmt[0] not in BITS
                    or fmt[1] not in GROUP_SIZES):
                raise CheckpointError(f"{cfg_src}: quantization_config.tensor_formats[{name!r}] "
                                      f"= {fmt!r}: expected [bits in {BITS}, group size in "
                                      f"{GROUP_SIZES}]")
            bits, gs = fmt
            coded = bits != 8 and ver != 1 and f"{name}.row_scale" in st
            if (bits != 8 and not coded and f"{name}.scales" in st
                    and st.meta(f"{name}.scales")[0] == "U8"):
                raise CheckpointError(f"{f}: missing tensor {name + '.row_scale'!r} (int{bits} "
                                      f"weights with U8 scale codes need it)")
            meta_shape = shapes_meta.get(name)
            if meta_shape is not None and list(meta_shape) != [n, k]:
                raise CheckpointError(f"{f}: tensor {name!r} has logical shape {meta_shape} in the "
                                      f"metadata, expected {[n, k]} from config.json")
            arrs = {}
            for part, (dt, want) in part_shapes(bits, gs, n, k, coded).items():
                tn = f"{name}.{part}"
                if tn not in st:
                    raise CheckpointError(f"{f}: missing tensor {tn!r} (int{bits} weights need "
                                          f"{', '.join(_PARTS[bits])})")

                adt, actual = st.meta(tn)
                if adt != dt or tuple(actual) != tuple(want):
                    raise CheckpointError(
                        f"{f}: tensor {tn!r} is {adt} {list(actual)}, expected {dt} {list(want)} "
                        f"for int{bits} group size {gs} of a {[n, k]} weight")
                arrs[part] = st.get(tn)
            extra = [x for x in ("mins", "row_scale", "qh")
                     if x not in arrs and f"{name}.{x}" in st]
            if extra:
                raise CheckpointError(f"{f}: tensor {name + '.' + extra[0]!r} does not belong "
                                      f"to an int{bits} checkpoint")
            out[name] = QuantizedTensor(bits, gs, (n, k), arrs["q"], arrs["scales"],
                                        arrs.get("mins"), arrs.get("qh"), arrs.get("row_scale"))
        else:
            if name not in st:
                hint = " (quantized parts exist, but quantization_config.modules omits it)" \
                    if f"{name}.q" in st else ""
                raise CheckpointError(f"{f}: missing tensor {name!r}{hint}")
            dt, actual = st.meta(name)
            if tuple(actual) != tuple(shape):
                raise CheckpointError(f"{f}: tensor {name!r} has shape {list(actual)}, expected "
                                      f"{list(shape)} from config.json")
            if dt not in ("F32", "F16", "BF16"):
                raise CheckpointError(f"{f}: tensor {name!r} has dtype {dt}, expected a float")
            a = st.get(name)
            out[name] = a.astype(np.float32) if len(shape) == 1 and a.dtype != np.float32 else a
    return out
