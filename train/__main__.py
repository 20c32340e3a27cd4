"""`python -m train COMMAND ...`: pretrain, sft (instruction tuning), export.

Each command is a (add_arguments, run) pair in COMMANDS; add new ones (the
`tokenizer` command, the `poet` recipe) there. train.data and train.tokenizer
are imported inside the commands, so this module loads without them.

A run directory (--out) holds checkpoints/ (resumable), train_log.jsonl,
model_config.json, tokenizer/ (the tokenizer the run used) and, when the run
ends, hf/: the Hugging Face export that transformers and Lingli load.

Many GPUs / nodes: `deepspeed --num_gpus 8 -m train pretrain ... --deepspeed
train/configs/zero2.json` or `torchrun --nproc_per_node 8 -m train pretrain
... --deepspeed ...`; both set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*. Without
--deepspeed the plain PyTorch loop runs on one device (CUDA if present).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

CONFIGS_DIR = Path(__file__).parent / "configs"


# ---------------------------------------------------------------- shared options
def _add_train_args(p: argparse.ArgumentParser, lr: float, steps: int, warmup: int) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, log, export)")
    g.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    g.add_argument("--min-lr", type=float, default=None, help="final cosine LR (default lr/10)")
    g.add_argument("--warmup", type=int, default=warmup, help=f"linear warmup steps (default {warmup})")
    g.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clip norm (0: off)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (not on norms)")
    g.add_argument("--eval-fraction", type=float, default=0.02,
                   help="share of the examples held out for eval loss (default 0.02)")
    g.add_argument("--eval-every", type=int, default=100, help="steps between eval losses")
    g.add_argument("--eval-batches", type=int, default=20, help="batches per eval")
    g.add_argument("--save-every", type=int, default=200, help="steps between checkpoints")
    g.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    g.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                   help="bf16 autocast; auto: on where the GPU supports bf16")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--deepspeed", metavar="CONFIG", default=None,
                   help="train through DeepSpeed with this JSON config (e.g. "
                        f"{CONFIGS_DIR}/zero2.json or zero3.json)")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from --out's latest checkpoint (default: yes)")
    g.add_argument("--export-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="weight dtype of the final hf/ export")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train_config(a: argparse.Namespace):
    from train.loop import TrainConfig

    return TrainConfig(lr=a.lr, min_lr=a.lr / 10 if a.min_lr is None else a.min_lr,
                       warmup_steps=a.warmup, max_steps=a.steps, batch_size=a.batch_size,
                       grad_accum=a.grad_accum, max_grad_norm=a.max_grad_norm,
                       weight_decay=a.weight_decay, eval_every=a.eval_every,
                       eval_batches=a.eval_batches, save_every=a.save_every,
                       bf16={"auto": "auto", "on": True, "off": False}[a.bf16], seed=a.seed,
                       log_every=a.log_every, deepspeed=a.deepspeed, progress=not a.no_progress)


class _Slice:
    """Examples [start, stop) of a dataset, itself a dataset."""

    def __init__(self, ds, start: int, stop: int) -> None:
        self.ds, self.start, self.n = ds, start, max(0, stop - start)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.ds[self.start + i]


def _split(ds, fraction: float):
    """Hold out the tail: contiguous text, so eval never overlaps a training example."""
    n_eval = int(round(len(ds) * fraction)) if fraction > 0 else 0
    if fraction > 0 and len(ds) > 1:
        n_eval = max(1, n_eval)
    return _Slice(ds, 0, len(ds) - n_eval), (_Slice(ds, len(ds) - n_eval, len(ds)) if n_eval else None)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    from train.export import TOKENIZER_FILES

    dst.mkdir(parents=True, exist_ok=True)
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (src / name).is_file() and src.resolve() != dst.resolve():
            shutil.copyfile(src / name, dst / name)


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _run_and_export(model, train_ds, eval_ds, a, pad_id: int, chat_template: str | None) -> dict:
    import functools

    from train.data import collate
    from train.loop import train

    summary = train(model, train_ds, eval_ds, _train_config(a), a.out,
                    functools.partial(collate, pad_id=pad_id), resume=a.resume)
    if _is_rank0() and summary["checkpoint"]:
        hf = export_run(a.out, a.out / "hf", chat_template=chat_template, dtype=a.export_dtype)
        summary["export"] = str(hf)
        print(f"exported {hf}", file=sys.stderr)
    return summary


def _print_summary(s: dict) -> None:
    keep = {k: v for k, v in s.items() if k not in ("loss_history", "eval_history")}
    keep["first_loss"] = s["loss_history"][0] if s["loss_history"] else None
    keep["last_eval_loss"] = s["eval_history"][-1][1] if s["eval_history"] else None
    print(json.dumps(keep, indent=2))


# ---------------------------------------------------------------- pretrain
def pretrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", type=Path, required=True,
                   help="tokenizer directory (tokenizer.model or tokenizer.json + configs)")
    p.add_argument("--text", type=Path, nargs="+", required=True, help="UTF-8 text files")
    p.add_argument("--paragraphs", action="store_true",
                   help="one document per blank-line paragraph (default: one per file)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per packed example")
    g = p.add_argument_group("model")
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--hidden", type=int, default=256)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, default=None, help="GQA key/value heads (default: --heads)")
    g.add_argument("--intermediate", type=int, default=None,
                   help="MLP width (default: 8/3 x hidden rounded up to 64)")
    g.add_argument("--max-positions", type=int, default=None, help="context (default: --seq-len)")
    g.add_argument("--tie-embeddings", action="store_true", help="share embedding and output matrix")
    g.add_argument("--rope-theta", type=float, default=10000.0)
    _add_train_args(p, lr=1e-3, steps=2000, warmup=100)


def pretrain(a: argparse.Namespace) -> int:
    from runtime.tokenizer import Tokenizer
    from train.data import PackedDataset, read_text
    from train.model import count_params, make_config, make_model

    tok = Tokenizer.from_dir(a.tokenizer)
    eos = tok.eos_ids[0] if tok.eos_ids else 2
    docs = read_text(a.text, paragraphs=a.paragraphs)
    ds = PackedDataset([tok.encode(d) for d in docs], a.seq_len, eos)
    train_ds, eval_ds = _split(ds, a.eval_fraction)
    inter = a.intermediate or -(-(8 * a.hidden // 3) // 64) * 64
    cfg = make_config(tok.vocab_size, a.hidden, a.layers, a.heads, a.kv_heads or a.heads, inter,
                      a.max_positions or a.seq_len, tie_word_embeddings=a.tie_embeddings,
                      rope_theta=a.rope_theta, bos_id=tok.bos_id if tok.bos_id is not None else 1,
                      eos_id=eos, pad_id=tok.pad_id if tok.pad_id is not None else eos)
    model = make_model(cfg, a.seed)
    print(f"{count_params(model):,} parameters; {len(train_ds)} training / "
          f"{len(eval_ds) if eval_ds else 0} eval examples of {a.seq_len} tokens", file=sys.stderr)
    if _is_rank0():
        _copy_tokenizer(a.tokenizer, a.out / "tokenizer")
    _print_summary(_run_and_export(model, train_ds, eval_ds, a, cfg.pad_token_id,
                                   chat_template=None))
    return 0


# ---------------------------------------------------------------- sft
def sft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True,
                   help="an exported model directory (config.json + safetensors) or a run "
                        "directory of `pretrain` (its latest checkpoint)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer directory (default: the model's)")
    p.add_argument("--data", type=Path, nargs="+", required=True,
                   help="instruction JSONL (Alpaca, Firefly, conversations or messages)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--preset", default=None,
                     help="chat format from runtime/chat_template.py (e.g. chatml, linly, "
                          "chinese-alpaca); default: the tokenizer's chat template, else raw")
    fmt.add_argument("--template", type=Path, default=None, help="a Jinja chat template file")
    p.add_argument("--max-len", type=int, default=512, help="tokens per example (truncated)")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed JSONL lines")
    _add_train_args(p, lr=2e-5, steps=500, warmup=20)


def load_model_dir(path: Path):
    """(model, tokenizer_dir) from an exported HF directory or a training run directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from train.loop import MODEL_CONFIG, checkpoint_state_dict, latest_checkpoint
    from train.model import make_model

    path = Path(path)
    ckpt = latest_checkpoint(path)
    if ckpt is not None:
        cfg = LlamaConfig.from_json_file(str(path / MODEL_CONFIG))
        model = make_model(cfg, 0)
        model.load_state_dict(checkpoint_state_dict(ckpt))
        return model, path / "tokenizer"
    if (path / "config.json").is_file():
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
        return model, path
    raise FileNotFoundError(f"{path}: neither a run directory (checkpoints/latest) nor an "
                            "exported model (config.json)")


