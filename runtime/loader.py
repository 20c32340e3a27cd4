"""Find, memory-map and validate the safetensors weights of a HF model directory.

``load_weights`` returns HF tensor names -> numpy arrays, checked against
``ModelConfig.weight_shapes()``. Lingli never unpickles: a directory holding
only ``pytorch_model.bin``-style files gets an error explaining how to convert.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np

from runtime.config import ModelConfig
from runtime.errors import CheckpointError
from runtime.safetensors_io import SafetensorsFile, open_safetensors

__all__ = ["load_weights", "checkpoint_files", "CheckpointWarning"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_SHARD_RE = re.compile(r"^(.*)-(\d+)-of-(\d+)\.safetensors$")
# Buffers some exporters save that carry no learned weights.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".inv_freq", ".cos_cached", ".sin_cached",
                     ".masked_bias", ".attn.bias")

_CONVERT_HINT = (
    "Lingli never unpickles checkpoints (pickle files can run arbitrary code); "
    "convert them to safetensors first, e.g.\n"
    "  python -c \"from transformers import AutoModelForCausalLM as M; "
    "M.from_pretrained('{src}').save_pretrained('{dst}', safe_serialization=True)\"\n"
    "then copy the tokenizer files and point Lingli at the new directory."
)

_DTYPES = {None: None, "fp32": "fp32", "float32": "fp32", "f32": "fp32",
           "fp16": "fp16", "float16": "fp16", "f16": "fp16"}
_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}


class CheckpointWarning(UserWarning):
    """A checkpoint loads, but has something the user may want to know about."""


def _listing(d: Path, limit: int = 30) -> str:
    try:
        names = sorted(x.name + ("/" if x.is_dir() else "") for x in d.iterdir())
    except OSError as e:
        return f"(cannot list: {e})"
    if not names:
        return "(the directory is empty)"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _read_index(index: Path) -> dict[str, Path]:
    """Parse a sharded index; return tensor name -> shard path (shards checked to exist)."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index}: invalid JSON at line {e.lineno} column {e.colno}: "
                              f"{e.msg}") from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{index}: no 'weight_map' object (tensor name -> shard file)")
    base = index.parent.resolve()
    out: dict[str, Path] = {}
    missing: dict[str, str] = {}
    for name, shard in wm.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"{index}: weight_map entry for {name!r} must be a file "
                                  f"name, got {shard!r}")
        sp = (index.parent / shard)
        try:
            inside = sp.resolve().is_relative_to(base)
        except OSError:
            inside = False
        if Path(shard).is_absolute() or not inside:
            raise CheckpointError(f"{index}: shard {shard!r} (for tensor {name!r}) lies outside "
                                  f"the model directory")
        if not sp.is_file():
            missing.setdefault(shard, name)
        out[name] = sp
    if missing:
        shard, name = next(iter(missing.items()))
        raise CheckpointError(
            f"{index}: shard file {shard!r} (holding e.g. {name!r}) is missing from "
            f"{index.parent}" + (f"; also missing: {sorted(missing)[1:]}" if len(missing) > 1 else "")
            + f". Directory contains: {_listing(index.parent)}")
    return out


def _resolve(path: str | Path) -> tuple[list[Path], Path | None]:
    """(safetensors files, index file or None) for a dir / file path."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {str(p)!r} does not exist")
    if p.is_file():
        if p.name.endswith(".index.json"):
            wm = _read_index(p)
            return sorted(set(wm.values())), p
        if p.suffix == ".safetensors":
            return [p], None
        if p.suffix in _PICKLE_SUFFIXES:
            raise CheckpointError(f"{p}: is a pickle checkpoint. "
                                  + _CONVERT_HINT.format(src=p.parent, dst=f"{p.parent}-safetensors"))
        raise CheckpointError(f"{p}: not a safetensors file or a model directory")

    single = p / SINGLE_FILE
    if single.is_file():
        return [single], None
    index = p / INDEX_FILE
    if index.is_file():
        wm = _read_index(index)
        return sorted(set(wm.values())), index
    found = sorted(x for x in p.glob("*.safetensors") if x.is_file())
    if len(found) == 1:
        return found, None
    if len(found) > 1:
        # Shards written without an index: accept one complete "-0000k-of-0000n" set.
        groups = {(m.group(1), m.group(3)) for m in map(_SHARD_RE.match, (f.name for f in found)) if m}
        if (len(groups) == 1 and all(_SHARD_RE.match(f.name) for f in found)
                and len(found) == int(next(iter(groups))[1])):
            return found, None
        raise CheckpointError(
            f"{p}: several .safetensors files ({', '.join(f.name for f in found)}) and no "
            f"{INDEX_FILE} to say which hold the model; pass the file path directly or add "
            f"the index")
    pickles = sorted(x.name for x in p.iterdir()
                     if x.is_file() and (x.suffix in _PICKLE_SUFFIXES
                                         or x.name.endswith(".bin.index.json")))
    if pickles:
        raise CheckpointError(
            f"{p}: only pickle checkpoints found ({', '.join(pickles)}), no .safetensors. "
            + _CONVERT_HINT.format(src=p, dst=f"{p}-safetensors"))
    raise CheckpointError(f"{p}: no weights found (no {SINGLE_FILE}, {INDEX_FILE} or "
                          f"*.safetensors). Directory contains: {_listing(p)}")


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files that hold the model at ``path`` (a dir or a file)."""
    return _resolve(path)[0]


