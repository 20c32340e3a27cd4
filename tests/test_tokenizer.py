"""runtime.tokenizer on tokenizers built on the fly (no download)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from fixtures_tokenizer import (  # noqa: F401  (pytest fixtures)
    RARE_ZH,
    bpe_dir,
    bpe_tok,
    llama_json_dir,
    llama_json_tok,
    make_corpus,
    sp_dir,
    sp_tok,
)
from runtime.errors import TokenizerError
from runtime.tokenizer import Tokenizer

MIXED = "你好，世界! Hello 🌍 敏捷的狐狸 jumps 😀"
TEXTS = [
    MIXED,
    "龘麤 rare 鬱爨 characters 齉饕餮",
    "two  spaces,\ttab and\nnew lines\n\n",
    " leading space",
    "北京有什么好玩的地方？\n",
    "emoji only 🚀🎉🌍",
    "mixed123数字456",
]
SMOLLM2 = Path("/root/.cache/lingli/smollm2/tokenizer.json")


def joined_bytes(tok: Tokenizer, ids: list[int]) -> bytes:
    """b''.join(token_bytes) with decode()'s leading-space rule."""
    out = []
    at_start = tok.strips_leading_space
    for i in ids:
        b = tok.token_bytes(i)
        if at_start and b:
            b, at_start = tok.strip_leading_space(i, b)
        out.append(b)
    return b"".join(out)


def byte_piece_ids(tok: Tokenizer, ids: list[int]) -> list[int]:
    return [i for i in ids if tok.id_to_piece(i).startswith("<0x")]


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", ["sp_tok", "bpe_tok", "llama_json_tok"])
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(kind, text, request):
    tok = request.getfixturevalue(kind)
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text
    assert joined_bytes(tok, ids).decode("utf-8") == text


def test_kinds_and_defaults(sp_tok, bpe_tok, llama_json_tok):
    assert sp_tok.kind == "sentencepiece" and bpe_tok.kind == "hf" and llama_json_tok.kind == "hf"
    assert sp_tok.vocab_size == 800 and bpe_tok.vocab_size == 600
    # LLaMA sentencepiece adds BOS by default; a SmolLM2-like tokenizer.json does not.
    assert sp_tok.encode("hello")[0] == sp_tok.bos_id == 1
    assert sp_tok.encode("hello", add_bos=False)[0] != 1
    assert bpe_tok.encode("hello")[:1] != [bpe_tok.bos_id]
    assert bpe_tok.encode("hello", add_bos=True)[0] == bpe_tok.bos_id
    # LLaMA-style tokenizer.json: its post-processor puts <s> first.
    assert llama_json_tok.add_bos and llama_json_tok.encode("hi")[0] == llama_json_tok.bos_id
    assert llama_json_tok.encode(MIXED, add_bos=False) == sp_tok.encode(MIXED, add_bos=False)


def test_special_ids_and_eos(sp_tok, bpe_tok):
    assert sp_tok.eos_ids == [2] and sp_tok.special_ids == {0, 1, 2}
    assert sp_tok.bos_token == "<s>" and sp_tok.eos_token == "</s>"
    # tokenizer eos (<|im_end|> = 2) first, then generation_config's [2, 0]
    assert bpe_tok.eos_ids == [2, 0]
    assert bpe_tok.special_ids == {0, 1, 2}
    assert bpe_tok.pad_id == 2 and bpe_tok.bos_id == 1
    assert bpe_tok.chat_template is not None and "<|im_start|>" in bpe_tok.chat_template
    assert sp_tok.chat_template is None
    assert sp_tok.strips_leading_space and not bpe_tok.strips_leading_space


def test_byte_fallback_pieces(sp_tok):
    ids = sp_tok.encode("龘", add_bos=False)
    pieces = [sp_tok.id_to_piece(i) for i in ids]
    assert pieces[-3:] == ["<0xE9>", "<0xBE>", "<0x98>"]
    assert [sp_tok.token_bytes(i) for i in ids[-3:]] == [b"\xe9", b"\xbe", b"\x98"]
    assert sp_tok.decode(ids) == "龘"


def test_token_bytes_table(sp_tok, bpe_tok):
    the = sp_tok.piece_to_id("\u2581the")
    assert sp_tok.token_bytes(the) == b" the"
    assert sp_tok.token_bytes(sp_tok.piece_to_id("\u2581")) == b" "
    assert sp_tok.token_bytes(sp_tok.piece_to_id("<0xE4>")) == b"\xe4"
    assert sp_tok.token_bytes(1) == b"" and sp_tok.token_bytes(1, skip_special_tokens=False) == b"<s>"
    g = bpe_tok.piece_to_id("\u0120")  # 'Ġ' is the byte-level space
    assert bpe_tok.token_bytes(g) == b" "
    assert bpe_tok.token_bytes(1) == b""
    assert bpe_tok.token_bytes(1, skip_special_tokens=False) == b"<|im_start|>"
    with pytest.raises(TokenizerError, match="out of range"):
        sp_tok.token_bytes(800)


