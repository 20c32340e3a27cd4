"""train/data.py: corpora, packed sequences, instruction JSONL, the SFT loss mask, the poet corpus."""
from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

import numpy as np
import pytest

from runtime.chat import chat_prompt_ids
from runtime.chat_template import render_chat
from runtime.tokenizer import Tokenizer
from tiny_model import tokenizer_dir
from train.data import (
    IGNORE_INDEX,
    PackedDataset,
    build_sft_example,
    collate,
    load_instructions,
    poet_corpus,
    poet_instructions,
    read_fortunes,
    read_text,
)

FORTUNES = Path("/usr/share/games/fortunes")


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    return Tokenizer.from_dir(tokenizer_dir("sp", tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory):
    return Tokenizer.from_dir(tokenizer_dir("bpe", tmp_path_factory.mktemp("tok")))


# --------------------------------------------------------------------------- corpora


def test_read_fortunes_strips_ansi_and_splits(tmp_path):
    f = tmp_path / "poems"
    f.write_text(
        "\x1b[32m《静夜思》\x1b[m\n\x1b[1;33m作者：李白\x1b[m\n床前明月光，疑是地上霜。\n%\n"
        "  second entry  \nline two   \n%\n\n%  \n%\nlast\n",
        encoding="utf-8",
    )
    assert read_fortunes(f) == ["《静夜思》\n作者：李白\n床前明月光，疑是地上霜。",
                                "second entry\nline two", "last"]


def test_read_text_documents_and_bad_utf8(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("para one\nstill one\n\n  \npara two\n", encoding="utf-8")
    b.write_text("\n\nonly\n", encoding="utf-8")
    assert read_text([a, b]) == ["para one\nstill one\n\n  \npara two", "only"]
    assert read_text([a, b], paragraphs=True) == ["para one\nstill one", "para two", "only"]
    bad = tmp_path / "bad.txt"
    bad.write_bytes("好的".encode() + b"\xff\xfe ok")
    with pytest.raises(ValueError, match=r"bad\.txt.*byte offset 6"):
        read_text([a, bad])


# --------------------------------------------------------------------------- packing


def test_packed_dataset_joins_with_eos_and_cuts_exactly():
    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33]]
    ds = PackedDataset(docs, seq_len=4, eos_id=2)
    stream = [10, 11, 12, 2, 20, 21, 2, 30, 31, 32, 33, 2]
    assert len(ds) == 3
    for i in range(3):
        ex = ds[i]
        assert ex["input_ids"].dtype == np.int64 and ex["input_ids"].shape == (4,)
        assert ex["input_ids"].tolist() == stream[4 * i : 4 * i + 4]
        assert ex["labels"].tolist() == ex["input_ids"].tolist()
    # the tail that does not fill an example is dropped
    assert len(PackedDataset(docs, seq_len=5, eos_id=2)) == 2
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(ValueError, match="shorter than one example"):
        PackedDataset([[1, 2]], seq_len=8, eos_id=2)


# --------------------------------------------------------------------------- JSONL


def _write_jsonl(path: Path, lines: list) -> Path:
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else json.dumps(x, ensure_ascii=False).encode()
                                for x in lines) + b"\n")
    return path


