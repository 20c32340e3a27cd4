"""Training data: text corpora, packed pretraining sequences, instruction JSONL.

Pretraining: documents (``read_text``, ``read_fortunes``) are tokenized by the
caller, joined with EOS into one stream and cut into fixed-length examples
(``PackedDataset``).

Instruction tuning: ``load_instructions`` reads Alpaca, Firefly and
conversation JSONL into ``[{"role", "content"}, ...]`` lists, and
``build_sft_example`` renders one with the runtime's own chat template
(``runtime.chat_template``) and tokenizes it the way ``runtime.chat`` does, so
the model is trained on exactly the token prefixes it is prompted with at chat
time.  Only reply tokens (with the template's end marker, and EOS) carry a
label; everything else is -100.

The "poet" model's corpus: ``poet_corpus`` (Debian's fortunes-zh and
fortunes) and ``poet_instructions`` (poem-writing prompts derived from the
Tang and Song poems).
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.chat_template import render_chat, validate_messages
from runtime.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch

__all__ = [
    "IGNORE_INDEX",
    "ConversationList",
    "PackedDataset",
    "build_sft_example",
    "collate",
    "load_instructions",
    "poet_corpus",
    "poet_instructions",
    "read_fortunes",
    "read_text",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label torch's cross-entropy (and transformers) ignore


# --------------------------------------------------------------------------
# text corpora


def _decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: invalid UTF-8 at byte offset {e.start} ({e.reason})") from None


# CSI sequences (colours like \x1b[1;33m, \x1b[m), then any other lone escape.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]?")
_FORTUNE_SEP = re.compile(r"^%[ \t\r]*$", re.MULTILINE)


def read_fortunes(path: Path) -> list[str]:
    """Entries of a fortune(6) file: ANSI colour codes stripped, whitespace trimmed, empties dropped."""
    path = Path(path)
    text = _decode_utf8(path.read_bytes(), str(path)).replace("\r\n", "\n")
    text = _ANSI.sub("", text)
    entries = []
    for raw in _FORTUNE_SEP.split(text):
        entry = "\n".join(line.rstrip() for line in raw.split("\n")).strip()
        if entry:
            entries.append(entry)
    return entries


def read_text(paths: Path | str | Iterable[Path | str], paragraphs: bool = False) -> list[str]:
    """Documents from plain UTF-8 text files: one per file, or one per blank-line paragraph.

    Invalid UTF-8 is an error naming the file and byte offset (no silent replacement
    characters in the training data).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    docs: list[str] = []
    for p in paths:
        p = Path(p)
        text = _decode_utf8(p.read_bytes(), str(p)).removeprefix("\ufeff").replace("\r\n", "\n")
        parts = re.split(r"\n[ \t]*\n", text) if paragraphs else [text]
        docs.extend(d.strip() for d in parts if d.strip())
    return docs


# --------------------------------------------------------------------------
# packed pretraining sequences


class PackedDataset:
    """Documents joined into one token stream (each followed by EOS), cut into ``seq_len`` examples.

    The tail that does not fill a whole example is dropped.  ``labels`` equal
    ``input_ids``: the model shifts them itself, as transformers' causal LMs do.
    """

    def __init__(self, docs_token_ids: list[list[int]], seq_len: int, eos_id: int) -> None:
        if int(seq_len) < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        self.seq_len = int(seq_len)
        stream: list[int] = []
        for doc in docs_token_ids:
            stream.extend(doc)
            stream.append(eos_id)  # marks the document boundary, and teaches the model to stop
        self.stream = np.asarray(stream, dtype=np.int64)
        self.n_examples = len(self.stream) // self.seq_len
        if self.n_examples == 0:
            raise ValueError(
                f"the corpus is {len(self.stream)} tokens ({len(docs_token_ids)} documents with EOS), "
                f"shorter than one example of seq_len={self.seq_len}: add text or lower seq_len"
            )

    def __len__(self) -> int:
        return self.n_examples

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -self.n_examples <= i < self.n_examples:
            raise IndexError(f"example {i} out of range for {self.n_examples} examples")
        i %= self.n_examples
        ids = self.stream[i * self.seq_len : (i + 1) * self.seq_len].copy()
        return {"input_ids": ids, "labels": ids.copy()}


# --------------------------------------------------------------------------
# instruction JSONL


class ConversationList(list):
    """A list of conversations with bookkeeping: ``skipped`` lines (with ``errors``),
    and for derived data the ``held_out`` conversations kept out of training."""

    def __init__(self, items: Iterable = ()) -> None:
        super().__init__(items)
        self.skipped = 0
        self.errors: list[str] = []
        self.held_out: list[list[dict]] = []


