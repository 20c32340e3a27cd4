"""A small, strict safetensors reader and writer (numpy only, never unpickles).

File layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}``), then the data section; offsets are relative to its start.

``open_safetensors`` memory-maps the file and validates the whole header
before returning, so a truncated or lying file fails with a
``CheckpointError`` naming the file and the tensor instead of a crash later.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from runtime.errors import CheckpointError

__all__ = ["SafetensorsFile", "open_safetensors", "save_safetensors",
           "float32_to_bf16_bits", "bf16_bits_to_float32", "MAX_HEADER_BYTES"]

MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype -> numpy dtype of the raw storage
_RAW_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
    "F8_E4M3": np.dtype("u1"),
    "F8_E5M2": np.dtype("u1"),
}
# dtypes that get() cannot turn into a numpy value type (raw bytes only)
_RAW_ONLY = {"F8_E4M3", "F8_E5M2"}

# numpy dtype -> safetensors dtype (writer)
_NP_TO_ST: dict[np.dtype, str] = {
    np.dtype("float64"): "F64",
    np.dtype("float32"): "F32",
    np.dtype("float16"): "F16",
    np.dtype("int64"): "I64",
    np.dtype("int32"): "I32",
    np.dtype("int16"): "I16",
    np.dtype("int8"): "I8",
    np.dtype("uint64"): "U64",
    np.dtype("uint32"): "U32",
    np.dtype("uint16"): "U16",
    np.dtype("uint8"): "U8",
    np.dtype("bool"): "BOOL",
}


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 BF16 bit patterns -> float32 (exact; a new array)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 BF16 bit patterns, round to nearest even; NaN stays NaN."""
    x = np.asarray(x, dtype=np.float32)
    shape = x.shape
    x = np.ascontiguousarray(x).reshape(-1)
    u = x.view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
               >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return rounded.reshape(shape)