def test_load_instructions_all_formats(tmp_path):
    f = _write_jsonl(tmp_path / "mix.jsonl", [
        {"instruction": "翻译", "input": "hello", "output": " 你好 "},
        {"instruction": "说你好", "output": "你好"},
        {"kind": "Translation", "input": "译：cat", "target": "猫"},
        {"conversation": [{"human": "q1", "assistant": "a1"}, {"human": "q2", "assistant": "a2"}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a"}]},
    ])
    f.write_bytes(f.read_bytes() + b"\n   \n")  # blank lines are not records
    convs = load_instructions(f)
    u, a = "user", "assistant"
    assert convs == [
        [{"role": u, "content": "翻译\nhello"}, {"role": a, "content": "你好"}],
        [{"role": u, "content": "说你好"}, {"role": a, "content": "你好"}],
        [{"role": u, "content": "译：cat"}, {"role": a, "content": "猫"}],
        [{"role": u, "content": "q1"}, {"role": a, "content": "a1"},
         {"role": u, "content": "q2"}, {"role": a, "content": "a2"}],
        [{"role": "system", "content": "s"}, {"role": u, "content": "u"}, {"role": a, "content": "a"}],
    ]
    assert convs.skipped == 0


BAD_LINES = [
    (b'{"instruction": "x", "output": ', "bad JSON"),
    (json.dumps({"instruction": "x"}).encode(), "'output' missing"),
    (json.dumps({"input": "x", "target": 3}).encode(), "'target' must be a string"),
    (b'{"instruction": "\xff", "output": "y"}', "invalid UTF-8"),
    (json.dumps([1, 2]).encode(), "expected a JSON object"),
    (json.dumps({"conversation": [{"human": "q"}]}).encode(), "conversation\\[0\\]"),
    (json.dumps({"messages": [{"role": "bot", "content": "q"}]}).encode(), "role"),
    (json.dumps({"text": "x"}).encode(), "unrecognised record"),
]


@pytest.mark.parametrize("bad,why", BAD_LINES)
def test_malformed_line_raises_with_file_and_line(tmp_path, bad, why):
    f = _write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, bad])
    with pytest.raises(ValueError, match=rf"d\.jsonl:2: .*{why}"):
        load_instructions(f)


def test_skip_mode_warns_per_line_and_counts(tmp_path, caplog):
    good = {"instruction": "a", "output": "b"}
    f = _write_jsonl(tmp_path / "d.jsonl", [good, BAD_LINES[0][0], good, BAD_LINES[3][0], good])
    with caplog.at_level(logging.WARNING, logger="train.data"):
        convs = load_instructions(f, on_error="skip")
    assert len(convs) == 3 and convs.skipped == 2
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 2
    assert f"{f}:2: bad JSON" in msgs[0] and "skipped" in msgs[0]
    assert f"{f}:4: invalid UTF-8" in msgs[1]
    assert convs.errors[0].startswith(f"{f}:2:")
    with pytest.raises(ValueError, match="on_error"):
        load_instructions(f, on_error="ignore")
    only_bad = _write_jsonl(tmp_path / "bad.jsonl", [BAD_LINES[0][0]])
    with pytest.raises(ValueError, match="no usable"):
        load_instructions(only_bad, on_error="skip")


# --------------------------------------------------------------------------- SFT mask

MULTI = [
    {"role": "system", "content": "你是 model"},
    {"role": "user", "content": "你好 hello world"},
    {"role": "assistant", "content": "今天天气 真 好"},
    {"role": "user", "content": "the quick brown fox"},
    {"role": "assistant", "content": "jumps over the lazy dog"},
]
# What each preset writes after a reply (its end marker).
END = {"chatml": "<|im_end|>\n", "linly": "\n", "chinese-alpaca": "\n\n"}