def sft(a: argparse.Namespace) -> int:
    from runtime.tokenizer import Tokenizer
    from train.data import build_sft_example, load_instructions
    from train.export import preset_chat_template

    model, tok_dir = load_model_dir(a.model)
    tok_dir = a.tokenizer or tok_dir
    tok = Tokenizer.from_dir(tok_dir)
    template = a.template.read_text(encoding="utf-8") if a.template else None
    examples, skipped = [], 0
    for f in a.data:
        for conv in load_instructions(f, on_error="skip" if a.skip_bad_lines else "raise"):
            try:
                examples.append(build_sft_example(tok, conv, a.max_len, template=template,
                                                  preset=a.preset))
            except ValueError:
                skipped += 1       # nothing left to train on after truncation
    if not examples:
        raise SystemExit("sft: no usable examples")
    print(f"{len(examples)} examples ({skipped} dropped)", file=sys.stderr)
    train_ds, eval_ds = _split(examples, a.eval_fraction)
    if _is_rank0():
        _copy_tokenizer(tok_dir, a.out / "tokenizer")
    # The export carries the format the model was tuned on, where it has a Jinja form.
    chat = template or (preset_chat_template(a.preset) if a.preset else None)
    if a.preset and chat is None:
        print(f"note: preset {a.preset!r} has no Jinja form; chat with --preset {a.preset}",
              file=sys.stderr)
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_ids[0] if tok.eos_ids else 0)
    _print_summary(_run_and_export(model, train_ds, eval_ds, a, pad, chat_template=chat))
    return 0


