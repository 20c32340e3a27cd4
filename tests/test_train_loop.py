"""The training loop, export and DeepSpeed on CPU, with tiny models and synthetic data.

Batches are built here from token ids (no train.data / train.tokenizer), so
these tests depend only on train.model, train.loop and train.export.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from train.loop import TrainConfig, checkpoint_state_dict, latest_checkpoint, lr_at, token_loss, train  # noqa: E402
from train.model import count_params, make_config, make_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOCAB, SEQ = 64, 24


class ProgressionData:
    """Arithmetic progressions mod VOCAB: learnable, so the loss must fall.

    Labels are -100 on a random-length prefix, so examples carry different
    numbers of label tokens (what makes accumulation normalisation matter).
    """

    def __init__(self, n: int, seed: int, mask_prefix: bool = True) -> None:
        rng = np.random.default_rng(seed)
        self.items = []
        for _ in range(n):
            a, b = rng.integers(3, VOCAB), rng.integers(1, 4)
            ids = ((a + b * np.arange(SEQ)) % (VOCAB - 3) + 3).astype(np.int64)
            labels = ids.copy()
            if mask_prefix:
                labels[: rng.integers(0, SEQ - 4)] = -100
            self.items.append({"input_ids": ids, "labels": labels})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def collate(examples: list[dict], pad_id: int = 0) -> dict:
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for b, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[b, :k] = torch.as_tensor(e["input_ids"])
        labels[b, :k] = torch.as_tensor(e["labels"])
        mask[b, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def tiny_model(seed: int = 0, tie: bool = False, vocab: int = VOCAB, hidden: int = 32):
    cfg = make_config(vocab, hidden, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=2 * hidden, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return make_model(cfg, seed)


def quick_cfg(**kw) -> TrainConfig:
    base = TrainConfig(lr=3e-3, min_lr=3e-4, warmup_steps=3, max_steps=30, batch_size=4,
                       grad_accum=1, max_grad_norm=1.0, weight_decay=0.01, eval_every=10,
                       eval_batches=2, save_every=0, bf16="auto", seed=0, log_every=5,
                       progress=False)
    return replace(base, **kw)


def read_log(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ model
def test_model_matches_hf_layout_and_is_deterministic():
    m1, m2 = tiny_model(seed=3), tiny_model(seed=3)
    sd = m1.state_dict()
    assert "model.embed_tokens.weight" in sd and "lm_head.weight" in sd
    assert "model.layers.1.self_attn.k_proj.weight" in sd
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 8, 32)   # GQA: 2 kv heads
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in sd.items())
    assert not torch.equal(sd["model.embed_tokens.weight"],
                           tiny_model(seed=4).state_dict()["model.embed_tokens.weight"])
    assert all(v.dtype == torch.float32 for v in sd.values())
    tied = tiny_model(tie=True)
    assert count_params(tied) == count_params(m1) - VOCAB * 32


def test_make_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    a = torch.rand(3)
    torch.manual_seed(123)
    tiny_model(seed=9)
    assert torch.equal(torch.rand(3), a)


# ------------------------------------------------------------------ schedule and loss
def test_warmup_cosine_schedule_values():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=4, max_steps=20)
    assert lr_at(0, cfg) == pytest.approx(2.5e-4)
    assert lr_at(1, cfg) == pytest.approx(5e-4)
    assert lr_at(3, cfg) == pytest.approx(1e-3)
    assert lr_at(4, cfg) == pytest.approx(1e-3)            # cosine starts at the peak
    assert lr_at(12, cfg) == pytest.approx(5.5e-4)         # half way: the mean of lr and min_lr
    assert lr_at(20, cfg) == pytest.approx(1e-4)
    assert lr_at(50, cfg) == pytest.approx(1e-4)           # stays at min_lr past max_steps
    vals = [lr_at(s, cfg) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_token_loss_matches_transformers_loss():
    m = tiny_model()
    batch = collate([ProgressionData(4, seed=1)[i] for i in range(4)])
    out = m(**batch)      # transformers' own (mean over counted labels) loss
    n = int((batch["labels"][:, 1:] != -100).sum())
    mine = token_loss(out.logits.detach(), batch["labels"], n)
    assert float(mine) == pytest.approx(out.loss.item(), rel=1e-6)


# ------------------------------------------------------------------ training
def test_loss_falls_and_logs(tmp_path):
    data, ev = ProgressionData(64, seed=0), ProgressionData(8, seed=99)
    s = train(tiny_model(), data, ev, quick_cfg(max_steps=40), tmp_path, collate)
    h = s["loss_history"]
    assert s["steps"] == 40 and len(h) == 40
    assert np.mean(h[-5:]) < 0.8 * np.mean(h[:3]), h
    assert s["eval_history"][-1][1] < s["eval_history"][0][1]
    assert [e[0] for e in s["eval_history"]] == [10, 20, 30, 40]
    log = read_log(tmp_path)
    assert {"step", "lr", "loss", "tokens_per_s"} <= set(log[-1])
    assert [r["step"] for r in log if "eval_loss" in r] == [10, 20, 30, 40]
    # The LR each step used is the schedule's.
    cfg = quick_cfg(max_steps=40)
    for r in log:
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, cfg))
    assert s["bf16"] is False     # "auto" on a CPU
    assert latest_checkpoint(tmp_path).name == "step_0000040"


def test_grad_accumulation_equals_big_batch(tmp_path):
    data = ProgressionData(32, seed=5)
    runs = {}
    for name, bs, acc in (("big", 4, 1), ("accum", 2, 2)):
        m = tiny_model(seed=1)
        cfg = quick_cfg(max_steps=3, batch_size=bs, grad_accum=acc, eval_every=0, lr=1e-3,
                        max_grad_norm=0.5)
        runs[name] = (train(m, data, None, cfg, tmp_path / name, collate), m)
    (big, m_big), (acc, m_acc) = runs["big"], runs["accum"]
    np.testing.assert_allclose(acc["loss_history"], big["loss_history"], rtol=1e-5)
    for (k, a), b in zip(m_big.state_dict().items(), m_acc.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=k)
    # The check can fail: the micro-batches have unequal label counts, so the
    # naive mean of per-micro-batch means is a different loss.
    b4 = collate([data[i] for i in range(4)])
    logits = m_big(input_ids=b4["input_ids"]).logits.detach()
    halves = [(logits[:2], b4["labels"][:2]), (logits[2:], b4["labels"][2:])]
    counts = [int((lb[:, 1:] != -100).sum()) for _, lb in halves]
    assert counts[0] != counts[1]
    n = sum(counts)
    exact = sum(float(token_loss(lg, lb, n)) for lg, lb in halves)
    naive = sum(float(token_loss(lg, lb, c)) / 2 for (lg, lb), c in zip(halves, counts))
    assert exact == pytest.approx(float(token_loss(logits, b4["labels"], n)), rel=1e-6)
    assert abs(naive - exact) > 1e-3


class Killed(Exception):
    pass


def test_resume_matches_uninterrupted_run_exactly(tmp_path):
    data, ev = ProgressionData(40, seed=2), ProgressionData(8, seed=98)
    cfg = quick_cfg(max_steps=12, grad_accum=2, save_every=4, eval_every=3)

    full_model = tiny_model(seed=7)
    full = train(full_model, data, ev, cfg, tmp_path / "full", collate)

    def kill_at_6(step, rec):
        if step == 6:
            raise Killed   # no checkpoint at 6: the last one is step 4
    with pytest.raises(Killed):
        train(tiny_model(seed=7), data, ev, cfg, tmp_path / "cut", collate, on_step=kill_at_6)
    assert latest_checkpoint(tmp_path / "cut").name == "step_0000004"
    # The resumed run starts from a differently initialised model: the
    # checkpoint must restore everything.
    resumed_model = tiny_model(seed=8)
    res = train(resumed_model, data, ev, cfg, tmp_path / "cut", collate)
    assert res["resumed_from"].endswith("step_0000004")
    assert res["loss_history"] == full["loss_history"]          # bitwise
    assert res["eval_history"] == full["eval_history"]
    for (k, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), k
    # The log has each step once (steps 5-6 of the killed run were replaced).
    assert [r["step"] for r in read_log(tmp_path / "cut")] == [r["step"] for r in read_log(tmp_path / "full")]
    # Only the newest checkpoints are kept, and a finished run does nothing on resume.
    assert len(list((tmp_path / "cut" / "checkpoints").glob("step_*"))) == 2
    again = train(tiny_model(seed=7), data, ev, cfg, tmp_path / "cut", collate)
    assert again["loss_history"] == full["loss_history"] and again["steps"] == 12


def test_graceful_stop_and_checkpoint_weights(tmp_path):
    data = ProgressionData(16, seed=2)
    m = tiny_model()
    s = train(m, data, None, quick_cfg(max_steps=10), tmp_path, collate,
              on_step=lambda step, rec: step == 3)
    assert s["stopped_early"] and s["steps"] == 3
    sd = checkpoint_state_dict(latest_checkpoint(tmp_path))
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    cfg_json = json.loads((tmp_path / "model_config.json").read_text())
    assert cfg_json["model_type"] == "llama" and cfg_json["vocab_size"] == VOCAB


# ------------------------------------------------------------------ export
@pytest.fixture(scope="module")
def sp_tok_dir(tmp_path_factory):
    from fixtures_tokenizer import build_sentencepiece_dir
    return build_sentencepiece_dir(tmp_path_factory.mktemp("sp"))


@pytest.mark.parametrize("tie", [False, True])
def test_export_logits_match_transformers_and_lingli(tmp_path, sp_tok_dir, monkeypatch, tie):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import LlamaForCausalLM

    from runtime import LLM
    from runtime.tokenizer import Tokenizer
    from train.export import export_hf

    n_vocab = Tokenizer.from_dir(sp_tok_dir).vocab_size
    model = tiny_model(seed=4, tie=tie, vocab=n_vocab, hidden=64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():          # varied weights: HF's 0.02 init gives near-uniform logits
        for name, p in model.named_parameters():
            p.copy_((1 + 0.1 * torch.randn(p.shape, generator=g)) if p.dim() == 1
                    else 0.15 * torch.randn(p.shape, generator=g))
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    out = export_hf(model, sp_tok_dir, tmp_path / "hf", chat_template=template)

    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.model",
            "tokenizer_config.json"} <= names
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["torch_dtype"] == "float32" and cfg["tie_word_embeddings"] is tie
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == template

    tok = Tokenizer.from_dir(out)
    assert tok.chat_template == template
    ids = tok.encode("the quick brown fox 你好世界 jumps over the lazy dog")
    assert len(ids) > 8
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        hf = LlamaForCausalLM.from_pretrained(out, local_files_only=True).eval()
        hf_logits = hf(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    lingli = LLM(out, progress=False, kv_cache_dtype="float32").logits(ids)  # the exact fp32 path
    scale = np.abs(hf_logits).max()
    assert scale > 1.0     # logits that are not all ~0, so the comparison means something
    assert np.abs(hf_logits - ref).max() <= 1e-4 * scale
    assert np.abs(lingli - hf_logits).max() <= 1e-4 * scale


def test_export_bf16_weights(tmp_path, sp_tok_dir):
    from runtime.safetensors_io import open_safetensors
    from train.export import export_hf

    out = export_hf(tiny_model(), sp_tok_dir, tmp_path / "hf", dtype="bfloat16")
    st = open_safetensors(out / "model.safetensors")
    assert st.meta("model.embed_tokens.weight")[0] == "BF16"
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with pytest.raises(ValueError):
        export_hf(tiny_model(), sp_tok_dir, tmp_path / "x", dtype="float16")


# ------------------------------------------------------------------ DeepSpeed on CPU
DS_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
    from test_train_loop import ProgressionData, collate, quick_cfg, tiny_model, Killed
    from train.loop import train, checkpoint_state_dict, latest_checkpoint
    out, results = sys.argv[2], {}
    data, ev = ProgressionData(48, seed=0), ProgressionData(8, seed=97)
    for stage in (2, 3):
        cfg = quick_cfg(max_steps=8, grad_accum=2, save_every=3, eval_every=4,
                        deepspeed=f"{sys.argv[1]}/train/configs/zero{stage}.json")
        full = train(tiny_model(seed=1), data, ev, cfg, f"{out}/full{stage}", collate)
        def kill(step, rec):
            if step == 5:
                raise Killed
        try:
            train(tiny_model(seed=1), data, ev, cfg, f"{out}/cut{stage}", collate, on_step=kill)
        except Killed:
            pass
        res = train(tiny_model(seed=2), data, ev, cfg, f"{out}/cut{stage}", collate)
        sd_full = checkpoint_state_dict(latest_checkpoint(f"{out}/full{stage}"))
        sd_res = checkpoint_state_dict(latest_checkpoint(f"{out}/cut{stage}"))
        results[stage] = dict(full=full["loss_history"], resumed=res["loss_history"],
                              full_eval=full["eval_history"], resumed_eval=res["eval_history"],
                              resumed_from=res["resumed_from"],
                              max_weight_diff=max(float((sd_full[k] - sd_res[k]).abs().max())
                                                  for k in sd_full),
                              n_tensors=len(sd_full), zero_stage=full["zero_stage"],
                              optimizer=full["optimizer"])
    print("RESULT " + json.dumps(results))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow   # the first run on a machine JIT-builds DeepSpeed's shm comm op (~1-2 min)
def test_deepspeed_zero2_zero3_on_cpu(tmp_path):
    pytest.importorskip("deepspeed")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
               WORLD_SIZE="1", LOCAL_RANK="0", CUDA_VISIBLE_DEVICES="",
               TORCH_EXTENSIONS_DIR=str(Path.home() / ".cache/lingli/torch_extensions"))
    t0 = time.time()
    # A subprocess: DeepSpeed's process group and accelerator stay out of this one.
    p = subprocess.run([sys.executable, "-c", DS_SCRIPT, str(REPO), str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))
    results = {int(k): v for k, v in json.loads(line[7:]).items()}
    print(f"DeepSpeed ZeRO-2 + ZeRO-3 run took {time.time() - t0:.1f} s")
    for stage, r in results.items():
        full = r["full"]
        assert len(full) == 8
        assert np.mean(full[-2:]) < np.mean(full[:2]), (stage, full)        # loss falls
        assert r["resumed_from"].endswith("step_0000003"), stage
        np.testing.assert_allclose(r["resumed"], full, rtol=1e-6, err_msg=f"stage {stage}")
        assert [e[0] for e in r["full_eval"]] == [4, 8]
        assert r["full_eval"][-1][1] < r["full_eval"][0][1]
        np.testing.assert_allclose(np.array(r["resumed_eval"]), np.array(r["full_eval"]), rtol=1e-6)
        assert r["max_weight_diff"] <= 1e-6, (stage, r["max_weight_diff"])
        assert r["n_tensors"] >= 2 * 9 + 3
        assert r["zero_stage"] == stage
        assert r["optimizer"] == ("DeepSpeedZeroOptimizer" if stage == 2 else "DeepSpeedZeroOptimizer_Stage3")
        print(stage, r)


# ------------------------------------------------------------------ command line
def test_cli_help_and_export_of_a_run(tmp_path, sp_tok_dir, capsys):
    from train.__main__ import COMMANDS, main

    assert {"pretrain", "sft", "export"} <= set(COMMANDS)
    for cmd in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
    assert "--deepspeed" in capsys.readouterr().out
    m = tiny_model(tie=True)
    train(m, ProgressionData(16, seed=0), None, quick_cfg(max_steps=2), tmp_path / "run", collate)
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf"),
                 "--tokenizer", str(sp_tok_dir), "--preset", "chatml"]) == 0
    from safetensors.torch import load_file
    sd = load_file(tmp_path / "hf" / "model.safetensors")
    assert "lm_head.weight" not in sd      # tied: stored once
    assert torch.equal(sd["model.embed_tokens.weight"], m.state_dict()["model.embed_tokens.weight"])
    tmpl = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"]
    from runtime.chat_template import render_chat
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]
    assert render_chat(msgs, template=tmpl) == render_chat(msgs, preset="chatml")