def test_leading_space_rule(sp_tok):
    the = sp_tok.piece_to_id("\u2581the")
    space = sp_tok.piece_to_id("\u2581")
    b20 = sp_tok.piece_to_id("<0x20>")
    assert sp_tok.decode([the, the]) == "the the"
    assert sp_tok.decode([1, the]) == "the"
    assert sp_tok.decode([space, the]) == " the"
    assert sp_tok.decode([b20, the]) == "  the"  # a byte piece's space is never stripped
    for ids in ([the, the], [1, the], [space, the], [b20, the]):
        assert joined_bytes(sp_tok, ids).decode() == sp_tok.decode(ids)


# ---------------------------------------------------------------- consistency


def _random_ids(tok: Tokenizer, rng: random.Random, n_max: int = 8) -> list[int]:
    ids = []
    for _ in range(rng.randint(1, n_max)):
        if rng.random() < 0.3:  # bias towards low ids: specials and byte pieces
            ids.append(rng.randrange(min(300, tok.vocab_size)))
        else:
            ids.append(rng.randrange(tok.vocab_size))
    return ids


@pytest.mark.parametrize("kind", ["sp_tok", "bpe_tok"])
def test_token_bytes_match_decode_random(kind, request):
    """Every id sequence, valid UTF-8 or not: bytes table == library decode."""
    tok = request.getfixturevalue(kind)
    rng = random.Random(1234)
    for _ in range(3000):
        ids = _random_ids(tok, rng)
        text = joined_bytes(tok, ids).decode("utf-8", tok.decode_errors)
        assert text == tok.decode(ids), [tok.id_to_piece(i) for i in ids]
        assert tok.decode_from_bytes(ids) == tok.decode(ids)


def test_token_bytes_match_decode_random_llama_json(llama_json_tok):
    """HF ByteFallback replaces invalid runs differently; compare valid sequences."""
    tok = llama_json_tok
    rng = random.Random(99)
    compared = 0
    for _ in range(3000):
        ids = _random_ids(tok, rng)
        raw = joined_bytes(tok, ids)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        compared += 1
        assert text == tok.decode(ids), [tok.id_to_piece(i) for i in ids]
    assert compared > 1000


def test_sentencepiece_remove_extra_whitespaces(tmp_path):
    """A model trained with sentencepiece's defaults strips every leading space."""
    import sentencepiece as spm

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(make_corpus(800, seed=3)), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), model_type="bpe",
        vocab_size=500, byte_fallback=True, character_coverage=0.995, minloglevel=2,
    )
    tok = Tokenizer.from_dir(tmp_path)
    space = tok.piece_to_id("\u2581")
    a = next(i for i in range(tok.vocab_size) if len(tok.id_to_piece(i)) > 2 and tok.id_to_piece(i)[0] == "\u2581")
    assert tok.decode([space, space, a]) == tok.id_to_piece(a)[1:]
    rng = random.Random(5)
    for _ in range(2000):
        ids = _random_ids(tok, rng)
        assert joined_bytes(tok, ids).decode("utf-8", tok.decode_errors) == tok.decode(ids)


@pytest.mark.parametrize("kind", ["sp_tok", "bpe_tok", "llama_json_tok"])
def test_token_bytes_match_decode_corpus(kind, request):
    tok = request.getfixturevalue(kind)
    for line in make_corpus(200, seed=7) + TEXTS:
        ids = tok.encode(line)
        assert joined_bytes(tok, ids).decode("utf-8") == tok.decode(ids) == line


def test_rare_chars_come_out_as_bytes(sp_tok):
    ids = sp_tok.encode(RARE_ZH, add_bos=False)
    assert len(byte_piece_ids(sp_tok, ids)) >= 3 * 10
    assert sp_tok.decode(ids) == RARE_ZH


# ---------------------------------------------------------------- special tokens in text


def test_special_strings_map_to_ids_hf(bpe_tok):
    text = "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    ids = bpe_tok.encode(text)
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1
    assert bpe_tok.decode(ids) == "user\n你好\nassistant\n"
    assert bpe_tok.decode(ids, skip_special_tokens=False) == text


def test_special_strings_map_to_ids_sp(sp_tok):
    ids = sp_tok.encode("hello</s><s>world", add_bos=False)
    assert 2 in ids and 1 in ids
    assert ids.index(2) + 1 == ids.index(1)
    assert sp_tok.decode(ids) == "hello world"  # each text segment has the dummy prefix
    assert sp_tok.decode(ids, skip_special_tokens=False) == "hello</s><s> world"
    assert sp_tok.encode("<s>hi", add_bos=False)[0] == 1