def _runs(ex) -> list[list[int]]:
    """Contiguous runs of labelled positions, as token ids (asserting labels == input_ids there)."""
    runs, cur = [], []
    for i, lab in zip(ex["input_ids"].tolist(), ex["labels"].tolist()):
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == i
            cur.append(i)
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("preset", ["chatml", "linly", "chinese-alpaca"])
@pytest.mark.parametrize("kind", ["sp", "bpe"])
def test_sft_labels_cover_replies_only(preset, kind, sp_tok, bpe_tok):
    tok = sp_tok if kind == "sp" else bpe_tok
    ex = build_sft_example(tok, MULTI, max_len=1024, preset=preset)
    ids, labels = ex["input_ids"].tolist(), ex["labels"].tolist()
    assert ex["input_ids"].dtype == np.int64 and ex["labels"].dtype == np.int64
    assert len(ids) == len(labels)
    replies = [m["content"] for m in MULTI if m["role"] == "assistant"]
    turns = [k for k, m in enumerate(MULTI) if m["role"] == "assistant"]
    runs = _runs(ex)
    assert len(runs) == len(replies)
    eos = tok.eos_ids[0]
    # EOS is appended to the last reply unless the end marker already is EOS (bpe: <|im_end|>)
    eos_added = not (preset == "chatml" and tok.eos_token == "<|im_end|>")
    for n, (run, reply, k) in enumerate(zip(runs, replies, turns)):
        # every labelled token is reply text (plus the end marker, and EOS after the last reply)
        if n == len(replies) - 1 and eos_added:
            assert run[-1] == eos
            run = run[:-1]
        assert tok.decode(run, skip_special_tokens=False) == reply + END[preset]
        # the masked tokens before this reply are exactly the runtime's prompt for this turn,
        # and the reply's labels start right after it
        prompt = chat_prompt_ids(tok, MULTI[:k], template=None, preset=preset)
        assert ids[: len(prompt)] == prompt
        assert labels[len(prompt) - 1] == IGNORE_INDEX and labels[len(prompt)] != IGNORE_INDEX
    # no user or system text, and no template scaffolding, carries a label
    masked = tok.decode([i for i, x in zip(ids, labels) if x == IGNORE_INDEX], skip_special_tokens=False)
    labelled = tok.decode([i for i, x in zip(ids, labels) if x != IGNORE_INDEX], skip_special_tokens=False)
    for m in MULTI:
        if m["role"] != "assistant":
            assert m["content"] in masked and m["content"] not in labelled
    # the whole example is the runtime's rendering of the full conversation (+ EOS)
    text = render_chat(MULTI, preset=preset, add_generation_prompt=False)
    assert ids == tok.encode(text) + ([eos] if eos_added else [])


def test_sft_prompt_positions_all_masked(sp_tok):
    """Position by position: a token is labelled iff it lies in an assistant reply span."""
    tok = sp_tok
    ex = build_sft_example(tok, MULTI, max_len=1024, preset="linly")
    labels = ex["labels"].tolist()
    p1 = chat_prompt_ids(tok, MULTI[:2], None, "linly")   # system + first question
    p2 = chat_prompt_ids(tok, MULTI[:4], None, "linly")   # ... + first reply + second question
    after1 = chat_prompt_ids(tok, MULTI[:3] + [{"role": "user", "content": "x"}], None, "linly")
    reply1_end = len(tok.encode("你是 model\nUser:你好 hello world\n今天天气 真 好\n"))
    assert after1[:reply1_end] == ex["input_ids"].tolist()[:reply1_end]
    want = ([False] * len(p1) + [True] * (reply1_end - len(p1)) + [False] * (len(p2) - reply1_end)
            + [True] * (len(labels) - len(p2)))
    assert [x != IGNORE_INDEX for x in labels] == want


def test_sft_firefly_and_template(sp_tok, bpe_tok):
    conv = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "再见 朋友"}]
    # Firefly v1: prompted as <s>q</s></s>, trained on <s>q</s></s>a</s> (its EOS is the end marker)
    ex = build_sft_example(sp_tok, conv, max_len=64, preset="firefly")
    ids = ex["input_ids"].tolist()
    prompt = chat_prompt_ids(sp_tok, conv[:1], None, "firefly")
    assert prompt[0] == sp_tok.bos_id and prompt[1] != sp_tok.bos_id  # BOS once
    assert ids[: len(prompt)] == prompt and ids[-1] == sp_tok.eos_ids[0] and ids.count(2) == 3
    assert (ex["labels"][: len(prompt)] == IGNORE_INDEX).all()
    assert sp_tok.decode(ids[len(prompt):]) == "再见 朋友"
    # the checkpoint's own Jinja template (bpe fixture: ChatML, EOS is <|im_end|>)
    ex = build_sft_example(bpe_tok, conv, max_len=64, template=bpe_tok.chat_template)
    runs = _runs(ex)
    assert len(runs) == 1 and bpe_tok.decode(runs[0], skip_special_tokens=False) == "再见 朋友<|im_end|>\n"


