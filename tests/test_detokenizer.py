"""runtime.detokenizer: streaming text from token ids, byte-level hold-back."""

from __future__ import annotations

import random

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
from runtime.detokenizer import IncrementalDecoder

ANSWER = "你好！龘麤是罕见字，鬱爨也是。Hello 🌍 敏捷的狐狸 jumps 😀 饕餮"


def stream(dec: IncrementalDecoder, ids: list[int]) -> list[str]:
    return [dec.push(i) for i in ids]


@pytest.mark.parametrize("kind", ["sp_tok", "bpe_tok", "llama_json_tok"])
def test_stream_equals_decode_no_fffd(kind, request):
    tok = request.getfixturevalue(kind)
    ids = tok.encode(ANSWER, add_bos=False)
    if kind != "bpe_tok":
        pieces = [tok.id_to_piece(i) for i in ids]
        assert pieces.count("<0xE9>") >= 1 and sum(p.startswith("<0x") for p in pieces) >= 15
        # a 3-byte character really arrives as three byte pieces in a row
        assert any(
            all(p.startswith("<0x") for p in pieces[k : k + 3]) for k in range(len(pieces) - 2)
        )
    else:  # byte-level BPE splits the characters into partial-byte tokens
        assert any(b"\x80" <= tok.token_bytes(i)[:1] < b"\xc0" for i in ids)
    dec = IncrementalDecoder(tok, first_in_text=True)
    outs = stream(dec, ids)
    tail = dec.flush()
    assert tail == ""
    assert "".join(outs) == dec.text == tok.decode(ids) == ANSWER
    assert all("\ufffd" not in o for o in outs)
    # holding back really happened: some pushes emitted nothing
    assert "" in outs
    # emitted text is always a prefix of the final text
    acc = ""
    for o in outs:
        acc += o
        assert ANSWER.startswith(acc)


@pytest.mark.parametrize("kind", ["sp_tok", "bpe_tok"])
def test_stream_random_sequences(kind, request):
    """Any id sequence, valid UTF-8 or not: push* + flush == decode."""
    tok = request.getfixturevalue(kind)
    rng = random.Random(42)
    for _ in range(1500):
        ids = [rng.randrange(min(300, tok.vocab_size)) if rng.random() < 0.5 else rng.randrange(tok.vocab_size)
               for _ in range(rng.randint(1, 10))]
        dec = IncrementalDecoder(tok, first_in_text=True)
        outs = stream(dec, ids)
        final = "".join(outs) + dec.flush()
        assert final == dec.text == tok.decode(ids), [tok.id_to_piece(i) for i in ids]


@pytest.mark.parametrize("kind", ["sp_tok", "bpe_tok"])
def test_stream_corpus(kind, request):
    tok = request.getfixturevalue(kind)
    for line in make_corpus(200, seed=3):
        ids = tok.encode(line)
        dec = IncrementalDecoder(tok, first_in_text=True)
        outs = stream(dec, ids)
        assert all("\ufffd" not in o for o in outs)
        assert "".join(outs) + dec.flush() == line


def test_not_first_in_text_keeps_space(sp_tok):
    the = sp_tok.piece_to_id("\u2581the")
    assert IncrementalDecoder(sp_tok).push(the) == " the"
    assert IncrementalDecoder(sp_tok, first_in_text=True).push(the) == "the"
    # a continuation: decode(prompt + answer) == decode(prompt) + streamed answer
    prompt = sp_tok.encode("北京有什么好玩的地方？")
    answer = sp_tok.encode(" the quick fox", add_bos=False)
    dec = IncrementalDecoder(sp_tok)
    streamed = dec.push_many(answer) + dec.flush()
    assert sp_tok.decode(prompt) + streamed == sp_tok.decode(prompt + answer)


def test_incomplete_tail_held_until_flush(sp_tok):
    e4, bd, a0 = (sp_tok.piece_to_id(f"<0x{x}>") for x in ("E4", "BD", "A0"))
    dec = IncrementalDecoder(sp_tok)
    assert dec.push(e4) == "" and dec.push(bd) == ""
    assert dec.pending
    assert dec.push(a0) == "你"
    assert not dec.pending
    dec = IncrementalDecoder(sp_tok)
    assert dec.push(e4) == "" and dec.push(bd) == ""
    # only at the end does an unfinished character become U+FFFD (one per byte, as sentencepiece does)
    assert dec.flush() == "\ufffd\ufffd" == sp_tok.decode([e4, bd])