def _text(record: dict, key: str, optional: bool = False) -> str | None:
    value = record.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        what = "missing" if key not in record else f"must be a string, got {type(value).__name__}"
        raise ValueError(f"field {key!r} {what}")
    return value


def _parse_record(record: Any) -> list[dict]:
    """One JSONL record -> [{"role", "content"}, ...]; ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list):
            raise ValueError(f"field 'messages' must be a list, got {type(msgs).__name__}")
        msgs = [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m
                for m in msgs]
        msgs = validate_messages(msgs)
    elif "conversation" in record:  # Firefly multi-turn
        turns = record["conversation"]
        if not isinstance(turns, list) or not turns:
            raise ValueError("field 'conversation' must be a non-empty list of {human, assistant} objects")
        system = _text(record, "system", optional=True)
        msgs = [{"role": "system", "content": system}] if system else []
        for j, t in enumerate(turns):
            if not isinstance(t, dict):
                raise ValueError(f"conversation[{j}] must be an object, got {type(t).__name__}")
            try:
                msgs.append({"role": "user", "content": _text(t, "human")})
                msgs.append({"role": "assistant", "content": _text(t, "assistant")})
            except ValueError as e:
                raise ValueError(f"conversation[{j}]: {e}") from None
    elif "instruction" in record:  # Alpaca
        prompt = _text(record, "instruction")
        extra = _text(record, "input", optional=True)
        if extra and extra.strip():
            prompt = f"{prompt}\n{extra}"
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record, "output")}]
        system = _text(record, "system", optional=True)
        if system:
            msgs.insert(0, {"role": "system", "content": system})
    elif "target" in record or "input" in record:  # Firefly single turn; "kind" is only a category
        msgs = [{"role": "user", "content": _text(record, "input")},
                {"role": "assistant", "content": _text(record, "target")}]
    else:
        raise ValueError(
            "unrecognised record: expected 'instruction'/'output' (Alpaca), 'input'/'target' "
            f"(Firefly), 'conversation' or 'messages'; got keys {sorted(record)}"
        )
    body = [m for m in msgs if m["role"] != "system"]
    if not body or body[0]["role"] != "user":
        raise ValueError("the conversation must start with a user message")
    if not any(m["role"] == "assistant" for m in body):
        raise ValueError("no assistant reply to train on")
    for m in body:
        if not m["content"].strip():
            raise ValueError(f"empty {m['role']} message")
    # The runtime keeps replies stripped in the chat history; train on the same text.
    return [dict(m, content=m["content"].strip()) if m["role"] == "assistant" else m for m in msgs]


def load_instructions(path: Path, on_error: str = "raise") -> ConversationList:
    """Conversations ([{"role", "content"}, ...]) from an instruction JSONL file.

    Each line is Alpaca ({"instruction", "input"?, "output"}), Firefly
    ({"kind"?, "input", "target"}), Firefly multi-turn ({"conversation":
    [{"human", "assistant"}, ...]}) or {"messages": [{"role", "content"}, ...]}.
    Blank lines are ignored.  A malformed line (bad JSON or UTF-8, missing
    field, wrong type) raises ValueError naming ``file:line`` with
    ``on_error="raise"``; with ``on_error="skip"`` it is logged as a warning
    naming ``file:line`` and counted in the result's ``skipped``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    out = ConversationList()
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"invalid UTF-8 at byte {e.start} of the line") from None
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"bad JSON: {e.msg} (column {e.colno})") from None
            out.append(_parse_record(record))
        except ValueError as e:
            if on_error == "raise":
                raise ValueError(f"{where}: {e}") from None
            out.skipped += 1
            out.errors.append(f"{where}: {e}")
            log.warning("%s: %s; line skipped", where, e)
    if not out:
        raise ValueError(f"{path}: no usable instruction records ({out.skipped} malformed lines skipped)")
    return out


# --------------------------------------------------------------------------
# SFT examples


def _render_ids(tokenizer: Tokenizer, messages: list[dict], template: str | None, preset: str | None,
                add_generation_prompt: bool) -> tuple[str, bool | None]:
    """The rendered text and the add_bos flag, as runtime.chat.chat_prompt_ids chooses them."""
    text = render_chat(messages, template=template, preset=preset,
                       add_generation_prompt=add_generation_prompt,
                       bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "")
    # A template that writes the BOS itself must not get a second one.
    add_bos = False if tokenizer.bos_token and text.startswith(tokenizer.bos_token) else None
    return text, add_bos


