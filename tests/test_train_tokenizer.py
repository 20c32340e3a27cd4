"""train/tokenizer.py: train, extend, resize, prune (sentencepiece + tiny checkpoints, CPU, seconds)."""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sentencepiece")
import sentencepiece as spm  # noqa: E402

from runtime.safetensors_io import open_safetensors, save_safetensors  # noqa: E402
from runtime.tokenizer import Tokenizer  # noqa: E402
from tiny_model import make_tiny_llama  # noqa: E402
from train.tokenizer import (  # noqa: E402
    BYTE, EMBED, LM_HEAD, extend_tokenizer, prune_checkpoint, prune_tokenizer, read_pieces,
    resize_checkpoint, train_tokenizer)

FORTUNES = Path("/usr/share/games/fortunes")
EN_WORDS = ("the quick brown fox jumps over a lazy dog while people learn language models "
            "tokens stream into the runtime and every kernel caches keys values for batches "
            "of prompts that users send to servers at night or in the morning 2024 1999 365 42").split()
ZH_WORDS = ("中国 北京 上海 今天 天气 很好 我们 学习 语言 模型 朋友 你好 谢谢 再见 世界 时间 问题 "
            "工作 生活 东西 山水 明月 春风 秋天 故乡 诗人 长江 黄河 白云 青山 花开 人间").split()
MIXED = "Hello  world,   the fox 你好！今天天气很好。😀 price 12345 \t tabs\nnew line ，。"


def _lines(words: list[str], n: int, seed: int, sep: str) -> str:
    rng = random.Random(seed)
    return "\n".join(sep.join(rng.choice(words) for _ in range(rng.randint(4, 12)))
                     + rng.choice(["", ".", "!", "，", "。"]) for _ in range(n)) + "\n"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train_tok")


