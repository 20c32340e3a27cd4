"""Tokenizer tools: train, extend, prune a sentencepiece model; resize/slice a checkpoint to match.

    train_tokenizer     sentencepiece BPE or unigram on text files, LLaMA style:
                        byte fallback, identity normalisation (lossless round
                        trip), split digits, <unk>=0 <s>=1 </s>=2, no pad
    extend_tokenizer    append another model's pieces (Chinese-LLaMA style):
                        every existing id keeps its piece
    resize_checkpoint   grow embed_tokens / lm_head to the extended vocabulary
    prune_tokenizer     keep the pieces a corpus uses (plus specials and bytes)
    prune_checkpoint    slice embed_tokens / lm_head rows to the kept ids

Every output directory gets tokenizer.model, tokenizer_config.json,
special_tokens_map.json and a tokenizer.json made from the model, so that
transformers loads it without protobuf (its sentencepiece reader needs it).

The model protobuf is edited by hand (protobuf is not a dependency): only the
``pieces`` (field 1) and ``trainer_spec.vocab_size`` change; every other field
is copied byte for byte.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from runtime.safetensors_io import open_safetensors, save_safetensors
from runtime.tokenizer import _proto_fields, _sp_normalizer_flags

__all__ = [
    "train_tokenizer",
    "extend_tokenizer",
    "resize_checkpoint",
    "prune_tokenizer",
    "prune_checkpoint",
    "write_tokenizer_files",
    "read_pieces",
]

# sentencepiece_model.proto SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
INDEX_FILE = "model.safetensors.index.json"
PRUNE_MAP_FILE = "pruned_ids.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "tokenizer.vocab",
                   "special_tokens_map.json", "added_tokens.json", PRUNE_MAP_FILE)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")


# --------------------------------------------------------------------------
# minimal protobuf editing of a sentencepiece ModelProto


class Piece(NamedTuple):
    """One vocabulary entry of a sentencepiece model."""

    piece: str
    score: float
    type: int


def _enc_varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32/int64 are sent as 10-byte two's complement
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _enc_field(field: int, wire: int, value) -> bytes:
    key = _enc_varint(field << 3 | wire)
    if wire == 0:
        return key + _enc_varint(value)
    if wire == 2:
        return key + _enc_varint(len(value)) + value
    return key + value  # wire 1 / 5: fixed-size bytes as read


def _enc_piece(p: Piece) -> bytes:
    body = _enc_field(1, 2, p.piece.encode("utf-8")) + _enc_field(2, 5, struct.pack("<f", p.score))
    if p.type != NORMAL:  # NORMAL is the default
        body += _enc_field(3, 0, p.type)
    return body


def _load_proto(model: Path) -> list[tuple[int, int, object]]:
    try:
        fields = _proto_fields(model.read_bytes())
    except OSError as e:
        raise FileNotFoundError(f"{model}: cannot read sentencepiece model ({e})") from None
    except ValueError as e:
        raise ValueError(f"{model}: not a sentencepiece model ({e})") from None
    if not any(f == 1 for f, _, _ in fields):
        raise ValueError(f"{model}: not a sentencepiece model (no pieces)")
    return fields


def read_pieces(model: Path) -> list[Piece]:
    """The vocabulary of a sentencepiece model file, in id order."""
    model = _model_file(model)
    pieces = []
    for field, wire, value in _load_proto(model):
        if field == 1 and wire == 2:
            text, score, typ = "", 0.0, NORMAL
            for f, w, v in _proto_fields(value):
                if f == 1 and w == 2:
                    text = v.decode("utf-8")
                elif f == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif f == 3 and w == 0:
                    typ = v
            pieces.append(Piece(text, score, typ))
    return pieces


def _model_type(model: Path) -> int:
    """TrainerSpec.model_type: 1 unigram (the default), 2 BPE, 3 word, 4 char."""
    for field, wire, value in _load_proto(model):
        if field == 2 and wire == 2:
            for f, w, v in _proto_fields(value):
                if f == 3 and w == 0:
                    return v
    return 1


def _write_model(template: Path, pieces: Sequence[Piece], out: Path) -> None:
    """``template``'s ModelProto with ``pieces`` as its vocabulary."""
    seen: set[str] = set()
    for i, p in enumerate(pieces):
        if not p.piece or p.piece in seen:
            raise ValueError(f"piece {i} {p.piece!r} is empty or duplicated")
        seen.add(p.piece)
    body = bytearray(b"".join(_enc_field(1, 2, _enc_piece(p)) for p in pieces))
    for field, wire, value in _load_proto(template):
        if field == 1 or field == 4:  # old pieces; self-test samples no longer hold
            continue
        if field == 2 and wire == 2:  # trainer_spec: vocab_size (field 4) follows the pieces
            value = b"".join(_enc_field(f, w, len(pieces) if f == 4 else v)
                             for f, w, v in _proto_fields(value))
        body += _enc_field(field, wire, value)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(bytes(body))
    _processor(out)  # sentencepiece must accept what we wrote