def test_added_tokens_beyond_sentencepiece(sp_dir, tmp_path):
    """Chinese-Alpaca style: [PAD] appended after the sentencepiece pieces."""
    d = tmp_path / "alpaca"
    shutil.copytree(sp_dir, d)
    (d / "added_tokens.json").write_text(json.dumps({"[PAD]": 800}))
    (d / "special_tokens_map.json").write_text(json.dumps({"pad_token": "[PAD]"}))
    tok = Tokenizer.from_dir(d)
    assert tok.vocab_size == 801 and tok.pad_id == 800 and 800 in tok.special_ids
    ids = tok.encode("你好[PAD]", add_bos=False)
    assert ids[-1] == 800
    assert tok.decode(ids) == "你好"
    assert tok.decode(ids, skip_special_tokens=False) == "你好[PAD]"

    (d / "added_tokens.json").write_text(json.dumps({"[PAD]": 805}))
    with pytest.raises(TokenizerError, match="800"):
        Tokenizer.from_dir(d)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("kind", ["sp_tok", "bpe_tok"])
@pytest.mark.parametrize("bad", [b"\xff\xfe", b"abc\xe4\xbd", b"\xc0\x80", "bad \ud800 surrogate", "\udfff"])
def test_invalid_utf8_rejected(kind, bad, request):
    tok = request.getfixturevalue(kind)
    with pytest.raises(TokenizerError, match="not valid UTF-8"):
        tok.encode(bad)


@pytest.mark.parametrize("kind", ["sp_tok", "bpe_tok"])
def test_bytes_input(kind, request):
    tok = request.getfixturevalue(kind)
    assert tok.encode(MIXED.encode("utf-8")) == tok.encode(MIXED)
    with pytest.raises(TokenizerError):
        tok.encode(123)


def test_decode_out_of_range(sp_tok, bpe_tok):
    for tok in (sp_tok, bpe_tok):
        with pytest.raises(TokenizerError, match="out of range"):
            tok.decode([5, tok.vocab_size])
        with pytest.raises(TokenizerError, match="out of range"):
            tok.decode([-1])


def test_missing_files(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.model.*tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_corrupt_sentencepiece(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x05garbage, not a model at all" * 3)
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("tokenizer_config.json", "{not json", "tokenizer_config.json"),
        ("tokenizer_config.json", "[1, 2]", "tokenizer_config.json"),
        ("tokenizer_config.json", '{"eos_token": "<nope>"}', "tokenizer_config.json.*<nope>"),
        ("tokenizer_config.json", '{"add_bos_token": "yes"}', "add_bos_token"),
        ("special_tokens_map.json", "{,}", "special_tokens_map.json"),
        ("generation_config.json", '{"eos_token_id": "2"}', "generation_config.json"),
        ("generation_config.json", '{"eos_token_id": [2, 99999]}', "generation_config.json"),
        ("generation_config.json", "", "generation_config.json"),
    ],
)
def test_corrupt_side_files(bpe_dir, tmp_path, name, content, match):
    d = tmp_path / "tok"
    shutil.copytree(bpe_dir, d)
    (d / name).write_text(content)
    with pytest.raises(TokenizerError, match=match):
        Tokenizer.from_dir(d)


def test_generation_config_int_eos(bpe_dir, tmp_path):
    d = tmp_path / "tok"
    shutil.copytree(bpe_dir, d)
    (d / "generation_config.json").write_text('{"eos_token_id": 0}')
    assert Tokenizer.from_dir(d).eos_ids == [2, 0]


def test_no_torch_import():
    import subprocess
    import sys

    code = (
        "import sys, runtime.tokenizer, runtime.detokenizer, runtime.chat_template; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


# ---------------------------------------------------------------- SmolLM2 (optional)


@pytest.mark.skipif(not SMOLLM2.exists(), reason=f"{SMOLLM2} not present")
def test_smollm2_tokenizer_round_trip():
    tok = Tokenizer.from_dir(SMOLLM2.parent)
    assert tok.kind == "hf" and tok.vocab_size >= 49152
    assert not tok.add_bos
    for text in TEXTS + make_corpus(50, seed=11):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert joined_bytes(tok, ids).decode("utf-8") == text
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert tok.id_to_piece(ids[0]) == "<|im_start|>"
    rng = random.Random(0)
    for _ in range(500):
        ids = _random_ids(tok, rng)
        assert joined_bytes(tok, ids).decode("utf-8", tok.decode_errors) == tok.decode(ids)