# ---------------------------------------------------------------- export
def export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="a run directory (its latest checkpoint) or one checkpoints/step_N directory")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer directory (default: the run's tokenizer/)")
    p.add_argument("--chat-template", type=Path, default=None, help="a Jinja chat template file")
    p.add_argument("--preset", default=None, help="store this runtime preset as the chat template")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")


def export_run(run_or_ckpt: Path, out: Path, tokenizer: Path | None = None,
               chat_template: str | None = None, dtype: str = "float32") -> Path:
    """Export a run's latest (or a given) checkpoint; works for plain and ZeRO checkpoints."""
    from transformers import LlamaConfig

    from train.export import export_hf
    from train.loop import MODEL_CONFIG, checkpoint_state_dict, latest_checkpoint
    from train.model import make_model

    p = Path(run_or_ckpt)
    ckpt = latest_checkpoint(p)
    if ckpt is None and p.parent.name == "checkpoints":
        ckpt, p = p, p.parent.parent
    if ckpt is None:
        raise FileNotFoundError(f"{run_or_ckpt}: no checkpoint (expected checkpoints/latest)")
    model = make_model(LlamaConfig.from_json_file(str(p / MODEL_CONFIG)), 0)
    model.load_state_dict(checkpoint_state_dict(ckpt))
    return export_hf(model, tokenizer or p / "tokenizer", out, chat_template=chat_template,
                     dtype=dtype)


def export(a: argparse.Namespace) -> int:
    from train.export import preset_chat_template

    chat = a.chat_template.read_text(encoding="utf-8") if a.chat_template else None
    if a.preset:
        chat = preset_chat_template(a.preset)
        if chat is None:
            raise SystemExit(f"export: preset {a.preset!r} has no Jinja form")
    print(export_run(a.checkpoint, a.out, a.tokenizer, chat, a.dtype))
    return 0


# ---------------------------------------------------------------- dispatch
# name -> (help, add_arguments, run). Add `tokenizer` and `poet` here.
# ------------------------------------------------------------- tokenizer --

def tokenizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", type=Path, nargs="+", required=True, help="UTF-8 training text files")
    p.add_argument("--out", type=Path, required=True, help="directory for tokenizer.model and configs")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of characters covered by pieces; the rest fall back to bytes")
    p.add_argument("--extend", type=Path, default=None, metavar="BASE",
                   help="append the new pieces to this base tokenizer (ids of BASE unchanged)")


def tokenizer(a: argparse.Namespace) -> int:
    from .tokenizer import extend_tokenizer, train_tokenizer

    if a.extend is None:
        out = train_tokenizer(a.text, a.out, a.vocab_size, a.model_type, a.character_coverage)
    else:
        extra = train_tokenizer(a.text, a.out / "extra", a.vocab_size, a.model_type,
                                a.character_coverage)
        out = extend_tokenizer(a.extend, extra, a.out)
    print(out)
    return 0


# ------------------------------------------------------------------ poet --

def poet_args(p: argparse.ArgumentParser) -> None:
    from .poet import DEFAULT_OUT

    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    p.add_argument("--pretrain-steps", type=int, default=600, help="steps of 16 x 256 tokens")
    p.add_argument("--sft-steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)


def poet(a: argparse.Namespace) -> int:
    from .poet import build

    build(a.out, pretrain_steps=a.pretrain_steps, sft_steps=a.sft_steps, seed=a.seed)
    return 0


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int]]] = {
    "tokenizer": ("train (or extend) a sentencepiece tokenizer", tokenizer_args, tokenizer),
    "pretrain": ("train a LLaMA from scratch on text files", pretrain_args, pretrain),
    "sft": ("instruction-tune a model on JSONL conversations", sft_args, sft),
    "export": ("write a run's checkpoint in Hugging Face format", export_args, export),
    "poet": ("reproduce the bundled poet model (runtime/models/poet)", poet_args, poet),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n")[0],
                                     epilog="`python -m train COMMAND --help` for each command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    a = parser.parse_args(argv)
    return COMMANDS[a.command][2](a)


if __name__ == "__main__":
    sys.exit(main())