class SafetensorsFile:
    """A validated, memory-mapped safetensors file. Use ``open_safetensors``."""

    def __init__(self, path: Path, mm: mmap.mmap | None, data_start: int,
                 entries: dict[str, tuple[str, tuple[int, ...], int, int]],
                 metadata: dict | None):
        self.path = path
        self._mm = mm
        self._data_start = data_start
        self._entries = entries
        self.metadata = metadata

    # -- mapping-like access
    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, name: str):
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def meta(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype string, shape) of a tensor."""
        dt, shape, _, _ = self._entry(name)
        return dt, shape

    def nbytes(self, name: str) -> int:
        _, _, b, e = self._entry(name)
        return e - b

    def get_raw(self, name: str) -> np.ndarray:
        """Zero-copy read-only view of the stored bits (BF16 as uint16)."""
        dt, shape, begin, end = self._entry(name)
        raw = _RAW_DTYPES[dt]
        count = (end - begin) // raw.itemsize
        if count == 0 or self._mm is None:
            arr = np.empty(shape, dtype=raw)
            arr.setflags(write=False)
            return arr
        arr = np.frombuffer(self._mm, dtype=raw, count=count, offset=self._data_start + begin)
        return arr.reshape(shape)

    def get(self, name: str) -> np.ndarray:
        """The tensor as numpy: a read-only zero-copy view, except BF16 which is
        returned as a float32 copy (bits shifted left by 16)."""
        dt, _, _, _ = self._entry(name)
        if dt in _RAW_ONLY:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has dtype {dt}, which numpy cannot represent; "
                f"use get_raw() for its bytes")
        raw = self.get_raw(name)
        if dt == "BF16":
            return bf16_bits_to_float32(raw)
        return raw

    def close(self) -> None:
        """Release the mapping (arrays still referencing it keep it alive)."""
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # views still exist; the map closes when they are freed

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self._entries)} tensors)"


def _fail(path: Path, msg: str) -> CheckpointError:
    return CheckpointError(f"{path}: {msg}")


def _parse_header(path: Path, header_bytes: bytes, data_len: int):
    try:
        text = header_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(path, f"safetensors header is not valid UTF-8 ({e}); "
                          f"not a safetensors file or corrupted") from None

    dups: list[str] = []

    def no_dup_pairs(pairs):
        d = {}
        for k, v in pairs:
            if k in d:
                dups.append(k)
            d[k] = v
        return d

    try:
        header = json.loads(text, object_pairs_hook=no_dup_pairs)
    except json.JSONDecodeError as e:
        raise _fail(path, f"safetensors header is not valid JSON ({e.msg} at char {e.pos}); "
                          f"not a safetensors file or corrupted") from None
    if not isinstance(header, dict):
        raise _fail(path, f"safetensors header must be a JSON object, got {type(header).__name__}")
    if dups:
        raise _fail(path, f"safetensors header names tensor {dups[0]!r} more than once")

    metadata = header.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise _fail(path, f"__metadata__ must be a JSON object of strings, got {metadata!r}")

    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, info in header.items():
        where = f"tensor {name!r}"
        if not isinstance(info, dict):
            raise _fail(path, f"{where}: header entry must be an object, got {info!r}")
        for key in ("dtype", "shape", "data_offsets"):
            if key not in info:
                raise _fail(path, f"{where}: header entry has no {key!r}")
        dt = info["dtype"]
        if not isinstance(dt, str) or dt not in _RAW_DTYPES:
            raise _fail(path, f"{where}: unsupported dtype {dt!r} "
                              f"(supported: {', '.join(sorted(_RAW_DTYPES))})")
        shape = info["shape"]
        if (not isinstance(shape, list)
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                           for s in shape)):
            raise _fail(path, f"{where}: shape must be a list of non-negative integers, "
                              f"got {shape!r}")
        offs = info["data_offsets"]
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0
                           for o in offs)):
            raise _fail(path, f"{where}: data_offsets must be [begin, end] non-negative "
                              f"integers, got {offs!r}")
        begin, end = offs
        if begin > end:
            raise _fail(path, f"{where}: data_offsets begin {begin} > end {end}")
        numel = 1
        for s in shape:
            numel *= s
        want = numel * _RAW_DTYPES[dt].itemsize
        if end - begin != want:
            raise _fail(path, f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes "
                              f"but dtype {dt} shape {shape} needs {want} bytes")
        if end > data_len:
            raise _fail(path, f"{where}: file is truncated: tensor needs data bytes "
                              f"[{begin}, {end}) but the data section has only {data_len} bytes "
                              f"(expected file size >= {end + 8 + len(header_bytes)} bytes, "
                              f"actual {data_len + 8 + len(header_bytes)} bytes)")
        entries[name] = (dt, tuple(shape), begin, end)

    # overlap check on non-empty tensors
    spans = sorted((b, e, n) for n, (_, _, b, e) in entries.items() if e > b)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise _fail(path, f"tensors {n0!r} [{b0}, {e0}) and {n1!r} [{b1}, {e1}) "
                              f"overlap in the data section")
    return entries, metadata


def open_safetensors(path: str | os.PathLike) -> SafetensorsFile:
    """Memory-map and validate a safetensors file; CheckpointError if it is bad."""
    p = Path(path)
    try:
        f = open(p, "rb")
    except FileNotFoundError:
        raise CheckpointError(f"{p}: file not found") from None
    except OSError as e:
        raise CheckpointError(f"{p}: cannot open ({e})") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise _fail(p, f"file is {size} bytes, too short for a safetensors file "
                           f"(needs at least an 8-byte header length); truncated?")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise _fail(p, f"safetensors header length {n} is absurd (> {MAX_HEADER_BYTES} "
                           f"bytes); not a safetensors file or corrupted")
        if 8 + n > size:
            raise _fail(p, f"safetensors header length {n} exceeds the file size {size} bytes "
                           f"(expected at least {8 + n} bytes); truncated or not safetensors")
        header_bytes = f.read(n)
        if len(header_bytes) != n:
            raise _fail(p, f"could not read the {n}-byte header; file truncated?")
        data_len = size - 8 - n
        entries, metadata = _parse_header(p, header_bytes, data_len)
        mm = None
        if size > 0 and data_len > 0:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return SafetensorsFile(p, mm, 8 + n, entries, metadata)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                     metadata: Mapping[str, str] | None = None,
                     bf16: bool | Iterable[str] = False) -> None:
    """Write ``tensors`` to a safetensors file atomically (temp file + rename).

    ``bf16``: True stores every float32 array as BF16 (round to nearest even);
    an iterable of names converts only those. Other supported numpy dtypes:
    float64/32/16, int64/32/16/8, uint64/32/16/8, bool.
    """
    p = Path(path)
    if bf16 is True:
        bf16_names = {k for k, v in tensors.items() if np.asarray(v).dtype == np.float32}
    elif bf16 is False or bf16 is None:
        bf16_names = set()
    else:
        bf16_names = set(bf16)
        unknown = bf16_names - set(tensors)
        if unknown:
            raise KeyError(f"bf16 names not among the tensors: {sorted(unknown)}")

    prepared: list[tuple[str, str, np.ndarray]] = []
    for name, arr in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        a = np.asarray(arr)
        if name in bf16_names:
            if a.dtype != np.float32:
                raise TypeError(f"tensor {name!r}: bf16 storage needs a float32 array, "
                                f"got {a.dtype}")
            data = float32_to_bf16_bits(a).reshape(a.shape)
            st = "BF16"
        else:
            native = a.dtype.newbyteorder("=") if a.dtype.byteorder not in ("=", "|") else a.dtype
            st = _NP_TO_ST.get(np.dtype(native))
            if st is None:
                raise TypeError(f"tensor {name!r}: numpy dtype {a.dtype} cannot be stored "
                                f"in safetensors by Lingli")
            data = a.astype(a.dtype.newbyteorder("<"), copy=False)
        if not data.flags.c_contiguous:
            data = data.copy(order="C")  # (np.ascontiguousarray would turn 0-d into 1-d)
        prepared.append((name, st, data))

    # Like the reference writer: larger items first (keeps every tensor aligned), then by name.
    prepared.sort(key=lambda t: (-t[2].dtype.itemsize, t[0]))
    header: dict = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"metadata must map str to str, got {k!r}: {v!r}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, st, data in prepared:
        header[name] = {"dtype": st, "shape": list(data.shape),
                        "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
    hb = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hb += b" " * ((-len(hb)) % 8)

    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(hb)))
            f.write(hb)
            for _, _, data in prepared:
                if data.nbytes:
                    f.write(data.reshape(-1).view(np.uint8).data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
