"""Tokenizers of LLaMA-family checkpoints: sentencepiece or Hugging Face.

``Tokenizer.from_dir(path)`` loads ``tokenizer.model`` (sentencepiece) when
present, else ``tokenizer.json`` (Hugging Face ``tokenizers``), together
with ``tokenizer_config.json``, ``special_tokens_map.json``,
``added_tokens.json`` and ``generation_config.json`` when they exist.

Besides ``encode``/``decode``, the tokenizer precomputes at load time the raw
bytes every token contributes to the output text (``token_bytes``). The
streaming decoder (``runtime.detokenizer``) works on those bytes, so a
Chinese character emitted as three ``<0xE4><0xBD><0xA0>`` byte pieces comes
out whole, and the concatenation of streamed text equals ``decode(ids)``.

The invariant, checked by the tests on random id sequences::

    raw = b"".join(tok.token_bytes(i) for i in ids)   # leading-space rule applied
    raw.decode("utf-8", tok.decode_errors) == tok.decode(ids)

No PyTorch and no transformers: this module is on the CPU inference path.
"""

from __future__ import annotations

import codecs
import json
import operator
import re
from pathlib import Path
from typing import Any

from runtime.errors import TokenizerError

__all__ = ["Tokenizer", "bytes_to_unicode", "PER_BYTE_REPLACE"]

SPIECE_SPACE = "\u2581"  # '▁', sentencepiece's visible space

# sentencepiece (and HF ByteFallback) replace every invalid byte by one U+FFFD;
# Python's "replace" replaces a maximal invalid subpart by one U+FFFD.  This
# error handler gives Python's decoder sentencepiece's behaviour.
PER_BYTE_REPLACE = "lingli-per-byte-replace"


def _per_byte_replace(exc: UnicodeError) -> tuple[str, int]:
    if isinstance(exc, UnicodeDecodeError):
        return "\ufffd", exc.start + 1
    raise exc


try:
    codecs.lookup_error(PER_BYTE_REPLACE)
except LookupError:
    codecs.register_error(PER_BYTE_REPLACE, _per_byte_replace)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (byte-level BPE)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


