"""Helpers that build small tokenizers for tests, with no download.

- ``build_sentencepiece_dir(path)``: trains a tiny sentencepiece BPE model
  (byte fallback on, character coverage below 1 so that rare Chinese
  characters are left out of the vocabulary and come back as <0xXX> byte
  pieces), LLaMA-style: add_dummy_prefix on, extra whitespace kept.
- ``build_bytelevel_bpe_dir(path)``: trains a tiny byte-level BPE
  ``tokenizer.json`` with the ``tokenizers`` library (ChatML special tokens)
  plus a ``tokenizer_config.json`` that carries a ChatML chat template.
- ``build_llama_tokenizer_json_dir(path, sp_dir)``: converts the sentencepiece
  model into a LLaMA-style ``tokenizer.json`` (byte-fallback BPE, decoder
  Replace/ByteFallback/Fuse/Strip), as transformers' converter does.

Session-scoped pytest fixtures (import them into a test module):
``sp_dir``/``sp_tok``, ``bpe_dir``/``bpe_tok``, ``llama_json_dir``/``llama_json_tok``.

Both are deterministic for a given seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

# Frequent characters: these end up in the vocabulary.
COMMON_ZH = (
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会"
    "自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开"
    "手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意进"
    "把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新"
    "世界北京上海狐狸敏捷跳过懒狗今天气真问题模型语言中文你好谢谢再见朋友学习"
)
# Rare characters: each appears once or twice, so character_coverage < 1
# drops them and the trained model encodes them as three byte pieces.
RARE_ZH = "龘麤鬱爨齉饕餮魑魅魍魉蠡夔囍嫑"

EN_WORDS = (
    "the quick brown fox jumps over lazy dog hello world model language "
    "token stream decode encode chinese english mixed text runtime kernel "
    "cache batch sample apple banana river mountain learning inference"
).split()

EMOJI = "🌍😀🚀🎉"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_corpus(n_lines: int = 3000, seed: int = 0) -> list[str]:
    """Mixed Chinese / English lines; rare characters appear only a few times."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        parts = []
        for _ in range(rng.randint(3, 10)):
            r = rng.random()
            if r < 0.5:
                parts.append("".join(rng.choice(COMMON_ZH) for _ in range(rng.randint(1, 6))))
            elif r < 0.9:
                parts.append(rng.choice(EN_WORDS))
            elif r < 0.97:
                parts.append(rng.choice("，。！？,.!?"))
            else:
                parts.append(str(rng.randint(0, 999)))
        lines.append(" ".join(parts))
    for i, ch in enumerate(RARE_ZH):  # once each: below the coverage cut
        lines[i * 7 % n_lines] += " " + ch
    lines[5] += " " + EMOJI[0]
    return lines


def build_sentencepiece_dir(path: Path, vocab_size: int = 800, seed: int = 0) -> Path:
    """Train a small LLaMA-like sentencepiece BPE model into ``path/tokenizer.model``."""
    import sentencepiece as spm

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    corpus = path / "corpus.txt"
    corpus.write_text("\n".join(make_corpus(seed=seed)) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(path / "tokenizer"),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=0.995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (path / "tokenizer.vocab").unlink(missing_ok=True)
    corpus.unlink()
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": True,
                "add_eos_token": False,
                "bos_token": {"__type": "AddedToken", "content": "<s>", "special": True},
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "tokenizer_class": "LlamaTokenizer",
            }
        ),
        encoding="utf-8",
    )
    return path


def build_bytelevel_bpe_dir(path: Path, vocab_size: int = 600, seed: int = 0) -> Path:
    """Train a small byte-level BPE ``tokenizer.json`` (SmolLM2-like, ChatML tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(make_corpus(seed=seed), trainer=trainer)
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_prefix_space": False,
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "pad_token": "<|im_end|>",
                "unk_token": "<|endoftext|>",
                "chat_template": CHATML_TEMPLATE,
                "added_tokens_decoder": {
                    str(i): {"content": s, "special": True} for i, s in enumerate(specials)
                },
                "tokenizer_class": "GPT2Tokenizer",
            }
        ),
        encoding="utf-8",
    )
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}), encoding="utf-8"
    )
    return path


def build_llama_tokenizer_json_dir(path: Path, sp_dir: Path) -> Path:
    """A LLaMA-style tokenizer.json made from ``sp_dir/tokenizer.model``."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sp = spm.SentencePieceProcessor(model_file=str(Path(sp_dir) / "tokenizer.model"))
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    merges = []
    for piece, pid in vocab.items():
        if sp.is_control(pid) or sp.is_unknown(pid) or sp.is_byte(pid):
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((pid, vocab[left], vocab[right], left, right))
    merges.sort()
    tk = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[(m[3], m[4]) for m in merges],
            unk_token="<unk>",
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tk.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}), encoding="utf-8"
    )
    return path


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory) -> Path:
    return build_sentencepiece_dir(tmp_path_factory.mktemp("sp_tok"))


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory) -> Path:
    return build_bytelevel_bpe_dir(tmp_path_factory.mktemp("bpe_tok"))


@pytest.fixture(scope="session")
def llama_json_dir(tmp_path_factory, sp_dir) -> Path:
    return build_llama_tokenizer_json_dir(tmp_path_factory.mktemp("llama_json_tok"), sp_dir)


@pytest.fixture(scope="session")
def sp_tok(sp_dir):
    from runtime.tokenizer import Tokenizer

    return Tokenizer.from_dir(sp_dir)


@pytest.fixture(scope="session")
def bpe_tok(bpe_dir):
    from runtime.tokenizer import Tokenizer

    return Tokenizer.from_dir(bpe_dir)


@pytest.fixture(scope="session")
def llama_json_tok(llama_json_dir):
    from runtime.tokenizer import Tokenizer

    return Tokenizer.from_dir(llama_json_dir)
