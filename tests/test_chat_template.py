"""runtime.chat_template: Jinja chat templates and the built-in presets."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures_tokenizer import CHATML_TEMPLATE, bpe_dir, bpe_tok, sp_dir, sp_tok  # noqa: F401
from runtime.chat_template import (
    PRESETS,
    list_presets,
    preset_stop_strings,
    render_chat,
)
from runtime.errors import TokenizerError

TWO_TURNS = [
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "你好！有什么可以帮你？"},
    {"role": "user", "content": "北京有什么好玩的地方？"},
]
SYSTEM = {"role": "system", "content": "你是一个助手。"}
SMOLLM2 = Path("/root/.cache/lingli/smollm2/tokenizer_config.json")

ALPACA = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)

EXPECTED = {
    "chatml": (
        "<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\n你好！有什么可以帮你？<|im_end|>\n"
        "<|im_start|>user\n北京有什么好玩的地方？<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "linly": "User:你好\n你好！有什么可以帮你？\nUser:北京有什么好玩的地方？\n",
    "chinese-alpaca": (
        ALPACA
        + "### Instruction:\n\n你好\n\n### Response:\n\n你好！有什么可以帮你？\n\n"
        + "### Instruction:\n\n北京有什么好玩的地方？\n\n### Response:\n\n"
    ),
    "belle": (
        "Human: \n你好\n\nAssistant: \n你好！有什么可以帮你？\n\n"
        "Human: \n北京有什么好玩的地方？\n\nAssistant: \n"
    ),
    "billa": "Human: 你好\nAssistant: 你好！有什么可以帮你？\nHuman: 北京有什么好玩的地方？\nAssistant: ",
    "ziya": "<human>:你好\n<bot>:你好！有什么可以帮你？\n<human>:北京有什么好玩的地方？\n<bot>:",
    "firefly": "<s>你好</s>你好！有什么可以帮你？</s>北京有什么好玩的地方？</s>",
    "llama2": "<s>[INST] 你好 [/INST] 你好！有什么可以帮你？ </s><s>[INST] 北京有什么好玩的地方？ [/INST]",
    "raw": "你好北京有什么好玩的地方？",
}


def test_all_presets_listed():
    assert set(list_presets()) == set(EXPECTED) == set(PRESETS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_two_turns(name):
    assert render_chat(TWO_TURNS, preset=name) == EXPECTED[name]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("chatml", "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"),
        ("linly", "User:你好\n"),
        ("chinese-alpaca", ALPACA + "### Instruction:\n\n你好\n\n### Response:\n\n"),
        ("belle", "Human: \n你好\n\nAssistant: \n"),
        ("billa", "Human: 你好\nAssistant: "),
        ("ziya", "<human>:你好\n<bot>:"),
        ("firefly", "<s>你好</s></s>"),
        ("llama2", "<s>[INST] 你好 [/INST]"),
        ("raw", "你好"),
    ],
)
def test_preset_single_turn(name, expected):
    assert render_chat([{"role": "user", "content": "你好"}], preset=name) == expected


@pytest.mark.parametrize(
    "name, expected",
    [
        ("chatml", "<|im_start|>system\n你是一个助手。<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"),
        ("linly", "你是一个助手。\nUser:你好\n"),
        ("chinese-alpaca", "你是一个助手。\n\n### Instruction:\n\n你好\n\n### Response:\n\n"),
        ("llama2", "<s>[INST] <<SYS>>\n你是一个助手。\n<</SYS>>\n\n你好 [/INST]"),
        ("ziya", "你是一个助手。\n<human>:你好\n<bot>:"),
    ],
)
def test_preset_system(name, expected):
    assert render_chat([SYSTEM, {"role": "user", "content": "你好"}], preset=name) == expected


def test_no_generation_prompt():
    msgs = TWO_TURNS[:2]
    assert render_chat(msgs, preset="chatml", add_generation_prompt=False) == (
        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n你好！有什么可以帮你？<|im_end|>\n"
    )
    assert render_chat(msgs, preset="billa", add_generation_prompt=False) == (
        "Human: 你好\nAssistant: 你好！有什么可以帮你？\n"
    )


def test_stop_strings():
    assert preset_stop_strings("linly") == ["\nUser:"]
    assert preset_stop_strings("belle") == ["\nHuman:"]
    assert preset_stop_strings("billa") == ["\nHuman:"]
    assert preset_stop_strings("ziya") == ["<human>:"]
    assert preset_stop_strings("chatml") == ["<|im_end|>"]
    for name in list_presets():
        assert isinstance(preset_stop_strings(name), list)
    with pytest.raises(ValueError, match="linly"):
        preset_stop_strings("nope")


def test_unknown_preset_lists_known():
    with pytest.raises(ValueError, match="unknown chat preset 'vicuna'.*chatml.*ziya"):
        render_chat(TWO_TURNS, preset="vicuna")


# ---------------------------------------------------------------- Jinja


@pytest.mark.parametrize("msgs", [TWO_TURNS, [SYSTEM] + TWO_TURNS, TWO_TURNS[:1]])
@pytest.mark.parametrize("gen", [True, False])
def test_checkpoint_chatml_template_equals_preset(bpe_tok, msgs, gen):
    assert bpe_tok.chat_template == CHATML_TEMPLATE
    a = render_chat(msgs, template=bpe_tok.chat_template, add_generation_prompt=gen)
    b = render_chat(msgs, preset="chatml", add_generation_prompt=gen)
    assert a == b
    assert bpe_tok.apply_chat_template(msgs, add_generation_prompt=gen) == a
    ids = bpe_tok.encode(a)
    assert ids[0] == bpe_tok.piece_to_id("<|im_start|>")


@pytest.mark.skipif(not SMOLLM2.exists(), reason=f"{SMOLLM2} not present")
def test_smollm2_template_equals_chatml():
    from runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(SMOLLM2.parent)
    msgs = [SYSTEM] + TWO_TURNS
    assert tok.apply_chat_template(msgs) == render_chat(msgs, preset="chatml")


def test_trim_and_lstrip_blocks():
    tmpl = (
        "{% for m in messages %}\n"
        "    {% if m.role == 'user' %}\n"
        "Q: {{ m.content }}\n"
        "    {% else %}\n"
        "A: {{ m.content }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}A:{% endif %}"
    )
    out = render_chat(TWO_TURNS, template=tmpl)
    assert out == "Q: 你好\nA: 你好！有什么可以帮你？\nQ: 北京有什么好玩的地方？\nA:"


def test_bos_eos_and_tojson():
    tmpl = "{{ bos_token }}{{ messages[0]['content'] | tojson }}{{ eos_token }}"
    assert render_chat(TWO_TURNS, template=tmpl, bos_token="<s>", eos_token="</s>") == '<s>"你好"</s>'


def test_raise_exception():
    tmpl = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('need a system message') }}{% endif %}"
    with pytest.raises(ValueError, match="need a system message"):
        render_chat(TWO_TURNS, template=tmpl)


def test_sandbox_and_syntax_errors():
    with pytest.raises(ValueError, match="does not compile"):
        render_chat(TWO_TURNS, template="{% for m in messages %}")
    with pytest.raises(ValueError):  # sandbox: no attribute games, no mutation
        render_chat(TWO_TURNS, template="{{ messages.append(1) }}")


def test_template_or_preset_required(sp_tok):
    with pytest.raises(ValueError, match="no chat template"):
        render_chat(TWO_TURNS)
    with pytest.raises(ValueError, match="not both"):
        render_chat(TWO_TURNS, template=CHATML_TEMPLATE, preset="chatml")
    with pytest.raises(TokenizerError, match="no chat_template"):
        sp_tok.apply_chat_template(TWO_TURNS)
    assert sp_tok.apply_chat_template(TWO_TURNS, preset="linly") == EXPECTED["linly"]


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("use_preset", [True, False])
@pytest.mark.parametrize(
    "msgs, match",
    [
        ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}], r"messages\[1\].*role"),
        ([{"role": "tool", "content": "x"}], r"messages\[0\].*role"),
        ([{"content": "x"}], r"messages\[0\].*role"),
        ([{"role": "user", "content": None}], r"messages\[0\].*content"),
        ([{"role": "user", "content": ["a"]}], r"messages\[0\].*content"),
        (["hello"], r"messages\[0\]"),
        ([], "empty"),
        ("hello", "list"),
    ],
)
def test_bad_messages(msgs, match, use_preset):
    kwargs = {"preset": "chatml"} if use_preset else {"template": CHATML_TEMPLATE}
    with pytest.raises(ValueError, match=match):
        render_chat(msgs, **kwargs)


def test_system_must_come_first():
    msgs = TWO_TURNS + [SYSTEM]
    with pytest.raises(ValueError, match=r"messages\[3\].*system"):
        render_chat(msgs, preset="linly")
    with pytest.raises(ValueError, match=r"messages\[3\].*system"):
        render_chat(msgs, preset="llama2")