def _processor(model: Path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model.read_bytes())
    except Exception as e:  # sentencepiece raises RuntimeError/OSError
        raise ValueError(f"{model}: sentencepiece cannot load it ({e})") from None
    return sp


def _model_file(path: Path) -> Path:
    """A tokenizer.model given either the file or its directory."""
    path = Path(path)
    f = path / "tokenizer.model" if path.is_dir() else path
    if not f.is_file():
        raise FileNotFoundError(f"no sentencepiece model at {f}")
    return f


# --------------------------------------------------------------------------
# tokenizer_config.json, special_tokens_map.json, tokenizer.json


def write_tokenizer_files(model: Path, out_dir: Path, config_from: Path | None = None) -> Path:
    """Write the files around ``model`` (copied to out_dir/tokenizer.model if elsewhere).

    tokenizer_config.json keeps the fields of ``config_from``'s (chat_template
    and so on) when there is one; the special tokens are the model's own.
    """
    model, out_dir = _model_file(model), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / "tokenizer.model"
    if model.resolve() != dest.resolve():
        shutil.copyfile(model, dest)
    sp = _processor(dest)
    pieces = read_pieces(dest)
    n = len(pieces)

    config: dict = {}
    src = Path(config_from) / "tokenizer_config.json" if config_from else None
    if src is not None and src.is_file():
        config = json.loads(src.read_text(encoding="utf-8"))
        extra = [k for k in (config.get("added_tokens_decoder") or {}) if int(k) >= n]
        if extra or (Path(config_from) / "added_tokens.json").exists():
            raise ValueError(f"{src}: tokens added beyond the sentencepiece model (ids {extra}) "
                             f"are not supported here; add them to the model as user symbols")

    def special(i: int) -> str | None:
        return pieces[i].piece if i >= 0 else None

    specials = {"bos_token": special(sp.bos_id()), "eos_token": special(sp.eos_id()),
                "unk_token": special(sp.unk_id()), "pad_token": special(sp.pad_id())}
    config.update(specials)
    config.setdefault("add_bos_token", sp.bos_id() >= 0)
    config.setdefault("add_eos_token", False)
    config.setdefault("clean_up_tokenization_spaces", False)
    config.setdefault("legacy", False)
    config["tokenizer_class"] = "LlamaTokenizer"
    config["added_tokens_decoder"] = {
        str(i): {"content": p.piece, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": p.type != USER_DEFINED}
        for i, p in enumerate(pieces) if p.type in (UNKNOWN, CONTROL, USER_DEFINED)}
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    smap = {k: v for k, v in specials.items() if v is not None}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(smap, indent=2) + "\n", encoding="utf-8")
    _write_tokenizer_json(dest, pieces, sp, config["add_bos_token"], out_dir / "tokenizer.json")
    return out_dir


def _normalizer_flags(model: Path) -> tuple[bool, bool]:
    """(add_dummy_prefix, remove_extra_whitespaces), read as the runtime reads them."""
    return _sp_normalizer_flags(_model_file(model).read_bytes())