def test_sft_truncation_and_errors(sp_tok):
    conv = MULTI[1:3]
    full = build_sft_example(sp_tok, conv, max_len=1024, preset="linly")
    n_prompt = len(chat_prompt_ids(sp_tok, conv[:1], None, "linly"))
    cut = build_sft_example(sp_tok, conv, max_len=n_prompt + 2, preset="linly")
    assert cut["input_ids"].tolist() == full["input_ids"].tolist()[: n_prompt + 2]
    assert cut["labels"].tolist() == full["labels"].tolist()[: n_prompt + 2]
    with pytest.raises(ValueError, match="nothing to train on"):
        build_sft_example(sp_tok, conv, max_len=n_prompt, preset="linly")
    with pytest.raises(ValueError, match="no assistant reply"):
        build_sft_example(sp_tok, conv[:1], max_len=64, preset="linly")


def test_collate_pads():
    torch = pytest.importorskip("torch")
    a = {"input_ids": np.array([5, 6, 7]), "labels": np.array([-100, 6, 7])}
    b = {"input_ids": np.array([8]), "labels": np.array([8])}
    out = collate([a, b], pad_id=0)
    assert out["input_ids"].dtype == torch.long
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# --------------------------------------------------------------------------- poet corpus

needs_fortunes = pytest.mark.skipif(not (FORTUNES / "tang300").is_file() or not (FORTUNES / "fortunes").is_file(),
                                    reason="Debian's fortunes-zh / fortunes are not installed")


@pytest.fixture(scope="module")
def corpus():
    return poet_corpus(FORTUNES)


@needs_fortunes
def test_poet_corpus(corpus):
    files = corpus["files"]
    assert 300 <= files["tang300"] <= 330 and 90 <= files["song100"] <= 100
    assert 5000 <= files["chinese"] <= 5500
    assert len(corpus["zh"]) == files["tang300"] + files["song100"] + files["chinese"]
    assert 10_000 <= len(corpus["en"]) <= 20_000 and "fortunes" in files
    assert not any(name.endswith((".dat", ".u8")) for name in files)
    for doc in corpus["zh"] + corpus["en"]:
        assert doc and doc == doc.strip() and "\x1b" not in doc and "[m" not in doc[:2]
    assert corpus["zh"][0].startswith("《") and "作者" in corpus["zh"][0]


@needs_fortunes
def test_poet_instructions(corpus):
    tang_song = corpus["zh"][: corpus["files"]["tang300"] + corpus["files"]["song100"]]
    ins = poet_instructions(corpus["zh"], random.Random(0))
    assert 800 <= len(ins) <= 2000 and 50 <= len(ins.held_out) <= 300
    bodies = {"\n".join(e.split("\n")[2:]).strip() for e in tang_song}
    prompts = [c[0]["content"] for c in ins]
    for conv in list(ins) + ins.held_out:
        assert [m["role"] for m in conv] == ["user", "assistant"]
        assert conv[1]["content"] in bodies  # the reply is a real poem of the corpus
    # held-out poems are not trained on
    assert not {c[1]["content"] for c in ins} & {c[1]["content"] for c in ins.held_out}
    # the form prompts match the poem's verses
    for conv in ins:
        q, poem = conv[0]["content"], conv[1]["content"]
        if "绝句" in q or "律诗" in q:
            verses = [v for v in re.split(r"[^\u4e00-\u9fff]+", poem) if v]  # runs of Han characters
            size = 5 if "五言" in q else 7
            assert all(len(v) == size for v in verses), (q, poem)
            assert len(verses) == (4 if "绝句" in q else 8), (q, poem)
    assert any("五言绝句" in p for p in prompts) and any("七言律诗" in p for p in prompts)
    assert any("关于月亮" in p for p in prompts) and any(p.startswith("以《") for p in prompts)
    # deterministic for a seed
    again = poet_instructions(corpus["zh"], random.Random(0))
    assert list(again) == list(ins)
