"""The bundled poet model (runtime/models/poet, made by `python -m train poet`):
it ships within the size limit, resolves by name, carries its recipe's
figures, and `lingli chat --model poet` answers a poem request with Chinese
verse (CPU backend, int4 as the chat default)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.hub import BUNDLED_DIR, resolve_model

POET = BUNDLED_DIR / "poet"
HAN = re.compile(r"[\u4e00-\u9fff]")


def test_poet_ships_and_resolves():
    assert (POET / "config.json").is_file(), "runtime/models/poet is missing: run python -m train poet"
    assert resolve_model("poet") == POET
    size = sum(f.stat().st_size for f in POET.iterdir() if f.is_file())
    assert size <= 25 * 2**20, f"the bundled poet model is {size / 2**20:.1f} MiB (limit 25)"
    info = json.loads((POET / "poet.json").read_text(encoding="utf-8"))
    assert info["command"] == "python -m train poet"
    assert 1e6 < info["parameters"] < 2e7
    assert info["heldout_ppl"]["tokens"] > 10_000 and info["heldout_ppl"]["ppl"] > 1
    curve = info["pretrain"]["loss_curve"]
    assert curve[-1] < curve[0] - 2.0, f"pretraining loss did not fall: {curve}"
    tmpl = json.loads((POET / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    from train.poet import POET_TEMPLATE
    assert tmpl == POET_TEMPLATE      # chat prompts the model exactly as it was tuned


def test_poet_writes_chinese_verse():
    from runtime import LLM, SamplingParams
    from runtime.chat import chat_prompt_ids

    llm = LLM("poet", progress=False)
    tmpl = json.loads((POET / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    ids = chat_prompt_ids(llm.tokenizer, [{"role": "user", "content": "写一首五言绝句"}], tmpl, None)
    outs = llm.generate([ids] * 3, [SamplingParams(temperature=0.8, top_p=0.9, seed=s, max_tokens=64)
                                    for s in range(3)])
    for o in outs:
        assert len(HAN.findall(o.text)) >= 10, o.text


def test_lingli_chat_model_poet():
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    # No --max-tokens: the default must leave room in poet's 512-token context.
    r = subprocess.run([sys.executable, "-m", "runtime", "chat", "--model", "poet", "--temperature", "0.8",
                        "--seed", "0"],
                       input="写一首七言绝句\n/exit\n", capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(HAN.findall(r.stdout)) >= 10, r.stdout


@pytest.mark.skipif(not (Path("/usr/share/games/fortunes") / "tang300").is_file(),
                    reason="Debian's fortunes-zh is not installed")
def test_poet_recipe_runs_end_to_end(tmp_path):
    """`python -m train poet` in miniature: the real corpus and tokenizer, 2 + 2 steps."""
    from runtime import LLM
    from train.poet import build

    out = tmp_path / "poet"
    info = build(out, work=tmp_path / "work", pretrain_steps=2, sft_steps=2, heldout_tokens=600)
    assert info["pretrain"]["steps"] == 2 and info["sft"]["steps"] == 2
    assert info["heldout_ppl"]["tokens"] > 300 and info["heldout_ppl"]["ppl"] > 1
    assert json.loads((out / "poet.json").read_text(encoding="utf-8"))["parameters"] == info["parameters"]
    llm = LLM(str(out), progress=False)
    assert llm.tokenizer.vocab_size == 8000 and llm.config.num_layers == 6
