"""The public Python API: `LLM(path).generate / stream / logits / tokenizer`.

`generate` runs all its prompts as one batch through the continuous-batching
engine (runtime.engine); `stream` is the same engine with one request. The
KV pool is sized from a memory budget (kv_cache_gb), never the full context
for every slot: requests take blocks as they grow and give them back.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import ContextLengthError, LingliError
from .kv_cache import PagedKVCache, SequenceKV
from .loader import load_weights
from .model import LlamaModel
from .sampler import SamplingParams

Prompt = str | Sequence[int]

FLOAT_QUANTS = {None: None, "fp32": "fp32", "fp16": "fp16"}
INT_QUANTS = {"int8": 8, "int4": 4, "int3": 3}
QUANT_METHODS = ("rtn", "search", "gptq")
PREFILL_CHUNK = 512
DEFAULT_KV_CACHE_GB = 1.0


@dataclass
class RequestOutput:
    """What one prompt produced."""

    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None     # "stop" (eos, stop token or stop string) or "length"


class LLM:
    """A loaded model ready to generate.

    model: a checkpoint directory (config.json + safetensors + tokenizer), a
        .gguf file (converted on first use) or a known name ("smollm2").
    quant: None keeps the checkpoint's format (a Lingli quantized checkpoint
        stays quantized; bf16 is widened to fp32), "fp32", "fp16", or
        "int8"/"int4"/"int3": quantize a float checkpoint at load.
    group_size, quant_method: for quantizing at load (defaults: 32 and the
        method runtime.quant.quantize_model picks per bit width).
    backend: "cpu" (runtime._C, no PyTorch) or "triton" (kernels/ on a CUDA GPU
        with torch tensors; without CUDA only in Triton's interpreter, which
        TRITON_INTERPRET=1 set before triton is imported asks for).
    max_model_len: context window; defaults to the model's max_position_embeddings.
    kv_cache_gb: KV pool budget (default DEFAULT_KV_CACHE_GB; at least one full
        context). Pages are mapped lazily, so an unused budget costs nothing.
    kv_cache_dtype: "auto" (float16 on the CPU; the triton backend's compute
        dtype), "float16" or "float32" (CPU only).
    max_num_seqs, max_num_batched_tokens: the engine's batch limits.
    enable_prefix_caching: reuse the KV blocks of earlier identical prompt
        prefixes (off for benchmarks that time the same prompt repeatedly).
    """

    def __init__(self, model: str | os.PathLike, quant: str | None = None,
                 backend: str = "cpu", max_model_len: int | None = None,
                 num_threads: int | None = None, block_size: int = 16,
                 group_size: int | None = None, quant_method: str | None = None,
                 progress: bool = True, kv_cache_gb: float | None = None,
                 max_num_seqs: int = 32, max_num_batched_tokens: int = 512,
                 enable_prefix_caching: bool = True, kv_cache_dtype: str = "auto") -> None:
        from .hub import resolve_model

        if quant not in FLOAT_QUANTS and quant not in INT_QUANTS:
            raise LingliError(f"unknown quant {quant!r}; choose one of None, 'fp32', 'fp16', "
                              "'int8', 'int4', 'int3'")
        from .quant.formats import GROUP_SIZES
        if group_size is not None and group_size not in GROUP_SIZES:
            raise LingliError(f"unsupported group size {group_size}; choose one of {GROUP_SIZES}")
        if quant_method not in (None, *QUANT_METHODS):
            raise LingliError(f"unknown quant_method {quant_method!r}; choose one of "
                              f"{', '.join(QUANT_METHODS)}")
        from .backend_cpu import KV_DTYPES
        if kv_cache_dtype not in ("auto", *KV_DTYPES):
            raise LingliError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; choose one of "
                              f"{', '.join(('auto', *KV_DTYPES))}")
        if backend == "cpu":
            from .backend_cpu import CpuBackend
            self.backend = CpuBackend(num_threads, kv_dtype="float16" if kv_cache_dtype == "auto"
                                      else kv_cache_dtype)
        elif backend == "triton":
            if kv_cache_dtype != "auto":
                raise LingliError("backend='triton' keeps its KV cache in its compute dtype; "
                                  "leave kv_cache_dtype='auto'")
            from .backend_triton import TritonBackend   # imports torch and triton
            self.backend = TritonBackend()
        else:
            raise LingliError(f"unknown backend {backend!r}; choose 'cpu' or 'triton'")

        self.path = Path(resolve_model(str(model)))
        self.config = ModelConfig.from_dir(self.path)
        self.tokenizer = _load_tokenizer(self.path)
        self.max_model_len = max_model_len or self.config.max_position_embeddings
        if self.max_model_len < 1:
            raise LingliError(f"max_model_len must be >= 1, got {self.max_model_len}")
        weights = self._load_weights(quant, group_size, quant_method, progress)
        self.model = LlamaModel(self.config, weights, self.backend, self.max_model_len)
        if kv_cache_gb is not None and not kv_cache_gb > 0:
            raise LingliError(f"kv_cache_gb must be > 0, got {kv_cache_gb}")
        per_block = PagedKVCache.bytes_per_block(self.config.num_layers, block_size,
                                                 self.config.num_kv_heads, self.config.head_dim,
                                                 self.backend.kv_itemsize)
        budget = int((kv_cache_gb or DEFAULT_KV_CACHE_GB) * 2**30) // per_block
        context = -(-self.max_model_len // block_size)
        if kv_cache_gb is not None and budget < context:
            raise LingliError(
                f"kv_cache_gb={kv_cache_gb} holds {budget * block_size} tokens, less than one "
                f"context of {self.max_model_len}; raise it or lower max_model_len")
        self.cache = PagedKVCache(self.config.num_layers, max(budget, context), block_size,
                                  self.config.num_kv_heads, self.config.head_dim,
                                  pool=self.backend.kv_pool,
                                  commit=self.backend.kv_commit)
        self.eos_ids = self.tokenizer.eos_ids if self.tokenizer else _config_eos(self.config)
        self._engine_args = dict(max_num_seqs=max_num_seqs,
                                 max_num_batched_tokens=max_num_batched_tokens,
                                 enable_prefix_caching=enable_prefix_caching)
        self._engine = None
        # Logits past the tokenizer's pieces are checkpoint padding: never sampled.
        self.sample_vocab = min(self.tokenizer.vocab_size, self.config.vocab_size) \
            if self.tokenizer else self.config.vocab_size

    # ------------------------------------------------------------------ API
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Complete each prompt (a str or a list of token ids), all as one batch.

        params: one SamplingParams for all prompts or one per prompt.
        Returns one output per prompt, in order."""
        if isinstance(prompts, str) or (_is_id_list(prompts)):
            prompts = [prompts]
        prompts = list(prompts)
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise LingliError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        outs = [RequestOutput(prompt_token_ids=[]) for _ in prompts]
        for _ in self._drive(list(zip(prompts, plist)), outs):
            pass
        return outs

    def stream(self, prompt: Prompt, params: SamplingParams | None = None,
               output: RequestOutput | None = None) -> Iterator[str]:
        """Yield text pieces as they are decided; never a broken character.

        Pass `output` to receive token ids and the finish reason as well.
        """
        out = output if output is not None else RequestOutput(prompt_token_ids=[])
        yield from self._drive([(prompt, params)], [out])

    def _drive(self, jobs: list[tuple[Prompt, SamplingParams | None]],
               outs: list[RequestOutput]) -> Iterator[str]:
        """Run `jobs` as one batch on the engine, filling `outs`; yields new text pieces.
        If the caller stops early, every request is aborted and its blocks go back."""
        eng = self.engine()
        if eng.has_unfinished_requests():
            raise LingliError("the engine is busy with other requests (one caller at a time)")
        by_id = {}
        try:
            for i, ((prompt, p), out) in enumerate(zip(jobs, outs)):
                rid = f"llm-{i}"
                eng.add_request(rid, prompt, p or SamplingParams())
                out.prompt_token_ids = eng.requests[rid].prompt_ids
                by_id[rid] = out
            while eng.has_unfinished_requests():
                for o in eng.step():
                    _collect(by_id[o.request_id], o)
                    if o.new_text:
                        yield o.new_text
        finally:
            for rid in by_id:
                eng.abort_request(rid)

    def engine(self):
        """The continuous-batching engine over this model and its KV pool (made once)."""
        if self._engine is None:
            from .engine import LLMEngine
            self._engine = LLMEngine(self, **self._engine_args)
        return self._engine

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """float32 [len(token_ids), vocab]: the logits after each position."""
        ids = self._check_ids(list(token_ids), max_new=0)
        seq = SequenceKV()
        try:
            self.cache.reserve(seq, len(ids))
            chunks = [self._forward(ids[s:s + PREFILL_CHUNK], s, seq, all_logits=True)
                      for s in range(0, len(ids), PREFILL_CHUNK)]
        finally:
            self.cache.release(seq)
        return np.concatenate(chunks)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise LingliError(f"{self.path} has no tokenizer (tokenizer.model or "
                                  "tokenizer.json); pass prompts as token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    # ------------------------------------------------------------ internals
    def _load_weights(self, quant: str | None, group_size: int | None,
                      method: str | None, progress: bool) -> dict:
        from .quant.checkpoint import is_quantized_checkpoint, load_quantized

        if is_quantized_checkpoint(self.config):
            q = self.config.quantization_config
            stored = f"int{q['bits']}"
            if quant not in (None, stored):
                raise LingliError(f"{self.path} is an {stored} checkpoint (group size "
                                  f"{q['group_size']}); load it with quant=None or "
                                  f"{stored!r}, or quantize the float checkpoint to {quant}")
            self.quant = stored
            return load_quantized(self.path, self.config)
        if quant in INT_QUANTS:
            from .quant.quantize_model import DEFAULT_GROUP_SIZE, quantize_float

            self.quant = quant
            weights, _ = quantize_float(self.path, self.config, INT_QUANTS[quant],
                                        group_size or DEFAULT_GROUP_SIZE, method,
                                        progress=progress)
            return weights
        self.quant = quant or "checkpoint"
        return load_weights(self.path, self.config, FLOAT_QUANTS[quant])

    def _check_ids(self, ids: list[int], max_new: int) -> list[int]:
        if not ids:
            raise LingliError("the prompt is empty: give at least one token")
        bad = [t for t in ids if not isinstance(t, (int, np.integer))
               or t < 0 or t >= self.config.vocab_size]
        if bad:
            raise LingliError(f"token id {bad[0]!r} is not in the vocabulary "
                              f"[0, {self.config.vocab_size})")
        if len(ids) > self.max_model_len - (1 if max_new else 0):
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens but the context window is "
                f"{self.max_model_len} tokens" + (" (and at least one must be generated)"
                                                  if max_new else ""))
        return [int(t) for t in ids]

    def _forward(self, ids: Sequence[int], start: int, seq: SequenceKV,
                 all_logits: bool = False) -> np.ndarray:
        tokens = np.asarray(ids, dtype=np.int64)
        positions = np.arange(start, start + len(ids), dtype=np.int32)
        return self.model.forward(tokens, positions, self.cache, seq, all_logits=all_logits)


def _collect(out: RequestOutput, o) -> None:
    out.token_ids.extend(o.new_token_ids)
    out.text += o.new_text
    if o.finished:
        out.finish_reason = o.finish_reason


def _is_id_list(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(
        isinstance(t, (int, np.integer)) for t in x)


def _config_eos(config: ModelConfig) -> list[int]:
    eos = config.eos_token_id
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def _load_tokenizer(path: Path):
    from .tokenizer import Tokenizer

    if not any((path / f).exists() for f in ("tokenizer.model", "tokenizer.json")):
        return None  # e.g. a bare transformers save_pretrained(); token-id prompts still work
    return Tokenizer.from_dir(path)
