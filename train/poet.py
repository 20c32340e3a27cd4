"""The bundled "poet" model, reproduced by one command:

    python -m train poet            # writes runtime/models/poet (about 35 minutes on 2 idle cores)

1. corpus: Debian's fortunes-zh (Tang poems, Song ci, Chinese sayings) and the
   English fortunes, ANSI codes stripped (train.data.poet_corpus); a fixed 5%
   of the documents is held out;
2. tokenizer: sentencepiece BPE, 8000 pieces, byte fallback;
3. pretraining: a ~7M-parameter LLaMA on packed 256-token sequences, 600 steps
   of 16 sequences (about 2 passes over the corpus);
4. instruction tuning on prompts derived from the poems ("写一首五言绝句",
   "以《静夜思》为题写一首诗", ...), with corpus sequences mixed in so the rest
   of the text is not forgotten, loss on the replies only, rendered with
   POET_TEMPLATE, which the export carries as its chat template, so
   `lingli chat --model poet` prompts the model exactly as it was tuned;
5. export (bfloat16 safetensors) and the held-out perplexity, written to
   poet.json next to the weights.
"""
from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "runtime" / "models" / "poet"

# 问/答 turns; the reply ends with a newline and (after the last reply) EOS.
POET_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{ m['content'] + '\\n' }}"
    "{%- elif m['role'] == 'user' -%}{{ '问：' + m['content'] + '\\n' }}"
    "{%- else -%}{{ '答：' + m['content'] + '\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '答：' }}{%- endif -%}"
)

SHAPE = dict(hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=4, intermediate_size=704,
             max_position_embeddings=512, tie_word_embeddings=True)


def _log(msg: str) -> None:
    print(f"[poet] {msg}", flush=True)