# --------------------------------------------------------------------------
# small readers


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, None when the file does not exist."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any, source: Path, field: str) -> str | None:
    """A special-token field: a string, an AddedToken dict, or null."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{source}: field {field!r} must be a string or a token object, got {value!r}")


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """Top-level fields of a protobuf message: (field number, wire type, value)."""
    out = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated field")
        out.append((field, wire, value))
    return out


def _sp_normalizer_flags(model_proto: bytes) -> tuple[bool, bool]:
    """(add_dummy_prefix, remove_extra_whitespaces) of a sentencepiece ModelProto.

    Parsed by hand so that protobuf is not a dependency.  Both default to true.
    """
    add_dummy_prefix = remove_extra_ws = True
    for field, wire, value in _proto_fields(model_proto):
        if field == 3 and wire == 2:  # ModelProto.normalizer_spec
            for f, w, v in _proto_fields(value):
                if f == 3 and w == 0:
                    add_dummy_prefix = bool(v)
                elif f == 4 and w == 0:
                    remove_extra_ws = bool(v)
    return add_dummy_prefix, remove_extra_ws


# --------------------------------------------------------------------------


class Tokenizer:
    """A loaded tokenizer.  Build it with :meth:`from_dir`.

    Attributes:
        kind: ``"sentencepiece"`` or ``"hf"``.
        vocab_size: number of pieces (including added tokens).
        bos_id, pad_id, unk_id: ids or None.
        eos_ids: every id that ends generation (the tokenizer's EOS first,
            then those of generation_config.json).
        bos_token, eos_token: the text of those tokens (for chat templates).
        chat_template: the checkpoint's own Jinja chat template, or None.
        special_ids: ids that ``decode(skip_special_tokens=True)`` drops.
        add_bos: what ``encode(add_bos=None)`` does.
        strips_leading_space: ``decode`` drops one leading space of the
            first piece (sentencepiece add_dummy_prefix).
        decode_errors: the ``codecs`` error handler that reproduces how
            ``decode`` replaces invalid UTF-8.
    """

    kind: str
    vocab_size: int
    bos_id: int | None
    eos_ids: list[int]
    pad_id: int | None
    unk_id: int | None
    bos_token: str | None
    eos_token: str | None
    chat_template: str | None
    special_ids: set[int]
    add_bos: bool
    strips_leading_space: bool
    decode_errors: str
    path: Path | None

    def __init__(self) -> None:
        raise TypeError("use Tokenizer.from_dir(path)")

    # ------------------------------------------------------------------ load

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load the tokenizer of a checkpoint directory."""
        d = Path(path)
        if not d.is_dir():
            raise TokenizerError(f"tokenizer directory not found: {d}")
        config = _read_json(d / "tokenizer_config.json") or {}
        smap = _read_json(d / "special_tokens_map.json") or {}
        gen = _read_json(d / "generation_config.json") or {}
        added = _read_json(d / "added_tokens.json") or {}

        self = object.__new__(cls)
        self.path = d
        if (d / "tokenizer.model").exists():
            self._load_sentencepiece(d / "tokenizer.model", config, added, d)
        elif (d / "tokenizer.json").exists():
            self._load_hf(d / "tokenizer.json")
        else:
            raise TokenizerError(
                f"no tokenizer in {d}: expected tokenizer.model (sentencepiece) "
                f"or tokenizer.json (Hugging Face)"
            )
        self._apply_config(d, config, smap, gen)
        return self

    def _load_sentencepiece(self, file: Path, config: dict, added: dict, d: Path) -> None:
        import sentencepiece as spm

        try:
            proto = file.read_bytes()
        except OSError as e:
            raise TokenizerError(f"{file}: cannot read ({e})") from None
        if not proto:
            raise TokenizerError(f"{file}: empty file, not a sentencepiece model")
        sp = spm.SentencePieceProcessor()
        try:
            add_dummy_prefix, remove_extra_ws = _sp_normalizer_flags(proto)
            ok = sp.LoadFromSerializedProto(proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError
            raise TokenizerError(f"{file}: not a valid sentencepiece model ({e})") from None
        if ok is False or sp.get_piece_size() == 0:
            raise TokenizerError(f"{file}: not a valid sentencepiece model")

        self.kind = "sentencepiece"
        self._sp = sp
        self._hf = None
        n = sp.get_piece_size()
        self._n_base = n
        self.strips_leading_space = add_dummy_prefix or remove_extra_ws
        self._strip_all_leading = remove_extra_ws
        self.decode_errors = PER_BYTE_REPLACE
        self._exact_bytes = True

        pieces = [sp.id_to_piece(i) for i in range(n)]
        skipped: list[bytes] = []
        raw: list[bytes] = []
        strippable: list[bool] = []
        special: set[int] = set()
        self._piece_to_id_map = {p: i for i, p in enumerate(pieces)}
        for i, p in enumerate(pieces):
            if sp.is_byte(i):
                m = _BYTE_PIECE.match(p)
                b = bytes([int(m.group(1), 16)]) if m else p.encode()
                skipped.append(b)
                raw.append(b)
                strippable.append(False)
            elif sp.is_control(i) or sp.is_unknown(i):
                special.add(i)
                skipped.append(b"")
                raw.append(p.encode())
                strippable.append(False)
            else:  # normal, user-defined, unused
                b = p.replace(SPIECE_SPACE, " ").encode()
                skipped.append(b)
                raw.append(b)
                strippable.append(True)

        # Tokens added on top of the sentencepiece model (e.g. Chinese-Alpaca's
        # [PAD]): tokenizer_config.json added_tokens_decoder / added_tokens.json.
        extra: dict[int, tuple[str, bool]] = {}
        for key, val in (config.get("added_tokens_decoder") or {}).items():
            src = d / "tokenizer_config.json"
            try:
                tid = int(key)
            except ValueError:
                raise TokenizerError(f"{src}: added_tokens_decoder key {key!r} is not an id") from None
            content = _token_content(val, src, f"added_tokens_decoder[{key}]")
            is_special = bool(val.get("special", True)) if isinstance(val, dict) else True
            if tid < n:
                if content != pieces[tid]:
                    raise TokenizerError(
                        f"{src}: added token {tid} is {content!r} but tokenizer.model has {pieces[tid]!r}"
                    )
                if is_special and tid not in special:
                    special.add(tid)
                    skipped[tid] = b""
                    strippable[tid] = False
                continue
            extra[tid] = (content, is_special)
        for content, tid in added.items():
            if not isinstance(tid, int) or isinstance(tid, bool) or tid < 0:
                raise TokenizerError(f"{d / 'added_tokens.json'}: id of {content!r} must be an int, got {tid!r}")
            if tid >= n and tid not in extra:
                extra[tid] = (content, True)
            elif tid < n and pieces[tid] != content:
                raise TokenizerError(
                    f"{d / 'added_tokens.json'}: token {tid} is {content!r} but tokenizer.model has {pieces[tid]!r}"
                )
        if extra:
            expected = list(range(n, n + len(extra)))
            if sorted(extra) != expected:
                raise TokenizerError(
                    f"added tokens in {d} must take ids {n}..{n + len(extra) - 1} "
                    f"right after tokenizer.model's {n} pieces, got {sorted(extra)}"
                )
        for tid in sorted(extra):
            content, is_special = extra[tid]
            pieces.append(content)
            self._piece_to_id_map[content] = tid
            raw.append(content.encode())
            skipped.append(b"" if is_special else content.encode())
            strippable.append(False)
            if is_special:
                special.add(tid)

        self.vocab_size = len(pieces)
        self._pieces = pieces
        self._bytes_skip = skipped
        self._bytes_raw = raw
        self._strippable = strippable
        self.special_ids = special
        self.unk_id = sp.unk_id() if sp.unk_id() >= 0 else None
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else None
        self._sp_eos = sp.eos_id() if sp.eos_id() >= 0 else None
        # Strings in the input text that stand for one special token.
        self._split_tokens = {pieces[i]: i for i in special}
        self._split_tokens.update({c: i for i, (c, _) in extra.items()})

    def _load_hf(self, file: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tk = HFTokenizer.from_file(str(file))
            spec = json.loads(tk.to_str())
        except Exception as e:  # tokenizers raises a plain Exception
            raise TokenizerError(f"{file}: not a valid Hugging Face tokenizer.json ({e})") from None
        self.kind = "hf"
        self._sp = None
        self._hf = tk
        n = tk.get_vocab_size(with_added_tokens=True)
        self.vocab_size = n
        self._n_base = n
        added = tk.get_added_tokens_decoder()
        self.special_ids = {i for i, t in added.items() if t.special}
        self.bos_id = self.pad_id = self.unk_id = self._sp_eos = None
        self._split_tokens = {}

        pieces: list[str] = []
        for i in range(n):
            p = tk.id_to_token(i)
            pieces.append(p if p is not None else "")
        self._pieces = pieces
        self._piece_to_id_map = {p: i for i, p in enumerate(pieces) if p}

        raw = self._hf_piece_bytes(spec.get("decoder"), pieces, added)
        self._bytes_raw = raw
        self._bytes_skip = [b"" if i in self.special_ids else b for i, b in enumerate(raw)]
        model = spec.get("model") or {}
        unk = model.get("unk_token")
        if isinstance(unk, str) and tk.token_to_id(unk) is not None:
            self.unk_id = tk.token_to_id(unk)

    def _hf_piece_bytes(self, decoder: dict | None, pieces: list[str], added: dict) -> list[bytes]:
        """token_bytes table for a tokenizer.json, following its decoder."""
        self.strips_leading_space = False
        self._strip_all_leading = False
        self.decode_errors = "replace"
        self._exact_bytes = True
        self._strippable = [False] * len(pieces)
        steps = []
        if decoder is None:
            steps = None
        elif decoder.get("type") == "Sequence":
            steps = decoder.get("decoders") or []
        else:
            steps = [decoder]

        def added_content(i: int) -> str | None:
            t = added.get(i)
            return t.content if t is not None else None

        if steps is not None:
            types = [s.get("type") for s in steps]
            if types == ["ByteLevel"]:
                out = []
                for i, p in enumerate(pieces):
                    if i in added:
                        p = added_content(i)
                    if all(c in _UNICODE_TO_BYTE for c in p):
                        out.append(bytes(_UNICODE_TO_BYTE[c] for c in p))
                    else:
                        out.append(p.encode())
                return out
            if set(types) <= {"Replace", "ByteFallback", "Fuse", "Strip", "Metaspace"}:
                return self._hf_spiece_bytes(steps, pieces, added)
        # Unknown decoder: approximate with one-token decodes.
        self._exact_bytes = False
        return [
            self._hf.decode([i], skip_special_tokens=False).encode() if p else b""
            for i, p in enumerate(pieces)
        ]

    def _hf_spiece_bytes(self, steps: list[dict], pieces: list[str], added: dict) -> list[bytes]:
        """tokenizer.json of a sentencepiece-style (LLaMA) model."""
        out: list[bytes] = []
        byte_fallback = any(s.get("type") == "ByteFallback" for s in steps)
        if byte_fallback:
            self.decode_errors = PER_BYTE_REPLACE
        strip_all = False
        for s in steps:
            t = s.get("type")
            if t == "Strip" and s.get("content") == " " and int(s.get("start", 0)) >= 1:
                self.strips_leading_space = True
                strip_all = True  # strips the fused string: whatever piece comes first
            elif t == "Metaspace":
                scheme = s.get("prepend_scheme")
                if scheme in ("first", "always") or (scheme is None and s.get("add_prefix_space", True)):
                    self.strips_leading_space = True
        for i, p in enumerate(pieces):
            if i in added:
                out.append(added[i].content.encode())
                self._strippable[i] = strip_all
                continue
            if byte_fallback:
                m = _BYTE_PIECE.match(p)
                if m:
                    out.append(bytes([int(m.group(1), 16)]))
                    self._strippable[i] = strip_all
                    continue
            text = p
            for s in steps:
                t = s.get("type")
                if t == "Replace":
                    pat = (s.get("pattern") or {}).get("String")
                    if pat is not None:
                        text = text.replace(pat, s.get("content", ""))
                elif t == "Metaspace":
                    text = text.replace(s.get("replacement", SPIECE_SPACE), " ")
            out.append(text.encode())
            self._strippable[i] = True
        return out

    def _token_id(self, content: str | None) -> int | None:
        if content is None:
            return None
        return self._piece_to_id_map.get(content)

    def _apply_config(self, d: Path, config: dict, smap: dict, gen: dict) -> None:
        cfg_file = d / "tokenizer_config.json"
        map_file = d / "special_tokens_map.json"

        def token(field: str) -> tuple[str | None, Path | None]:
            for src, data in ((cfg_file, config), (map_file, smap)):
                if data.get(field) is not None:
                    return _token_content(data[field], src, field), src
            return None, None

        bos, bos_src = token("bos_token")
        if bos is not None:
            tid = self._token_id(bos)
            if tid is None:
                raise TokenizerError(f"{bos_src}: bos_token {bos!r} is not in the vocabulary")
            self.bos_id = tid
        eos, eos_src = token("eos_token")
        eos_id = self._sp_eos
        if eos is not None:
            eos_id = self._token_id(eos)
            if eos_id is None:
                raise TokenizerError(f"{eos_src}: eos_token {eos!r} is not in the vocabulary")
        pad, _ = token("pad_token")
        if pad is not None and self._token_id(pad) is not None:
            self.pad_id = self._token_id(pad)
        unk, _ = token("unk_token")
        if unk is not None and self._token_id(unk) is not None:
            self.unk_id = self._token_id(unk)

        gen_file = d / "generation_config.json"

        def gen_id(field: str) -> list[int]:
            v = gen.get(field)
            if v is None:
                return []
            vals = v if isinstance(v, list) else [v]
            for x in vals:
                if not isinstance(x, int) or isinstance(x, bool) or not 0 <= x < self.vocab_size:
                    raise TokenizerError(
                        f"{gen_file}: {field} must be a token id in [0, {self.vocab_size}) "
                        f"or a list of them, got {v!r}"
                    )
            return list(vals)

        if self.bos_id is None and gen_id("bos_token_id"):
            self.bos_id = gen_id("bos_token_id")[0]
        if self.pad_id is None and gen_id("pad_token_id"):
            self.pad_id = gen_id("pad_token_id")[0]
        eos_ids: list[int] = []
        for i in ([eos_id] if eos_id is not None else []) + gen_id("eos_token_id"):
            if i not in eos_ids:
                eos_ids.append(i)
        self.eos_ids = eos_ids
        self.bos_token = self._pieces[self.bos_id] if self.bos_id is not None else None
        self.eos_token = self._pieces[eos_ids[0]] if eos_ids else None

        add_bos = config.get("add_bos_token")
        if add_bos is not None and not isinstance(add_bos, bool):
            raise TokenizerError(f"{cfg_file}: add_bos_token must be true or false, got {add_bos!r}")
        if add_bos is None:
            if self.kind == "sentencepiece":
                add_bos = self.bos_id is not None
            else:  # does tokenizer.json's post-processor put BOS first?
                with_sp = self._hf.encode("a", add_special_tokens=True).ids
                without = self._hf.encode("a", add_special_tokens=False).ids
                add_bos = (
                    self.bos_id is not None
                    and with_sp[:1] == [self.bos_id]
                    and without[:1] != [self.bos_id]
                )
        self.add_bos = bool(add_bos) and self.bos_id is not None

        tmpl = config.get("chat_template")
        if isinstance(tmpl, list):  # [{"name": "default", "template": "..."}, ...]
            named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
            tmpl = named.get("default")
        if tmpl is not None and not isinstance(tmpl, str):
            raise TokenizerError(f"{cfg_file}: chat_template must be a string, got {type(tmpl).__name__}")
        if tmpl is None and (d / "chat_template.jinja").exists():
            tmpl = (d / "chat_template.jinja").read_text(encoding="utf-8")
        self.chat_template = tmpl

        if self.kind == "sentencepiece":
            self._split_re = (
                re.compile("|".join(re.escape(s) for s in sorted(self._split_tokens, key=len, reverse=True)))
                if self._split_tokens
                else None
            )

    # ------------------------------------------------------------- encoding

    @staticmethod
    def _check_text(text: str | bytes) -> str:
        if isinstance(text, (bytes, bytearray, memoryview)):
            try:
                return bytes(text).decode("utf-8")
            except UnicodeDecodeError as e:
                raise TokenizerError(
                    f"input text is not valid UTF-8: byte 0x{bytes(text)[e.start]:02X} at offset {e.start} ({e.reason})"
                ) from None
        if not isinstance(text, str):
            raise TokenizerError(f"input text must be str or bytes, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise TokenizerError(
                f"input text is not valid UTF-8: lone surrogate U+{ord(text[e.start]):04X} at index {e.start}"
            ) from None
        return text

    def encode(self, text: str | bytes, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``.

        Special-token strings in the text (``<s>``, ``</s>``, ``<|im_start|>``
        ...) become their ids.  ``add_bos=None`` follows the tokenizer's
        default (:attr:`add_bos`).  Raises TokenizerError on invalid UTF-8.
        """
        text = self._check_text(text)
        if add_bos is None:
            add_bos = self.add_bos
        ids: list[int] = []
        if add_bos:
            if self.bos_id is None:
                raise TokenizerError("add_bos=True but this tokenizer has no BOS token")
            ids.append(self.bos_id)
        if self.kind == "sentencepiece":
            # Each text segment is encoded on its own, with the dummy prefix,
            # as Meta's reference code and llama.cpp do around special tokens.
            pos = 0
            if self._split_re is not None:
                for m in self._split_re.finditer(text):
                    if m.start() > pos:
                        ids.extend(self._sp.encode(text[pos : m.start()]))
                    ids.append(self._split_tokens[m.group()])
                    pos = m.end()
            if pos < len(text):
                ids.extend(self._sp.encode(text[pos:]))
        else:
            ids.extend(self._hf.encode(text, add_special_tokens=False).ids)
        return ids

    # ------------------------------------------------------------- decoding

    def _check_ids(self, ids: list[int]) -> list[int]:
        out = []
        for i in ids:
            try:
                i = operator.index(i)
            except TypeError:
                raise TokenizerError(f"token ids must be ints, got {type(i).__name__}: {i!r}") from None
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"token id {i} is out of range [0, {self.vocab_size})")
            out.append(i)
        return out

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped unless told otherwise."""
        ids = self._check_ids(ids)
        if self.kind == "hf":
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
        if skip_special_tokens and all(i < self._n_base for i in ids):
            return self._sp.decode([i for i in ids if i not in self.special_ids])
        return self.decode_from_bytes(ids, skip_special_tokens)

    def decode_from_bytes(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """decode() computed from the token_bytes table (what streaming yields)."""
        ids = self._check_ids(ids)
        table = self._bytes_skip if skip_special_tokens else self._bytes_raw
        chunks = []
        at_start = self.strips_leading_space
        for i in ids:
            b = table[i]
            if at_start and b:
                b, at_start = self.strip_leading_space(i, b)
            chunks.append(b)
        return b"".join(chunks).decode("utf-8", self.decode_errors)

    def token_bytes(self, token_id: int, skip_special_tokens: bool = True) -> bytes:
        """Raw bytes ``token_id`` adds to the text (b'' for a skipped special token)."""
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} is out of range [0, {self.vocab_size})")
        return (self._bytes_skip if skip_special_tokens else self._bytes_raw)[token_id]

    def strip_leading_space(self, token_id: int, data: bytes) -> tuple[bytes, bool]:
        """Apply decode()'s leading-space rule to the first non-empty token.

        ``data`` is the (non-empty) ``token_bytes`` of ``token_id``, the first
        token of the text that contributes bytes.  Returns the bytes to emit
        and whether the rule still applies to the next token.  sentencepiece
        strips the dummy-prefix space of a normal piece (never the space of a
        ``<0x20>`` byte piece); a model trained with remove_extra_whitespaces
        strips every leading space until some text appears.
        """
        if not self.strips_leading_space or not self._strippable[token_id]:
            return data, False
        if self._strip_all_leading:
            data = data.lstrip(b" ")
            return data, not data
        return (data[1:] if data[:1] == b" " else data), False

    # ------------------------------------------------------------- helpers

    def id_to_piece(self, token_id: int) -> str:
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} is out of range [0, {self.vocab_size})")
        return self._pieces[token_id]

    def piece_to_id(self, piece: str) -> int | None:
        return self._piece_to_id_map.get(piece)

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    def apply_chat_template(
        self,
        messages: list[dict],
        preset: str | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """Render ``messages`` with ``preset`` or else the checkpoint's template."""
        from runtime.chat_template import render_chat

        if preset is None and self.chat_template is None:
            raise TokenizerError(
                f"{self.path}: the checkpoint has no chat_template; pass a preset "
                f"(see runtime.chat_template.list_presets())"
            )
        return render_chat(
            messages,
            template=None if preset is not None else self.chat_template,
            preset=preset,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_ids={self.eos_ids}, path={str(self.path)!r})"
        )
