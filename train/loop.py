"""The training loop: AdamW, warmup + cosine, accumulation, clipping, bf16, exact resume.

One loop serves both back ends. Without ``cfg.deepspeed`` it is plain
PyTorch; with it, the model, client AdamW and scheduler go through
``deepspeed.initialize`` (ZeRO stage from the JSON config) and the engine
does backward, clipping, the step and its own checkpoint files.

Exact resume: batches come from a seeded permutation per epoch, so the
sampler state is just (epoch, position). That position, the RNG states,
optimizer, scheduler, step and loss history all go into each checkpoint, so
a run killed at any point and resumed sees the same batches and produces the
same weights as one that never stopped (bitwise on CPU).

Checkpoint files: ``out_dir/checkpoints/step_NNNNNNN/`` holds
``trainer_state.pt`` (plus ``model_optim.pt`` in plain mode, or DeepSpeed's own
files); ``out_dir/checkpoints/latest`` names the newest complete one and is
replaced (temp file + rename) only after every file of it is written. They are
torch.save files written by this trainer and read back with
``torch.load(weights_only=True)``; never point resume at files you did not
write yourself (DeepSpeed's own loader uses full unpickling).
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["TrainConfig", "train", "lr_at", "BatchSampler", "token_loss", "latest_checkpoint",
           "checkpoint_state_dict", "MODEL_CONFIG"]

IGNORE = -100
MODEL_CONFIG = "model_config.json"    # out_dir/model_config.json: the model's LlamaConfig
KEEP_CHECKPOINTS = 2


@dataclass
class TrainConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5              # the cosine ends here at max_steps
    warmup_steps: int = 100
    max_steps: int = 1000             # optimizer steps
    batch_size: int = 8               # sequences per micro-batch (per process)
    grad_accum: int = 1               # micro-batches per optimizer step
    max_grad_norm: float = 1.0        # 0 turns clipping off
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eval_every: int = 200             # 0: no periodic eval (still one at the end)
    eval_batches: int = 20
    save_every: int = 500             # 0: only the final checkpoint
    bf16: bool | str = "auto"         # "auto": on where the hardware has bf16 (CUDA today)
    seed: int = 0
    log_every: int = 10
    deepspeed: str | None = None      # path of a DeepSpeed JSON config
    progress: bool = True             # tqdm bar


# ---------------------------------------------------------------- schedule
def lr_at(step: int, cfg: TrainConfig) -> float:
    """LR for optimizer step `step` (0-based): linear warmup to cfg.lr, cosine to min_lr."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg) / cfg.lr)


# ---------------------------------------------------------------- sampling
class BatchSampler:
    """Seeded shuffled batches across epochs; state is (epoch, pos), so it resumes exactly.

    With several processes each global batch of batch_size * world indices is
    split by rank, so ranks see disjoint examples.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if n < batch_size * world:
            raise ValueError(f"dataset has {n} examples, fewer than one global batch "
                             f"({batch_size} x {world} processes)")
        self.n, self.bs, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.pos = 0, 0
        self._perm_epoch, self._perm = -1, np.empty(0, np.int64)

    def _order(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
            self._perm_epoch = self.epoch
        return self._perm

    def next(self) -> list[int]:
        g = self.bs * self.world
        if self.pos + g > self.n:     # drop the ragged tail; next epoch
            self.epoch, self.pos = self.epoch + 1, 0
        idx = self._order()[self.pos + self.rank * self.bs: self.pos + (self.rank + 1) * self.bs]
        self.pos += g
        return [int(i) for i in idx]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "n": self.n}

    def load_state_dict(self, s: dict) -> None:
        if s["n"] != self.n or s["seed"] != self.seed:
            raise ValueError(f"checkpoint sampler was for {s['n']} examples / seed {s['seed']}, "
                             f"this run has {self.n} / {self.seed}: the data changed")
        self.epoch, self.pos = s["epoch"], s["pos"]


# ---------------------------------------------------------------- loss
def token_loss(logits: torch.Tensor, labels: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Sum of next-token cross entropy over counted labels, divided by n_tokens.

    Labels are unshifted (as in transformers): logits[t] predicts labels[t+1].
    Dividing every micro-batch by the step's total label count makes
    accumulation over micro-batches equal to one big batch.
    """
    logits = logits[:, :-1].float()
    tgt = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1),
                           ignore_index=IGNORE, reduction="sum") / max(1, n_tokens)