def _is_ignored(name: str) -> bool:
    return name.endswith(_IGNORED_SUFFIXES)


def _convert(name: str, st_dtype: str, f: SafetensorsFile, want_dtype: str | None,
             keep_f32: bool) -> np.ndarray:
    """Read one tensor, converting as asked. Zero-copy for F32/F16 when no
    conversion is needed."""
    if keep_f32:
        target = np.float32
    elif want_dtype == "fp32":
        target = np.float32
    elif want_dtype == "fp16":
        target = np.float16
    else:  # keep checkpoint dtype; BF16 / F64 have no kernels -> float32
        target = {"F32": np.float32, "F16": np.float16}.get(st_dtype, np.float32)

    arr = f.get(name)  # F32/F16/F64: mmap view; BF16: float32 copy
    if arr.dtype == target:
        return arr
    with np.errstate(over="ignore"):
        out = arr.astype(target)
    if target == np.float16:
        bad = np.isinf(out)
        if bad.any() and not np.isinf(arr[bad]).all():
            mx = float(np.max(np.abs(arr[np.isfinite(arr)]))) if np.isfinite(arr).any() else 0.0
            raise CheckpointError(
                f"{f.path}: tensor {name!r} overflows float16 (max |value| {mx:g} > 65504); "
                f"load it with dtype='fp32'")
    return out


def load_weights(path: str | Path, config: ModelConfig,
                 dtype: str | None = None) -> dict[str, np.ndarray]:
    """Load and validate a checkpoint's weights against ``config``.

    dtype: None keeps the checkpoint dtype (BF16 becomes float32), "fp32" or
    "fp16" convert the matrices; norm weights and biases are always float32.
    F32/F16 tensors that need no conversion stay memory-mapped (read-only).
    Returns HF tensor names -> arrays, in ``config.weight_shapes()`` order.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be None, 'fp32' or 'fp16', got {dtype!r}")
    want = _DTYPES[dtype]

    files, index = _resolve(path)
    where: dict[str, SafetensorsFile] = {}
    opened = [open_safetensors(fp) for fp in files]
    if index is not None:
        wm = _read_index(index)
        by_path = {fp: st for fp, st in zip(files, opened)}
        for name, sp in wm.items():
            st = by_path[sp]
            if name not in st:
                raise CheckpointError(f"{index}: maps tensor {name!r} to {sp.name}, but "
                                      f"{sp} has no such tensor")
            where[name] = st
    else:
        for st in opened:
            for name in st.keys():
                if name in where:
                    raise CheckpointError(f"tensor {name!r} appears in both {where[name].path} "
                                          f"and {st.path}")
                where[name] = st

    expected = config.weight_shapes()
    src = index if index is not None else (files[0] if len(files) == 1 else files[0].parent)

    missing = [n for n in expected if n not in where]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        hint = ""
        if missing == ["lm_head.weight"]:
            hint = (" (config.json says tie_word_embeddings is false; if the output "
                    "layer shares the embedding, set it to true)")
        raise CheckpointError(f"{src}: missing tensor{'s' if len(missing) > 1 else ''} "
                              f"{shown}{more}{hint}")

    for n, shape in expected.items():
        st = where[n]
        dt, actual = st.meta(n)
        if tuple(actual) != tuple(shape):
            raise CheckpointError(f"{st.path}: tensor {n!r} has shape {list(actual)}, expected "
                                  f"{list(shape)} from config.json")
        if dt not in _FLOAT_DTYPES:
            raise CheckpointError(f"{st.path}: tensor {n!r} has unsupported dtype {dt} "
                                  f"(expected F32, F16 or BF16)")

    extras = [n for n in where if n not in expected and not _is_ignored(n)
              and not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if extras:
        shown = ", ".join(extras[:10]) + (f", ... ({len(extras) - 10} more)" if len(extras) > 10 else "")
        warnings.warn(f"{src}: ignoring {len(extras)} tensor(s) the {config.arch} config does "
                      f"not use: {shown}", CheckpointWarning, stacklevel=2)

    out: dict[str, np.ndarray] = {}
    for n, shape in expected.items():
        st = where[n]
        keep_f32 = len(shape) == 1  # norm weights and biases
        out[n] = _convert(n, st.meta(n)[0], st, want, keep_f32)
    return out