def _split(docs: list[str], frac: float, seed: int) -> tuple[list[str], list[str]]:
    idx = list(range(len(docs)))
    random.Random(seed).shuffle(idx)
    n = max(1, int(len(docs) * frac))
    held = set(idx[:n])
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def build(out: Path = DEFAULT_OUT, work: Path | None = None, pretrain_steps: int = 600,
          sft_steps: int = 200, seed: int = 0, vocab_size: int = 8000,
          fortunes_dir: Path | None = None, heldout_tokens: int | None = None) -> dict:
    """Run the whole recipe; returns the summary written to out/poet.json."""
    import torch

    from runtime.tokenizer import Tokenizer

    from . import data
    from .export import export_hf
    from .loop import TrainConfig, train
    from .model import count_params, make_config, make_model
    from .tokenizer import train_tokenizer

    t_start = time.time()
    torch.manual_seed(seed)
    # A killed run started again with the same work dir resumes: the tokenizer,
    # the step plan and the training checkpoints there are reused.
    work = Path(work or Path.home() / ".cache" / "lingli" / "poet-work")
    work.mkdir(parents=True, exist_ok=True)
    plan_file = work / "plan.json"
    plan = json.loads(plan_file.read_text()) if plan_file.is_file() else {}

    # 1. corpus
    corpus = data.poet_corpus(**({"fortunes_dir": fortunes_dir} if fortunes_dir else {}))
    docs = corpus["zh"] + corpus["en"]
    train_docs, held_docs = _split(docs, 0.05, seed)
    (work / "train.txt").write_text("\n".join(train_docs) + "\n", encoding="utf-8")
    (work / "heldout.txt").write_text("\n\n".join(held_docs) + "\n", encoding="utf-8")
    _log(f"corpus: {len(corpus['zh'])} zh + {len(corpus['en'])} en documents; "
         f"{len(held_docs)} held out")

    # 2. tokenizer
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.model").is_file() or not plan:
        tok_dir = train_tokenizer([work / "train.txt"], tok_dir, vocab_size=vocab_size)
    tok = Tokenizer.from_dir(tok_dir)
    ids = [tok.encode(d, add_bos=False) for d in train_docs]
    held_ids = [tok.encode(d, add_bos=False) for d in held_docs]
    n_tok = sum(map(len, ids))
    _log(f"tokenizer: {tok.vocab_size} pieces; {n_tok} training tokens "
         f"({sum(map(len, train_docs)) / n_tok:.2f} chars/token)")

    # 3. pretraining
    seq = 256
    train_ds = data.PackedDataset(ids, seq, tok.eos_ids[0])
    eval_ds = data.PackedDataset(held_ids, seq, tok.eos_ids[0])
    cfg = make_config(vocab_size=tok.vocab_size, **SHAPE, bos_id=tok.bos_id, eos_id=tok.eos_ids[0],
                      pad_id=0)
    model = make_model(cfg, seed)
    n_params = count_params(model)
    _log(f"model: {n_params / 1e6:.2f}M parameters")
    collate = lambda ex: data.collate(ex, pad_id=0)  # noqa: E731
    if not plan:
        plan = {"steps": pretrain_steps, "sft_steps": sft_steps}
        plan_file.write_text(json.dumps(plan))
    steps = plan["steps"]
    pre_cfg = TrainConfig(lr=1.5e-3, min_lr=1e-4, warmup_steps=max(10, steps // 50), max_steps=steps,
                          batch_size=16, grad_accum=1, max_grad_norm=1.0, weight_decay=0.1,
                          eval_every=max(1, steps // 10), eval_batches=8, save_every=max(1, steps // 10),
                          seed=seed, log_every=10)
    _log(f"pretraining: {steps} steps of {16 * seq} tokens")
    pre = train(model, train_ds, eval_ds, pre_cfg, work / "pretrain", collate, resume=True)

    # 4. instruction tuning on poems (loss on the replies only)
    convs = data.poet_instructions(corpus["zh"], rng=seed)
    sft = [data.build_sft_example(tok, c, max_len=seq, template=POET_TEMPLATE) for c in convs]
    held_sft = [data.build_sft_example(tok, c, max_len=seq, template=POET_TEMPLATE)
                for c in convs.held_out]
    # Packed corpus sequences ride along (one per two poems) so that tuning on
    # poems alone does not make the model forget the rest of its text: without
    # them 200 steps raised the held-out corpus loss from 4.7 to 6.3.
    rng = random.Random(seed)
    sft_mix = sft + [train_ds[i] for i in rng.sample(range(len(train_ds)), min(len(train_ds), len(sft) // 2))]
    sft_steps = plan["sft_steps"]
    sft_cfg = TrainConfig(lr=3e-4, min_lr=3e-5, warmup_steps=10, max_steps=sft_steps, batch_size=16,
                          grad_accum=1, max_grad_norm=1.0, weight_decay=0.0,
                          eval_every=max(1, sft_steps // 5), eval_batches=8,
                          save_every=max(1, sft_steps // 5), seed=seed + 1, log_every=10)
    _log(f"instruction tuning: {len(sft)} examples (+{len(sft_mix) - len(sft)} corpus sequences), "
         f"{sft_steps} steps")
    tuned = train(model, sft_mix, held_sft, sft_cfg, work / "sft", collate, resume=True)

    # 5. export and held-out perplexity (the runtime's evaluation of the exported weights)
    if out.exists():
        shutil.rmtree(out)
    export_hf(model, tok_dir, out, chat_template=POET_TEMPLATE, dtype="bfloat16")
    ppl = _heldout_ppl(out, work / "heldout.txt", heldout_tokens)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    summary = {
        "parameters": n_params, "shape": SHAPE, "vocab_size": tok.vocab_size,
        "training_tokens": n_tok, "heldout_documents": len(held_docs),
        "pretrain": {"steps": steps, "tokens_per_step": 16 * seq, **_brief(pre)},
        "sft": {"examples": len(sft), "corpus_sequences": len(sft_mix) - len(sft), "steps": sft_steps,
                **_brief(tuned)},
        "heldout_ppl": ppl, "export_bytes": size,
        "minutes": round((time.time() - t_start) / 60, 1),
        "command": "python -m train poet",
    }
    (out / "poet.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
    _log(json.dumps(summary, ensure_ascii=False))
    return summary


def _brief(summary: dict) -> dict:
    """Loss curve in ten points (mean of each tenth of the steps), eval losses, tokens/s."""
    h = summary["loss_history"]
    tenths = [round(float(np.mean(h[i * len(h) // 10:(i + 1) * len(h) // 10] or h[-1:])), 3)
              for i in range(10)] if h else []
    return {"loss_curve": tenths, "final_loss": round(h[-1], 4) if h else None,
            "eval_loss": [(s, round(v, 4)) for s, v in summary["eval_history"]],
            "tokens_per_s": round(summary["tokens_per_s"], 1)}


def _heldout_ppl(model_dir: Path, text: Path, max_tokens: int | None = None) -> dict:
    """Perplexity of the held-out documents with the runtime (sliding windows;
    the first max_tokens only, if given: for smoke tests)."""
    from runtime.eval import perplexity
    from runtime.llm import LLM

    llm = LLM(str(model_dir), progress=False)
    ids = llm.tokenizer.encode(text.read_text(encoding="utf-8"))[:max_tokens]
    ppl, n = perplexity(llm, ids, ctx=256, stride=128)
    return {"ppl": round(ppl, 3), "tokens": n, "ctx": 256, "stride": 128,
            "text": "5% of the corpus documents, held out from tokenizer and model training"}