def _n_labels(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


# ---------------------------------------------------------------- RNG and files
def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.random.get_rng_state(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                      int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": _py_state_to_plain(random.getstate())}


def _set_rng_state(s: dict) -> None:
    torch.random.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    v, internal, gauss = s["python"]
    random.setstate((v, tuple(internal), gauss))


def _py_state_to_plain(st: tuple) -> list:
    return [st[0], list(st[1]), st[2]]


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory of a run, or None."""
    ptr = Path(out_dir) / "checkpoints" / "latest"
    if not ptr.is_file():
        return None
    d = ptr.parent / ptr.read_text(encoding="utf-8").strip()
    return d if d.is_dir() else None


def checkpoint_state_dict(ckpt_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Full float32 model weights of one checkpoint directory (plain or DeepSpeed ZeRO)."""
    d = Path(ckpt_dir)
    if (d / "model_optim.pt").is_file():
        return torch.load(d / "model_optim.pt", map_location="cpu", weights_only=True)["model"]
    # DeepSpeed: gather the ZeRO partitions (any stage) into one fp32 state dict.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(d.parent), tag=d.name)


def _prune(ckpt_root: Path, keep: str) -> None:
    dirs = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for d in dirs[:-KEEP_CHECKPOINTS]:
        if d.name != keep:
            shutil.rmtree(d, ignore_errors=True)


def _bf16_enabled(flag: bool | str, device: torch.device) -> bool:
    if flag == "auto":
        # CPU autocast exists, but is slow on most CPUs and would make
        # CPU runs non-bitwise; "auto" means a CUDA GPU with bf16 units.
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return bool(flag)


# ---------------------------------------------------------------- DeepSpeed
def _dist_env_defaults() -> None:
    """A single local process unless a launcher (deepspeed, torchrun) set these."""
    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500"), ("RANK", "0"),
                 ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)


def load_ds_config(path: str | os.PathLike, cfg: TrainConfig, bf16: bool) -> dict:
    """Read a DeepSpeed JSON config and fill what this trainer owns.

    Batch size, accumulation, clipping and bf16 come from cfg (the JSON's
    "auto" placeholders); the optimizer and scheduler are the trainer's
    client objects, so config sections for them are dropped.
    """
    ds = json.loads(Path(path).read_text(encoding="utf-8"))
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds.pop("train_batch_size", None)   # DeepSpeed derives it with the world size
    ds["gradient_clipping"] = float(cfg.max_grad_norm)
    ds.setdefault("bf16", {})["enabled"] = bool(bf16)
    ds.setdefault("fp16", {})["enabled"] = False
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    ds.setdefault("steps_per_print", 10 ** 9)   # our own log and bar do the printing
    for k, v in list(ds.get("zero_optimization", {}).items()):
        if v == "auto":   # sizes DeepSpeed's HF integration would derive: use DS defaults
            del ds["zero_optimization"][k]
    return ds


# ---------------------------------------------------------------- the loop
class _Backend:
    """Plain PyTorch: forward/backward/step and checkpoint files."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> None:
        self.model = model.to(device)
        self.cfg, self.device = cfg, device
        self.bf16 = _bf16_enabled(cfg.bf16, device)
        self.opt = _adamw(model, cfg)
        self.sched = _scheduler(self.opt, cfg)
        self.rank, self.world = 0, 1

    def forward(self, batch: dict) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"]).logits

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def micro_step(self) -> None:
        pass

    def step(self) -> float:
        norm = 0.0
        if self.cfg.max_grad_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                        self.cfg.max_grad_norm))
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def save(self, d: Path) -> None:
        _atomic_torch_save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                            "scheduler": self.sched.state_dict()}, d / "model_optim.pt")

    def load(self, d: Path) -> None:
        s = torch.load(d / "model_optim.pt", map_location=self.device, weights_only=True)
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["optimizer"])
        self.sched.load_state_dict(s["scheduler"])

    def module(self) -> torch.nn.Module:
        return self.model


class _DeepSpeedBackend(_Backend):
    """deepspeed.initialize with a client AdamW + LambdaLR; the engine steps and saves."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> None:
        _dist_env_defaults()
        import deepspeed

        self.cfg = cfg
        self.bf16 = _bf16_enabled(cfg.bf16, device)
        ds_cfg = load_ds_config(cfg.deepspeed, cfg, self.bf16)
        opt = _adamw(model, cfg)
        self.engine, self.opt, _, self.sched = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=_scheduler(opt, cfg), config=ds_cfg)
        self.device = self.engine.device
        self.rank = self.engine.global_rank
        self.world = self.engine.world_size
        self.stage = self.engine.zero_optimization_stage()
        self.model = self.engine

    def forward(self, batch: dict) -> torch.Tensor:
        return self.engine(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is already divided by the step's label count: no 1/accum on top.
        self.engine.backward(loss, scale_wrt_gas=False)

    def micro_step(self) -> None:
        # DeepSpeed wants step() after every micro-batch; it updates only at the boundary.
        self.engine.step()

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def save(self, d: Path) -> None:
        self.engine.save_checkpoint(str(d.parent), tag=d.name, save_latest=False)

    def load(self, d: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(d.parent), tag=d.name)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {d}")

    def module(self) -> torch.nn.Module:
        return self.engine.module


def _adamw(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # No weight decay on norms and biases (1-D tensors), as usual for LLaMA.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False: the single-tensor path is the reference and is bitwise stable.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=1e-8, foreach=False)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@torch.no_grad()
def evaluate(backend: _Backend, eval_ds: Sequence, cfg: TrainConfig,
             collate_fn: Callable[[list], dict]) -> float:
    """Mean token loss over the first eval_batches batches of eval_ds (fixed order)."""
    was_training = backend.model.training
    backend.model.eval()
    total, count = 0.0, 0
    n = min(len(eval_ds), cfg.eval_batches * cfg.batch_size)
    for s in range(0, n, cfg.batch_size):
        batch = _to(collate_fn([eval_ds[i] for i in range(s, min(n, s + cfg.batch_size))]),
                    backend.device)
        k = _n_labels(batch)
        total += float(token_loss(backend.forward(batch), batch["labels"], 1)) if k else 0.0
        count += k
    backend.model.train(was_training)
    return total / max(1, count)


def train(model: torch.nn.Module, train_ds: Sequence, eval_ds: Sequence | None,
          cfg: TrainConfig, out_dir: str | os.PathLike,
          collate_fn: Callable[[list], dict], resume: bool = True,
          on_step: Callable[[int, dict], bool | None] | None = None) -> dict:
    """Train `model` for cfg.max_steps optimizer steps; returns a summary dict.

    train_ds[i] -> {"input_ids", "labels"} (labels unshifted, -100 = no loss);
    collate_fn(list of examples) -> {"input_ids", "labels", "attention_mask"}.
    resume: continue from out_dir's latest checkpoint when there is one.
    on_step(step, record) is called after each optimizer step (and after that
    step's checkpoint); returning True stops the run early with a checkpoint.
    Summary: steps, loss_history, eval_history, last checkpoint, tokens/s.
    With several processes the logged loss is the mean over ranks; tokens/s
    are this process's (input tokens, padding excluded).
    """
    out = Path(out_dir)
    ckpt_root = out / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)

    backend = (_DeepSpeedBackend if cfg.deepspeed else _Backend)(model, cfg, device)
    sampler = BatchSampler(len(train_ds), cfg.batch_size, cfg.seed, backend.rank, backend.world)
    step, history, evals = 0, [], []
    resumed_from = None
    last = latest_checkpoint(out) if resume else None
    if last is not None:
        backend.load(last)
        st = torch.load(last / f"trainer_state_rank{backend.rank}.pt", weights_only=True)
        step, history, evals = st["step"], list(st["loss_history"]), [tuple(e) for e in st["eval_history"]]
        sampler.load_state_dict(st["sampler"])
        _set_rng_state(st["rng"])
        resumed_from = str(last)
    log_path = out / "train_log.jsonl"
    if backend.rank == 0:
        _trim_log(log_path, step)
        if hasattr(model, "config") and hasattr(model.config, "to_json_string"):
            _atomic_write_text(out / MODEL_CONFIG, model.config.to_json_string())

    def save() -> Path:
        d = ckpt_root / f"step_{step:07d}"
        d.mkdir(exist_ok=True)
        backend.save(d)
        _atomic_torch_save({"step": step, "loss_history": history, "eval_history": evals,
                            "sampler": sampler.state_dict(), "rng": _rng_state(),
                            "config": _plain_config(cfg)},
                           d / f"trainer_state_rank{backend.rank}.pt")
        _barrier(backend)
        if backend.rank == 0:
            _atomic_write_text(ckpt_root / "latest", d.name)
            _prune(ckpt_root, d.name)
        return d

    bar = None
    if cfg.progress and backend.rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.max_steps, initial=step, desc="train", dynamic_ncols=True)
    backend.model.train()
    last_ckpt = last
    tokens_seen, t_start = 0, time.perf_counter()
    window_tokens, window_t = 0, time.perf_counter()
    stopped = False
    while step < cfg.max_steps and not stopped:
        batches = [_to(collate_fn([train_ds[i] for i in sampler.next()]), backend.device)
                   for _ in range(cfg.grad_accum)]
        n_tok = sum(_n_labels(b) for b in batches)
        loss_sum = 0.0
        for j, batch in enumerate(batches):
            loss = token_loss(backend.forward(batch), batch["labels"], n_tok)
            backend.backward(loss)
            if j < len(batches) - 1:
                backend.micro_step()
            loss_sum += float(loss.detach())
        if backend.world > 1:   # log the mean over ranks, which is what the gradient averages
            t = torch.tensor([loss_sum], dtype=torch.float64, device=backend.device)
            torch.distributed.all_reduce(t)
            loss_sum = float(t) / backend.world
        lr = backend.lr()
        grad_norm = backend.step()
        step += 1
        history.append(loss_sum)
        n_in = sum(int(b["attention_mask"].sum()) for b in batches)
        tokens_seen += n_in
        window_tokens += n_in
        record: dict[str, Any] = {"step": step, "lr": lr, "loss": loss_sum, "grad_norm": grad_norm}
        if eval_ds is not None and len(eval_ds) and (
                (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
            record["eval_loss"] = evaluate(backend, eval_ds, cfg, collate_fn)
            evals.append((step, record["eval_loss"]))
        if step % max(1, cfg.log_every) == 0 or "eval_loss" in record or step == cfg.max_steps:
            now = time.perf_counter()
            record["tokens_per_s"] = window_tokens / max(1e-9, now - window_t)
            window_tokens, window_t = 0, now
            if backend.rank == 0:
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
        if bar is not None:
            el = time.perf_counter() - t_start
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}",
                            tok_s=f"{tokens_seen / max(1e-9, el):.0f}", refresh=False)
            bar.update(1)
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps:
            last_ckpt = save()
        if on_step is not None and on_step(step, record):
            stopped = True
            if last_ckpt is None or last_ckpt.name != f"step_{step:07d}":
                last_ckpt = save()
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t_start
    return {"steps": step, "loss_history": history, "eval_history": evals,
            "final_loss": history[-1] if history else None,
            "checkpoint": str(last_ckpt) if last_ckpt else None, "resumed_from": resumed_from,
            "tokens_per_s": tokens_seen / max(1e-9, elapsed), "bf16": backend.bf16,
            "deepspeed": bool(cfg.deepspeed), "zero_stage": getattr(backend, "stage", None),
            "optimizer": type(backend.opt).__name__, "stopped_early": stopped}


def _plain_config(cfg: TrainConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}


def _barrier(backend: _Backend) -> None:
    if backend.world > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines past the resume point: those steps are about to be redone."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text(encoding="utf-8").splitlines()
            if ln.strip() and json.loads(ln).get("step", 0) <= step]
    _atomic_write_text(path, "".join(ln + "\n" for ln in keep))