def _write_tokenizer_json(model: Path, pieces: list[Piece], sp, add_bos: bool, out: Path) -> None:
    """A Hugging Face tokenizer.json equivalent to ``model``, as transformers' LlamaConverter makes.

    BPE merges are every split of a piece into two pieces, ranked by the merged
    piece's score (sentencepiece merges the best-scoring concatenation first).
    """
    try:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
    except ImportError:  # transformers is optional here; the runtime reads tokenizer.model
        out.unlink(missing_ok=True)
        return
    unk = sp.unk_id()
    if _model_type(model) == 2:
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        merges = []
        for i, p in enumerate(pieces):
            if p.type not in (NORMAL, USER_DEFINED):
                continue
            for k in range(1, len(p.piece)):
                left, right = p.piece[:k], p.piece[k:]
                if left in vocab and right in vocab:
                    merges.append((-p.score, i, vocab[left], vocab[right], left, right))
        merges.sort()
        tm = models.BPE(vocab=vocab, merges=[(m[4], m[5]) for m in merges],
                        unk_token=pieces[unk].piece if unk >= 0 else None,
                        fuse_unk=True, byte_fallback=True)
    else:
        tm = models.Unigram([(p.piece, p.score) for p in pieces], unk if unk >= 0 else None,
                            byte_fallback=True)
    tk = Tokenizer(tm)
    add_dummy_prefix, remove_extra_ws = _normalizer_flags(model)
    norm = []
    if remove_extra_ws:
        norm += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if add_dummy_prefix:
        norm.append(normalizers.Prepend(SPACE))
    norm.append(normalizers.Replace(" ", SPACE))
    tk.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(dec)
    tk.add_special_tokens([AddedToken(p.piece, normalized=False, special=True)
                           for p in pieces if p.type in (UNKNOWN, CONTROL)])
    tk.add_tokens([AddedToken(p.piece, normalized=False) for p in pieces if p.type == USER_DEFINED])
    bos = sp.bos_id()
    if add_bos and bos >= 0:
        b = pieces[bos].piece
        tk.post_processor = processors.TemplateProcessing(
            single=f"{b} $A", pair=f"{b} $A {b} $B", special_tokens=[(b, bos)])
    tk.save(str(out))


# --------------------------------------------------------------------------
# training


def _read_text(path: Path) -> str:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"corpus file not found: {path}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02X} at offset {e.start})") from None


def _lines(files: Iterable[Path]) -> Iterator[str]:
    for f in files:
        yield from _read_text(f).splitlines()


