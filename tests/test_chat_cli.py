"""Chat history trimming and the `lingli` command line."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from runtime import LLM, SamplingParams
from runtime.chat import ChatSession
from runtime.cli import build_parser, main
from runtime.errors import ContextLengthError
from tiny_model import make_tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return make_tiny_llama(root / "bpe", "bpe", root, max_positions=256)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir))


def test_history_trimmed_by_tokens_keeps_system_and_newest(llm):
    s = ChatSession(llm, SamplingParams(max_tokens=8), system="be brief",
                    max_history_tokens=160)
    for i in range(6):
        s.turns += [{"role": "user", "content": f"question {i} apple banana"},
                    {"role": "assistant", "content": f"answer {i} river mountain"}]
    turns, ids = s.trimmed(s.turns + [{"role": "user", "content": "last one"}])
    assert len(ids) <= 160
    assert turns[-1]["content"] == "last one" and turns[0]["role"] == "user"
    assert 1 < len(turns) < 13
    # Exactly the newest turns survive, in order.
    full = s.turns + [{"role": "user", "content": "last one"}]
    assert turns == full[len(full) - len(turns):]
    text = llm.tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nbe brief")
    assert "question 0" not in text and "question 5" in text


def test_message_too_long_for_context(llm):
    s = ChatSession(llm, SamplingParams(max_tokens=8), max_history_tokens=20)
    with pytest.raises(ContextLengthError, match="message alone"):
        list(s.send("apple " * 100))


def test_send_records_turns_and_reset(llm):
    s = ChatSession(llm, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    reply = "".join(s.send("hello"))
    assert s.turns == [{"role": "user", "content": "hello"},
                       {"role": "assistant", "content": reply.strip()}]
    s.reset()
    assert s.turns == []


def test_every_command_has_help():
    import argparse

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"convert", "quantize", "generate", "chat", "eval", "bench"} <= set(sub.choices)

    def check(name, p):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):   # e.g. `lingli eval ppl`
                for sub_name, sub_p in action.choices.items():
                    check(f"{name} {sub_name}", sub_p)
                continue
            assert action.help, f"lingli {name}: option {action.option_strings} has no help"

    for name, p in sub.choices.items():
        check(name, p)


def test_generate_command(model_dir, capsys):
    rc = main(["generate", "-m", str(model_dir), "hello", "--max-tokens", "4",
               "--temperature", "0", "--ignore-eos"])
    out = capsys.readouterr()
    assert rc == 0 and out.out.startswith("hello")
    assert "4 tokens" in out.err


def test_generate_bad_model_is_clean_error(tmp_path, capsys):
    rc = main(["generate", "-m", str(tmp_path / "nope"), "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and "lingli: error:" in err and "Traceback" not in err


def test_chat_command_session(model_dir):
    """Interactive chat over a pipe: two turns, /reset, /exit."""
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    r = subprocess.run([sys.executable, "-m", "runtime", "chat", "-m", str(model_dir),
                        "--max-tokens", "4", "--temperature", "0", "--ignore-eos"],
                       input="hello\nwhat next\n/reset\nagain\n/exit\nnever read\n",
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 3          # three replies, one line each
    assert "history cleared" in r.stderr