def test_invalid_bytes_in_middle(sp_tok, bpe_tok):
    ff = sp_tok.piece_to_id("<0xFF>")
    e4 = sp_tok.piece_to_id("<0xE4>")
    the = sp_tok.piece_to_id("\u2581the")
    dec = IncrementalDecoder(sp_tok)
    assert dec.push(ff) == "\ufffd"  # 0xFF can never start a character: decided at once
    assert dec.push(e4) == ""
    assert dec.push(the) == "\ufffd the"  # E4 followed by a space: decided invalid
    assert dec.flush() == ""


def test_special_tokens(bpe_tok):
    ids = bpe_tok.encode("<|im_start|>assistant\n你好<|im_end|>")
    dec = IncrementalDecoder(bpe_tok)
    assert dec.push_many(ids) + dec.flush() == "assistant\n你好"
    dec = IncrementalDecoder(bpe_tok, skip_special_tokens=False)
    assert dec.push_many(ids) + dec.flush() == "<|im_start|>assistant\n你好<|im_end|>"


# ---------------------------------------------------------------- stop strings


def test_stop_string_split_across_tokens(sp_tok):
    text = "北京很好玩。\nUser:再见"
    ids = sp_tok.encode(text, add_bos=False)
    stop = "\nUser:"
    assert not any(stop in sp_tok.token_bytes(i).decode("utf-8", "replace") for i in ids)
    dec = IncrementalDecoder(sp_tok, stop=[stop], first_in_text=True)
    outs = []
    for i in ids:
        outs.append(dec.push(i))
        assert "\n" not in dec.text  # the start of the stop string is never emitted
        if dec.stopped:
            break
    assert dec.stopped and dec.stop_string == stop
    assert dec.text == "".join(outs) == "北京很好玩。"
    assert dec.push(ids[-1]) == "" and dec.flush() == ""


def test_stop_string_multibyte_byte_pieces(sp_tok):
    """The stop string is a rare character that arrives as three byte pieces."""
    text = "你好龘麤"
    ids = sp_tok.encode(text, add_bos=False)
    dec = IncrementalDecoder(sp_tok, stop=["龘"], first_in_text=True)
    out = dec.push_many(ids)
    assert dec.stopped and out == dec.text == "你好"


def test_partial_stop_released(sp_tok):
    """A prefix of a stop string that does not complete is emitted, nothing lost."""
    text = "a\nUs b\nUse"
    ids = sp_tok.encode(text, add_bos=False)
    dec = IncrementalDecoder(sp_tok, stop=["\nUser:"], first_in_text=True)
    outs = stream(dec, ids)
    assert not dec.stopped
    assert not "".join(outs).endswith("\nUse")  # held: it may still become "\nUser:"
    assert "".join(outs) + dec.flush() == text == dec.text


def test_several_stops_earliest_wins(bpe_tok):
    text = "answer<human>: more\nHuman: x"
    ids = bpe_tok.encode(text)
    dec = IncrementalDecoder(bpe_tok, stop=["\nHuman:", "<human>:"])
    dec.push_many(ids)
    assert dec.stopped and dec.stop_string == "<human>:" and dec.text == "answer"


def test_stop_string_special_token_text(bpe_tok):
    """With skip_special_tokens=False a special token's text can be a stop string."""
    ids = bpe_tok.encode("你好<|im_end|>后面")
    dec = IncrementalDecoder(bpe_tok, stop=["<|im_end|>"], skip_special_tokens=False)
    assert dec.push_many(ids) == "你好" and dec.stopped


def test_stop_random_against_reference(bpe_tok):
    """Streaming with stops equals cutting the full decode at the first stop."""
    rng = random.Random(7)
    stops = ["狐狸", "\n\n", "jumps"]
    for line in make_corpus(150, seed=5):
        line = line.replace(" ", rng.choice([" ", "\n\n", " "]), 2)
        ids = bpe_tok.encode(line)
        dec = IncrementalDecoder(bpe_tok, stop=stops)
        out = dec.push_many(ids) + dec.flush()
        cuts = [line.find(s) for s in stops if s in line]
        expected = line[: min(cuts)] if cuts else line
        assert out == expected == dec.text
        assert dec.stopped == bool(cuts)


def test_bad_stop_type(sp_tok):
    with pytest.raises(ValueError):
        IncrementalDecoder(sp_tok, stop=[1])
    assert IncrementalDecoder(sp_tok, stop="x")._stops == ["x"]