def train_tokenizer(
    files: Sequence[Path],
    out_dir: Path,
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    user_symbols: Sequence[str] = (),
    num_threads: int = 2,
    input_sentence_size: int = 0,
    max_sentence_length: int = 16384,
) -> Path:
    """Train a LLaMA-style sentencepiece model on UTF-8 text files, one sentence a line.

    Writes out_dir/tokenizer.model and the config files; returns out_dir.
    ``input_sentence_size`` > 0 samples that many lines (large corpora);
    lines longer than ``max_sentence_length`` bytes are skipped by sentencepiece.
    Raises ValueError when the corpus is empty or too small for ``vocab_size``.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    if not 0 < character_coverage <= 1:
        raise ValueError(f"character_coverage must be in (0, 1], got {character_coverage}")
    files = [Path(f) for f in files]
    if not files:
        raise ValueError("no corpus files given")
    lines = [ln for ln in _lines(files) if ln.strip()]
    if not lines:
        raise ValueError(f"the corpus is empty: no non-blank line in {', '.join(map(str, files))}")
    n_chars = sum(map(len, lines))
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf,
            model_type=model_type, vocab_size=vocab_size,
            character_coverage=character_coverage,
            byte_fallback=True,
            normalization_rule_name="identity",  # NFKC would turn '，' into ',': not lossless
            remove_extra_whitespaces=False, add_dummy_prefix=True,
            split_digits=True, allow_whitespace_only_pieces=True,
            user_defined_symbols=list(user_symbols),
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=num_threads, input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True, max_sentence_length=max_sentence_length,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(_explain_train_error(str(e), vocab_size, character_coverage,
                                              len(lines), n_chars, files)) from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(buf.getvalue())
    return write_tokenizer_files(out_dir / "tokenizer.model", out_dir)


def _explain_train_error(msg: str, vocab_size: int, coverage: float, n_lines: int,
                         n_chars: int, files: list[Path]) -> str:
    corpus = f"the corpus ({n_lines} lines, {n_chars} characters in {', '.join(map(str, files))})"
    m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
    if m:
        return (f"{corpus} is too small for vocab_size={vocab_size}: sentencepiece can make at "
                f"most {m.group(2)} pieces from it. Give it more text or set vocab_size <= {m.group(2)}.")
    m = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
    if m:
        return (f"vocab_size={vocab_size} is too small: {corpus} needs {m.group(2)} pieces for "
                f"its characters at character_coverage={coverage} plus the special and 256 "
                f"byte pieces. Raise vocab_size to at least {m.group(2)} or lower character_coverage.")
    return f"sentencepiece failed to train on {corpus}: {msg}"


# --------------------------------------------------------------------------
# extension


def extend_tokenizer(base_model: Path, extra_model: Path, out_dir: Path) -> Path:
    """Append the normal and user-defined pieces of ``extra_model`` that ``base_model`` lacks.

    Every base id keeps its piece and score.  The new pieces keep their relative
    order but score below every base piece, so sentencepiece applies all of the
    base model's merges first: text made only of base pieces whose merges can't
    form a new piece encodes exactly as before.  Either argument may be a
    tokenizer.model or its directory; a base directory's tokenizer_config.json
    (chat template etc.) is carried over.  The extra model should be of the
    base's type (BPE for LLaMA): its scores become merge priorities / log
    probabilities of the base's kind.
    """
    base_file, extra_file = _model_file(base_model), _model_file(extra_model)
    base = read_pieces(base_file)
    have = {p.piece for p in base}
    new = [p for p in read_pieces(extra_file)
           if p.type in (NORMAL, USER_DEFINED) and p.piece not in have]
    if new:
        floor = min(p.score for p in base if p.type == NORMAL) - 1.0
        top = max(p.score for p in new)
        new = [Piece(p.piece, floor + (p.score - top), p.type) for p in new]
    out_dir = Path(out_dir)
    _write_model(base_file, base + new, out_dir / "tokenizer.model")
    return write_tokenizer_files(out_dir / "tokenizer.model", out_dir, config_from=base_file.parent)


# --------------------------------------------------------------------------
# checkpoints


def _weight_files(ckpt_dir: Path) -> tuple[dict[str, str], dict | None]:
    """tensor name -> safetensors file name, and the shard index (None for one file)."""
    index = ckpt_dir / INDEX_FILE
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        if not isinstance(data.get("weight_map"), dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        return dict(data["weight_map"]), data
    single = ckpt_dir / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{ckpt_dir}: no model.safetensors or {INDEX_FILE}")
    with open_safetensors(single) as f:
        return {k: single.name for k in f.keys()}, None


def _rewrite_rows(ckpt_dir: Path, out_dir: Path, vocab_size: int, rows_fn, tokenizer_dir: Path) -> Path:
    """Copy a checkpoint to out_dir, embed_tokens / lm_head replaced by rows_fn(name, matrix)."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    config_file = ckpt_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{ckpt_dir}: no config.json")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    wmap, index = _weight_files(ckpt_dir)
    if EMBED not in wmap:
        raise ValueError(f"{ckpt_dir}: no tensor {EMBED!r} in the checkpoint")
    if out_dir.resolve() == ckpt_dir.resolve():
        raise ValueError(f"out_dir must differ from the checkpoint directory {ckpt_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)

    touched = {wmap[EMBED]} | ({wmap[LM_HEAD]} if LM_HEAD in wmap else set())
    for shard in sorted(set(wmap.values())):
        if shard not in touched:
            shutil.copyfile(ckpt_dir / shard, out_dir / shard)
            continue
        with open_safetensors(ckpt_dir / shard) as f:
            tensors, bf16 = {}, []
            for name in f.keys():
                dtype, _ = f.meta(name)
                if dtype.startswith("F8"):
                    raise ValueError(f"{f.path}: tensor {name!r} is {dtype}; rewrite supports "
                                     f"float32/float16/bfloat16 shards only")
                a = f.get(name)  # BF16 comes back as exact float32 and goes back as BF16
                if dtype == "BF16":
                    bf16.append(name)
                if name in (EMBED, LM_HEAD):
                    a = rows_fn(name, np.asarray(a))
                tensors[name] = a
            save_safetensors(out_dir / shard, tensors, metadata=f.metadata, bf16=bf16)
    if index is not None:
        size = 0
        for shard in set(wmap.values()):
            with open_safetensors(out_dir / shard) as f:
                size += sum(f.nbytes(k) for k in f.keys())
        index = dict(index, metadata=dict(index.get("metadata") or {}, total_size=size))
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    config["vocab_size"] = vocab_size
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    # The rest (generation_config.json ...) as is, the tokenizer from tokenizer_dir; no
    # other weights (a stale pytorch_model.bin would not match the new vocabulary).
    for f in ckpt_dir.iterdir():
        if (f.is_file() and f.name not in TOKENIZER_FILES and f.name not in (INDEX_FILE, "config.json")
                and not f.name.endswith(WEIGHT_SUFFIXES)):
            shutil.copyfile(f, out_dir / f.name)
    for name in TOKENIZER_FILES:
        if Path(tokenizer_dir).resolve() == out_dir.resolve():
            break  # the tokenizer is already in place
        (out_dir / name).unlink(missing_ok=True)
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copyfile(Path(tokenizer_dir) / name, out_dir / name)
    return out_dir


def _decompose(text: str, piece_id: dict[str, int], max_len: int) -> list[int]:
    """Fewest old pieces that spell ``text``, with <0xXX> byte pieces for what they can't."""
    n = len(text)
    best: list[tuple[int, list[int]] | None] = [None] * (n + 1)
    best[0] = (0, [])
    for i in range(n):
        if best[i] is None:
            continue
        cost, ids = best[i]
        options = [(j, [piece_id[text[i:j]]]) for j in range(i + 1, min(n, i + max_len) + 1)
                   if text[i:j] in piece_id]
        if not options:  # byte fallback for this character
            byte_ids = [piece_id.get(f"<0x{b:02X}>") for b in text[i].encode("utf-8")]
            options = [(i + 1, [b for b in byte_ids if b is not None])]
        for j, add in options:
            if best[j] is None or cost + len(add) < best[j][0]:
                best[j] = (cost + len(add), ids + add)
    return best[n][1]


def resize_checkpoint(ckpt_dir: Path, tokenizer_dir: Path, out_dir: Path, init: str = "mean") -> Path:
    """Grow a checkpoint's embed_tokens and lm_head to ``tokenizer_dir``'s extended vocabulary.

    The checkpoint's own tokenizer (if it has one) must be a prefix of the new
    one: ids below its size keep their rows bit for bit.  New rows are
    ``init="mean"``: the mean of the old rows, or ``"subword"``: the mean of the
    rows of the old pieces the new piece's text decomposes into (fewest pieces,
    byte pieces for unknown characters).  Tied embeddings have only embed_tokens.
    """
    if init not in ("mean", "subword"):
        raise ValueError(f"init must be 'mean' or 'subword', got {init!r}")
    ckpt_dir, tokenizer_dir = Path(ckpt_dir), Path(tokenizer_dir)
    new_pieces = read_pieces(_model_file(tokenizer_dir))
    config = json.loads((ckpt_dir / "config.json").read_text(encoding="utf-8"))
    old_rows = int(config["vocab_size"])
    if (ckpt_dir / "tokenizer.model").is_file():
        old_pieces = read_pieces(ckpt_dir / "tokenizer.model")
        for i, p in enumerate(old_pieces):
            if i >= len(new_pieces) or new_pieces[i].piece != p.piece:
                got = new_pieces[i].piece if i < len(new_pieces) else "nothing"
                raise ValueError(f"{tokenizer_dir}: not an extension of {ckpt_dir}'s tokenizer: "
                                 f"id {i} is {got!r}, was {p.piece!r}")
        n_old = len(old_pieces)
    elif init == "subword":
        raise ValueError(f"{ckpt_dir}: init='subword' needs the checkpoint's tokenizer.model")
    else:
        n_old = old_rows
    n_new = len(new_pieces)
    if n_new < old_rows:
        raise ValueError(f"{tokenizer_dir} has {n_new} pieces, fewer than {ckpt_dir}'s vocab_size "
                         f"{old_rows}; use prune_checkpoint to shrink a vocabulary")
    # Rows past the old tokenizer (checkpoint padding) are initialised like new ones.
    n_keep = min(n_old, old_rows)
    if init == "subword":
        piece_id = {p.piece: i for i, p in enumerate(old_pieces[:n_keep])
                    if p.type in (NORMAL, USER_DEFINED, BYTE)}
        max_len = max(map(len, piece_id))
        parts = [_decompose(p.piece, piece_id, max_len) for p in new_pieces[n_keep:]]

    def rows(name: str, w: np.ndarray) -> np.ndarray:
        if w.shape[0] != old_rows:
            raise ValueError(f"{ckpt_dir}: {name} has {w.shape[0]} rows, config.json vocab_size "
                             f"says {old_rows}")
        old = w[:n_keep]
        mean = old.astype(np.float64).mean(axis=0)
        if init == "mean":
            extra = np.broadcast_to(mean, (n_new - n_keep, w.shape[1]))
        else:
            extra = np.stack([old[ids].astype(np.float64).mean(axis=0) if ids else mean
                              for ids in parts]) if parts else np.empty((0, w.shape[1]))
        return np.concatenate([old, extra.astype(w.dtype)])

    return _rewrite_rows(ckpt_dir, out_dir, n_new, rows, tokenizer_dir)


# --------------------------------------------------------------------------
# pruning


def _corpus_texts(files: Sequence[Path]) -> Iterator[str]:
    """What a corpus gets encoded as: each line (as in training) and each whole file."""
    for f in files:
        text = _read_text(f)
        yield from text.splitlines()
        yield text


def prune_tokenizer(model: Path, corpus_files: Sequence[Path], out_dir: Path) -> tuple[Path, list[int]]:
    """Keep the pieces needed to encode ``corpus_files`` exactly as ``model`` does.

    Kept: unknown/control/user-defined pieces, the 256 byte pieces, the pieces
    the corpus's encodings use, and every piece that is a substring of one
    (sentencepiece BPE builds a piece from such intermediate pieces, so without
    them it could no longer be reached).  Kept pieces stay in id order, so the
    specials and bytes keep their ids.  Returns (out_dir, old ids by new id),
    the map also written to out_dir/pruned_ids.json.
    """
    model_file = _model_file(model)
    sp = _processor(model_file)
    pieces = read_pieces(model_file)
    piece_id = {p.piece: i for i, p in enumerate(pieces)}
    files = [Path(f) for f in corpus_files]
    texts = [t for t in _corpus_texts(files) if t]
    if not texts:
        raise ValueError(f"the corpus is empty: no text in {', '.join(map(str, files)) or 'no files'}")

    used: set[int] = {i for i, p in enumerate(pieces) if p.type in (UNKNOWN, CONTROL, USER_DEFINED, BYTE)}
    original = sp.encode(texts)
    for ids in original:
        used.update(ids)
    for i in list(used):
        s = pieces[i].piece
        if pieces[i].type in (NORMAL, UNUSED):
            used.update(piece_id[s[a:b]] for a in range(len(s)) for b in range(a + 1, len(s) + 1)
                        if s[a:b] in piece_id)
    old_ids = sorted(used)

    out_dir = Path(out_dir)
    _write_model(model_file, [pieces[i] for i in old_ids], out_dir / "tokenizer.model")
    write_tokenizer_files(out_dir / "tokenizer.model", out_dir, config_from=model_file.parent)
    # The promise: the corpus encodes to the same pieces.
    new_of = {old: new for new, old in enumerate(old_ids)}
    pruned = _processor(out_dir / "tokenizer.model").encode(texts)
    for text, a, b in zip(texts, original, pruned):
        if [new_of[i] for i in a] != b:
            raise RuntimeError(f"pruned tokenizer encodes {text[:60]!r} differently; please report")
    (out_dir / PRUNE_MAP_FILE).write_text(json.dumps({"old_ids": old_ids}) + "\n", encoding="utf-8")
    return out_dir, old_ids


def prune_checkpoint(ckpt_dir: Path, tokenizer_dir: Path, old_ids: Sequence[int] | None,
                     out_dir: Path) -> Path:
    """Slice embed_tokens / lm_head to the rows ``old_ids`` (new id -> old id).

    ``old_ids=None`` reads them from tokenizer_dir/pruned_ids.json (prune_tokenizer's output).
    """
    tokenizer_dir = Path(tokenizer_dir)
    if old_ids is None:
        map_file = tokenizer_dir / PRUNE_MAP_FILE
        if not map_file.is_file():
            raise FileNotFoundError(f"{map_file}: no id map; pass old_ids")
        old_ids = json.loads(map_file.read_text(encoding="utf-8"))["old_ids"]
    ids = np.asarray(old_ids, dtype=np.int64)
    n_tok = len(read_pieces(_model_file(tokenizer_dir)))
    if len(ids) != n_tok:
        raise ValueError(f"{len(ids)} old ids for the {n_tok} pieces of {tokenizer_dir}")

    def rows(name: str, w: np.ndarray) -> np.ndarray:
        if len(ids) and not (0 <= ids.min() and ids.max() < w.shape[0]):
            raise ValueError(f"{ckpt_dir}: old ids must lie in [0, {w.shape[0]}) for {name}")
        return np.ascontiguousarray(w[ids])

    return _rewrite_rows(Path(ckpt_dir), Path(out_dir), len(ids), rows, tokenizer_dir)