def _reply_text(prompt: str, full: str, content: str) -> str:
    """The text the model must write after ``prompt``: the reply and the template's end marker."""
    content = content.strip()  # some formats (llama2) strip the reply
    if full.startswith(prompt) and content in full[len(prompt):]:
        return full[len(prompt):]  # turn-based formats: the history is the prompt plus the reply
    # Firefly v1 prompts one turn as <s>q</s></s> but renders history as <s>q</s>a</s>:
    # the reply keeps what follows it in the history rendering (its end marker).
    at = full.rfind(content) if content else -1
    if at >= 0:
        return full[at:]
    return content  # "raw" does not render replies at all


_warned_merges: set[str] = set()


def build_sft_example(tokenizer: Tokenizer, messages: list[dict], max_len: int, template: str | None = None,
                      preset: str | None = None) -> dict[str, np.ndarray]:
    """Token ids and labels of one conversation; labels are -100 except on reply tokens.

    For each assistant turn the prompt is rendered exactly as the runtime
    prompts the model at chat time (history + user turn + generation prompt,
    BOS as ``runtime.chat.chat_prompt_ids`` adds it), and the reply with its
    end marker is what follows.  The token ids of each prompt must extend
    those of the turns before it; where a template renders history
    differently from its prompt (Firefly v1, "raw"), the earlier replies stay
    as context without labels.  EOS is appended to the last reply unless its
    end marker already is EOS, so the model learns to stop.  With neither
    ``template`` nor ``preset``, the tokenizer's chat template is used, else
    "raw" (as ``runtime.chat.ChatSession`` does).  Truncated to ``max_len``
    keeping the start; ValueError when no reply token is left.
    """
    messages = validate_messages(messages)
    if template is None and preset is None:
        template = getattr(tokenizer, "chat_template", None)
        preset = None if template else "raw"
    ids: list[int] = []
    labels: list[int] = []
    last_reply: list[int] = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if k == 0:
            raise ValueError("messages[0] is an assistant reply: a conversation must start with a prompt")
        prompt, add_bos = _render_ids(tokenizer, messages[:k], template, preset, True)
        full, _ = _render_ids(tokenizer, messages[: k + 1], template, preset, False)
        p_ids = tokenizer.encode(prompt, add_bos=add_bos)
        f_ids = tokenizer.encode(prompt + _reply_text(prompt, full, m["content"]), add_bos=add_bos)
        split = len(p_ids)
        if f_ids[:split] != p_ids:
            # A token merges across the prompt/reply boundary (e.g. a prefix ending in a
            # space): that token starts the reply.
            split = next((i for i, (a, b) in enumerate(zip(p_ids, f_ids)) if a != b),
                         min(len(p_ids), len(f_ids)))
            key = preset or "template"
            if key not in _warned_merges:
                _warned_merges.add(key)
                log.warning("chat format %r: a token spans the prompt/reply boundary; it is "
                            "trained as part of the reply", key)
        if f_ids[: len(ids)] != ids or split < len(ids):
            ids, labels = [], []  # history is re-rendered differently: earlier replies are context
        labels += [IGNORE_INDEX] * (split - len(ids)) + f_ids[split:]
        ids = f_ids
        last_reply = f_ids[split:]
    if not last_reply:
        raise ValueError("no assistant reply in the conversation: nothing to train on")
    eos_ids = list(getattr(tokenizer, "eos_ids", []) or [])
    if eos_ids and not set(last_reply) & set(eos_ids):
        ids.append(eos_ids[0])
        labels.append(eos_ids[0])
    ids, labels = ids[:max_len], labels[:max_len]
    if all(x == IGNORE_INDEX for x in labels):
        raise ValueError(f"nothing to train on after truncating to max_len={max_len}: "
                         "the prompt fills the whole example")
    return {"input_ids": np.asarray(ids, dtype=np.int64), "labels": np.asarray(labels, dtype=np.int64)}


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids with ``pad_id``, labels with -100, and the attention mask."""
    import torch  # only the training loop needs torch

    if not examples:
        raise ValueError("collate: empty batch")
    n = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for b, e in enumerate(examples):
        k = len(e["input_ids"])
        input_ids[b, :k] = torch.as_tensor(np.asarray(e["input_ids"]), dtype=torch.long)
        labels[b, :k] = torch.as_tensor(np.asarray(e.get("labels", e["input_ids"])), dtype=torch.long)
        mask[b, :k] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


# --------------------------------------------------------------------------
# the poet model's corpus

FORTUNES_DIR = Path("/usr/share/games/fortunes")
ZH_FILES = ("tang300", "song100", "chinese")  # Debian's fortunes-zh


def poet_corpus(fortunes_dir: Path = FORTUNES_DIR) -> dict[str, Any]:
    """Documents from Debian's fortunes-zh and English fortunes.

    Returns {"zh": [...], "en": [...], "files": {name: entries}}: zh is the
    Tang poems, Song poems and Chinese sayings; en is every other fortune
    file in the directory (the ``.dat`` indexes and ``.u8`` links skipped).
    """
    d = Path(fortunes_dir)
    missing = [f for f in ZH_FILES if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{d}: no {', '.join(missing)}; install Debian's fortunes-zh "
                                "(and fortunes for the English part)")
    files: dict[str, int] = {}
    zh: list[str] = []
    for name in ZH_FILES:
        entries = read_fortunes(d / name)
        files[name] = len(entries)
        zh += entries
    en: list[str] = []
    for p in sorted(d.iterdir()):
        if p.name in ZH_FILES or p.suffix or p.is_symlink() or not p.is_file():
            continue
        entries = read_fortunes(p)
        files[p.name] = len(entries)
        en += entries
    return {"zh": zh, "en": en, "files": files}


_TITLE = re.compile(r"^(?:题目[:：]\s*)?《(?P<title>[^》]+)》")
_AUTHOR = re.compile(r"^作者[:：]\s*(?P<author>[^（(\s]+)")
_VERSE_SPLIT = re.compile(r"[，。？！；：、,.?!;:\s]+")
_HAN = re.compile(r"[\u3400-\u9fff]+")

# Themes found in a poem's title (or, for the moon, twice in its body).
_THEMES = {
    "月亮": "月", "春天": "春", "秋天": "秋", "离别": "别送", "思乡": "乡归", "边塞": "塞关",
    "饮酒": "酒", "雪": "雪", "雨": "雨", "山": "山", "花": "花",
}


def _parse_poem(entry: str) -> dict | None:
    """Title, author, body and form of a fortunes-zh poem entry, or None."""
    lines = entry.split("\n")
    if len(lines) < 3:
        return None
    t, a = _TITLE.match(lines[0]), _AUTHOR.match(lines[1])
    body = "\n".join(lines[2:]).strip()
    if not (t and a and body):
        return None
    verses = [v for v in _VERSE_SPLIT.split(body) if v]
    form = None
    if verses and all(_HAN.fullmatch(v) for v in verses):
        sizes = {len(v) for v in verses}
        if sizes in ({5}, {7}):
            word = "五言" if sizes == {5} else "七言"
            form = word + {4: "绝句", 8: "律诗"}.get(len(verses), "诗")
    return {"title": t["title"].split("・")[0].strip(), "author": a["author"], "body": body,
            "form": form}


def poet_instructions(zh_docs: list[str], rng: random.Random | int = 0,
                      holdout: float = 0.1) -> ConversationList:
    """Poem-writing prompts derived from the Tang/Song poems among ``zh_docs``.

    Each poem (an entry with a 《title》 line and a 作者 line) gives prompts
    whose reply is its body: by form ("写一首五言绝句", from 4 or 8 verses of 5
    or 7 characters), by title, by theme (a keyword in the title) and a
    recitation.  A ``holdout`` fraction of the poems goes, with all its
    prompts, to the result's ``held_out`` instead (for an eval loss).
    """
    if not isinstance(rng, random.Random):
        rng = random.Random(rng)
    poems, seen = [], set()
    for entry in zh_docs:
        p = _parse_poem(entry)
        if p and p["body"] not in seen:
            seen.add(p["body"])
            poems.append(p)
    rng.shuffle(poems)
    n_hold = max(1, round(len(poems) * holdout)) if holdout > 0 and poems else 0
    out = ConversationList()
    for i, p in enumerate(poems):
        t, a = p["title"], p["author"]
        prompts = [rng.choice([f"以《{t}》为题写一首诗", f"写一首题为《{t}》的诗"]),
                   rng.choice([f"背诵{a}的《{t}》", f"请写出{a}的《{t}》"])]
        if p["form"]:
            f = p["form"]
            prompts.append(rng.choice([f"写一首{f}", f"请写一首{f}。", f"作一首{f}"]))
        themes = [name for name, keys in _THEMES.items() if any(c in p["title"] for c in keys)]
        if p["body"].count("月") >= 2 and "月亮" not in themes:
            themes.append("月亮")
        if themes:
            prompts.append(f"写一首关于{rng.choice(themes)}的诗")
        convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": p["body"]}]
                 for q in prompts]
        (out.held_out if i < n_hold else out).extend(convs)
    return out