@pytest.fixture(scope="module")
def corpora(root) -> dict[str, Path]:
    out = {"en": root / "en.txt", "zh": root / "zh.txt", "zh_test": root / "zh_test.txt"}
    out["en"].write_text(_lines(EN_WORDS, 600, 0, " "), encoding="utf-8")
    out["zh"].write_text(_lines(ZH_WORDS, 600, 1, ""), encoding="utf-8")
    out["zh_test"].write_text(_lines(ZH_WORDS, 50, 2, "") + _lines(EN_WORDS, 20, 3, " "), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def base(root, corpora) -> Path:  # English only: Chinese falls back to byte pieces
    return train_tokenizer([corpora["en"]], root / "base", vocab_size=400)


@pytest.fixture(scope="module")
def extra(root, corpora) -> Path:
    return train_tokenizer([corpora["zh"]], root / "extra", vocab_size=400, character_coverage=1.0)


@pytest.fixture(scope="module")
def extended(root, base, extra) -> Path:
    return extend_tokenizer(base, extra, root / "extended")


def _sp(d: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_train_layout_and_lossless_round_trip(root, corpora, model_type):
    d = train_tokenizer([corpora["en"], corpora["zh"]], root / f"mixed_{model_type}", 800,
                        model_type=model_type, user_symbols=["<|im_start|>"])
    sp = _sp(d)
    assert sp.get_piece_size() == 800
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sum(sp.is_byte(i) for i in range(800)) == 256
    assert sp.piece_to_id("<|im_start|>") != sp.unk_id()
    # identity normalisation: full-width punctuation, runs of spaces, tabs, emoji survive
    assert sp.decode(sp.encode(MIXED)) == MIXED
    assert not [p.piece for p in read_pieces(d) if p.type == 1 and sum(c.isdigit() for c in p.piece) > 1]
    assert any(p.piece.isdigit() for p in read_pieces(d))  # split_digits: single digits only
    tok = Tokenizer.from_dir(d)
    assert tok.vocab_size == 800 and tok.bos_id == 1 and tok.eos_ids[0] == 2 and tok.pad_id is None
    assert tok.encode(MIXED) == [1] + sp.encode(MIXED)
    assert tok.decode(tok.encode(MIXED)) == MIXED
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<s>" and cfg["eos_token"] == "</s>" and cfg["unk_token"] == "<unk>"
    assert json.loads((d / "special_tokens_map.json").read_text())["eos_token"] == "</s>"


def test_corpus_too_small_for_vocab_is_a_clear_error(root, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("the quick brown fox\njumps over the lazy dog\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"too small for vocab_size=8000.*vocab_size <= \d+") as e:
        train_tokenizer([small], tmp_path / "out", vocab_size=8000)
    assert str(small) in str(e.value)
    with pytest.raises(ValueError, match=r"vocab_size=100 is too small.*Raise vocab_size"):
        train_tokenizer([small], tmp_path / "out", vocab_size=100)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="corpus is empty"):
        train_tokenizer([empty], tmp_path / "out", vocab_size=300)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_tokenizer([tmp_path / "missing.txt"], tmp_path / "out", vocab_size=300)
    assert not (tmp_path / "out" / "tokenizer.model").exists()


# --------------------------------------------------------------- extension


def test_extension_keeps_every_id_and_shortens_chinese(base, extra, extended, corpora):
    old, new, add = read_pieces(base), read_pieces(extended), read_pieces(extra)
    assert new[: len(old)] == old  # same piece, score and type at every old id
    appended = {p.piece for p in new[len(old):]}
    assert appended == {p.piece for p in add if p.type == 1} - {p.piece for p in old}
    assert len(appended) > 100
    sb, se = _sp(base), _sp(extended)
    en = corpora["en"].read_text(encoding="utf-8")
    for line in en.splitlines()[:200]:
        assert se.encode(line) == sb.encode(line), line
    zh = corpora["zh_test"].read_text(encoding="utf-8")
    n_base, n_ext = len(sb.encode(zh)), len(se.encode(zh))
    assert n_ext < n_base / 3, (n_base, n_ext)  # bytes (3 a character) -> words
    assert se.decode(se.encode(zh)) == zh
    assert se.decode(se.encode(MIXED)) == MIXED

    tok = Tokenizer.from_dir(extended)
    assert tok.vocab_size == len(new)
    assert tok.encode(zh) == [1] + se.encode(zh)
    assert tok.decode(tok.encode(zh)) == zh


def test_extended_tokenizer_loads_in_transformers(extended, corpora):
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import AutoTokenizer

    tok = Tokenizer.from_dir(extended)
    hf = AutoTokenizer.from_pretrained(str(extended))
    assert len(hf) == tok.vocab_size
    raw = tokenizers.Tokenizer.from_file(str(extended / "tokenizer.json"))
    texts = corpora["zh_test"].read_text(encoding="utf-8").splitlines()[:60] + [MIXED, " lead", "x"]
    for t in texts:
        assert raw.encode(t).ids == tok.encode(t), t  # tokenizer.json == tokenizer.model
        # transformers' LlamaTokenizer adds no dummy prefix before a leading space
        # (as for Meta's LLaMA); otherwise the same ids
        if not t.startswith(" "):
            assert hf.encode(t) == tok.encode(t), t
            assert hf.decode(hf.encode(t), skip_special_tokens=True) == t
        assert raw.decode(raw.encode(t).ids) == t


def test_extend_rejects_a_non_model(tmp_path, base):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\xff\xff\xff")
    with pytest.raises(ValueError, match="tokenizer.model"):
        extend_tokenizer(base, bad, tmp_path / "out")


# --------------------------------------------------------------- checkpoints


def _tiny_ckpt(out: Path, tok_dir: Path, cache: Path, layout: str) -> Path:
    """A 2-layer LLaMA with tok_dir's tokenizer: 'single', 'sharded' (bf16, 2 shards) or 'tied'."""
    n = len(read_pieces(tok_dir))
    make_tiny_llama(out, None, cache, vocab=n, seed=1, weight_std=0.1)
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tok_dir / f, out / f)
    cfg = json.loads((out / "config.json").read_text())
    with open_safetensors(out / "model.safetensors") as f:
        tensors = {k: np.array(f.get(k)) for k in f.keys()}
    if layout == "tied":
        del tensors[LM_HEAD]
        cfg["tie_word_embeddings"] = True
        save_safetensors(out / "model.safetensors", tensors)
    elif layout == "sharded":
        (out / "model.safetensors").unlink()
        names = sorted(tensors)
        wmap = {}
        for i, part in enumerate([[k for k in names if k != LM_HEAD], [LM_HEAD]]):
            shard = f"model-0000{i + 1}-of-00002.safetensors"
            save_safetensors(out / shard, {k: tensors[k] for k in part}, bf16=True)
            wmap.update({k: shard for k in part})
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _weights(d: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with open_safetensors(f) as st:
            out.update({k: np.array(st.get(k)) for k in st.keys()})
    return out


@pytest.mark.parametrize("layout,init", [("single", "mean"), ("sharded", "subword"), ("tied", "subword")])
def test_resize_checkpoint(root, base, extended, corpora, layout, init):
    from runtime import LLM

    ckpt = _tiny_ckpt(root / f"ckpt_{layout}", base, root, layout)
    out = resize_checkpoint(ckpt, extended, root / f"resized_{layout}", init=init)
    n_old, n_new = len(read_pieces(base)), len(read_pieces(extended))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == n_new
    assert (out / "tokenizer.model").read_bytes() == (extended / "tokenizer.model").read_bytes()
    before, after = _weights(ckpt), _weights(out)
    assert set(before) == set(after)
    heads = [EMBED] + ([] if layout == "tied" else [LM_HEAD])
    for name in heads:
        old, new = before[name], after[name]
        assert new.shape == (n_new, old.shape[1])
        assert new[:n_old].tobytes() == old.tobytes()  # bit-identical old rows
        if init == "mean":
            np.testing.assert_allclose(new[n_old:], np.broadcast_to(old.mean(0), new[n_old:].shape),
                                       rtol=1e-5, atol=1e-6)
        else:  # '中国' (appended) starts from the mean of the rows of its byte pieces
            sb = _sp(base)
            i = _sp(extended).piece_to_id("中国")
            parts = [sb.piece_to_id(f"<0x{b:02X}>") for b in "中国".encode()]
            want = old[parts].astype(np.float64).mean(0)
            tol = 1e-2 if layout == "sharded" else 1e-6  # bf16 storage
            np.testing.assert_allclose(new[i], want, rtol=tol, atol=tol)
            assert not np.allclose(new[i], old.mean(0), atol=1e-4)
    for name in set(before) - set(heads):
        assert before[name].tobytes() == after[name].tobytes(), name

    llm_old, llm_new = LLM(ckpt, progress=False), LLM(out, progress=False)
    text = corpora["en"].read_text(encoding="utf-8").splitlines()[0]
    ids = llm_old.tokenizer.encode(text)
    assert llm_new.tokenizer.encode(text) == ids
    lo, ln = llm_old.logits(ids), llm_new.logits(ids)
    assert ln.shape == (len(ids), n_new)
    np.testing.assert_allclose(ln[:, :n_old], lo, rtol=1e-5, atol=1e-5)
    zh = "今天天气很好"
    assert len(llm_new.tokenizer.encode(zh)) < len(llm_old.tokenizer.encode(zh))
    assert llm_new.logits(llm_new.tokenizer.encode(zh)).shape[1] == n_new


def test_resize_rejects_a_tokenizer_that_moves_ids(root, base, extra):
    ckpt = _tiny_ckpt(root / "ckpt_reject", base, root, "single")
    with pytest.raises(ValueError, match="not an extension"):
        resize_checkpoint(ckpt, extra, root / "reject_out")
    with pytest.raises(ValueError, match="init must be"):
        resize_checkpoint(ckpt, base, root / "reject_out", init="zeros")


# ------------------------------------------------------------------ pruning


def test_prune_round_trips_corpus_and_slices_checkpoint(root, extended, corpora):
    from runtime import LLM

    corpus = root / "prune_corpus.txt"
    zh_lines = corpora["zh_test"].read_text(encoding="utf-8").splitlines()
    corpus.write_text("\n".join(zh_lines[:40]) + "\n" + MIXED + "\n", encoding="utf-8")
    pruned, old_ids = prune_tokenizer(extended, [corpus], root / "pruned")
    full, small = read_pieces(extended), read_pieces(pruned)
    assert len(small) == len(old_ids) < len(full) - 100
    assert old_ids == sorted(set(old_ids))
    assert [p.piece for p in small] == [full[i].piece for i in old_ids]
    assert old_ids[:259] == list(range(259))  # specials and bytes keep their ids
    assert sum(p.type == BYTE for p in small) == 256
    assert json.loads((pruned / "pruned_ids.json").read_text())["old_ids"] == old_ids

    text = corpus.read_text(encoding="utf-8")
    tok_full, tok = Tokenizer.from_dir(extended), Tokenizer.from_dir(pruned)
    ids_full, ids = tok_full.encode(text), tok.encode(text)
    assert tok.decode(ids) == text  # lossless
    assert [old_ids[i] for i in ids] == ids_full  # same pieces as before pruning
    for line in text.splitlines():
        assert tok.decode(tok.encode(line)) == line
    # text outside the corpus still round-trips (byte fallback) though in more tokens
    other = "山水之间 a zebra"
    assert tok.decode(tok.encode(other)) == other

    ckpt = _tiny_ckpt(root / "ckpt_prune", extended, root, "single")
    out = prune_checkpoint(ckpt, pruned, None, root / "pruned_ckpt")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(old_ids)
    before, after = _weights(ckpt), _weights(out)
    for name in (EMBED, LM_HEAD):
        assert after[name].tobytes() == before[name][old_ids].tobytes()
    sample = zh_lines[0] + MIXED  # fits the 128-token context
    ids, ids_full = tok.encode(sample), tok_full.encode(sample)
    assert [old_ids[i] for i in ids] == ids_full
    ln = LLM(out, progress=False).logits(ids)
    lo = LLM(ckpt, progress=False).logits(ids_full)
    assert ln.shape == (len(ids), len(old_ids))
    np.testing.assert_allclose(ln, lo[:, old_ids], rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="old ids"):
        prune_checkpoint(ckpt, pruned, old_ids[:-1], root / "bad_prune")


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_prune_keeps_encoding_of_a_plain_model(root, corpora, model_type):
    d = train_tokenizer([corpora["en"], corpora["zh"]], root / f"p_{model_type}", 900, model_type=model_type)
    text = corpora["zh_test"].read_text(encoding="utf-8")
    pruned, old_ids = prune_tokenizer(d, [corpora["zh_test"]], root / f"p_{model_type}_out")
    assert len(old_ids) < 900
    sp_full, sp = _sp(d), _sp(pruned)
    for line in text.splitlines():
        assert [old_ids[i] for i in sp.encode(line)] == sp_full.encode(line)
        assert sp.decode(sp.encode(line)) == line


# ----------------------------------------------------- real text (fortunes)


def _fortunes(names: list[str], out: Path) -> Path:
    parts = []
    for name in names:
        text = (FORTUNES / name).read_text(encoding="utf-8", errors="replace")
        text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # fortunes-zh colours its entries
        parts.append("\n".join(ln for ln in text.splitlines() if ln.strip() != "%"))
    out.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return out


@pytest.mark.skipif(not (FORTUNES / "tang300").is_file() or not (FORTUNES / "fortunes").is_file(),
                    reason="fortunes and fortunes-zh are not installed")
def test_fortunes_extend_and_prune(root):
    en = _fortunes(["fortunes", "literature", "science"], root / "f_en.txt")
    zh = _fortunes(["tang300"], root / "f_zh.txt")
    held_out = _fortunes(["song100"], root / "f_song.txt")
    base = train_tokenizer([en], root / "f_base", 2000)
    extra = train_tokenizer([zh], root / "f_extra", 4000, model_type="unigram")
    ext = extend_tokenizer(base, extra, root / "f_ext")
    sb, se = _sp(base), _sp(ext)
    assert read_pieces(ext)[:2000] == read_pieces(base)
    song = held_out.read_text(encoding="utf-8")
    assert len(se.encode(song)) < 0.5 * len(sb.encode(song))
    assert se.decode(se.encode(song)) == song
    pruned, old_ids = prune_tokenizer(ext, [held_out], root / "f_pruned")
    sp = _sp(pruned)
    assert len(old_ids) < se.get_piece_size()
    assert sp.decode(sp.encode(song)) == song
    assert [old_ids[i] for i in sp.encode(song)] == se.encode(song)
