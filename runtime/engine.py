"""The continuous-batching engine: requests in, token and text increments out.

    engine = llm.engine()
    engine.add_request("a", "你好", SamplingParams(max_tokens=32))
    engine.add_request("b", [1, 15, 27], SamplingParams(temperature=0.8, seed=1))
    while engine.has_unfinished_requests():
        for out in engine.step():
            print(out.request_id, out.new_text, out.finished)

Each step the scheduler (runtime.scheduler) picks the requests and token
counts; the engine runs them as ONE forward pass (prefill chunks and decode
tokens of every sequence together, so the weights are read once per step),
samples the sequences whose last known token was just computed, and pushes
the new tokens through each request's incremental detokenizer and stop
checks. Blocks go back to the pool when a request finishes, fails or is
aborted. Not thread-safe: one thread drives an engine (runtime.async_engine
wraps it for the server).
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .block_manager import BlockManager
from .detokenizer import IncrementalDecoder
from .errors import ContextLengthError, LingliError
from .kv_cache import BatchKV
from .sampler import Sampler, SamplingParams
from .scheduler import Request, Scheduler, Status


@dataclass
class EngineOutput:
    """What one step produced for one request."""
    request_id: str
    new_token_ids: list[int]
    new_text: str                 # whole characters only; stop strings already cut
    finished: bool
    finish_reason: str | None     # "stop" | "length" | "abort" | None while running
    prompt_tokens: int
    completion_tokens: int


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached: int
    kv_usage: float
    kv_waste: float               # reserved-but-empty share of the running requests' slots
    prompt_tokens_total: int
    generation_tokens_total: int
    preemptions_total: int
    prefix_cache_hit_tokens: int


@dataclass
class _State:
    sampler: Sampler
    detok: IncrementalDecoder | None


class LLMEngine:
    def __init__(self, llm, max_num_seqs: int = 32, max_num_batched_tokens: int = 512,
                 enable_prefix_caching: bool = True) -> None:
        self.llm = llm
        self.model = llm.model
        self.cache = llm.cache
        self.blocks = BlockManager(self.cache, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        self.max_model_len = llm.max_model_len
        self.eos_ids = llm.eos_ids
        self.requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    # ------------------------------------------------------------------ API
    def add_request(self, request_id: str, prompt: str | Sequence[int],
                    params: SamplingParams | None = None) -> None:
        """Queue a request; bad input raises here, before anything is queued."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise LingliError(f"params must be a SamplingParams, got {type(params).__name__}")
        if request_id in self.requests:
            raise LingliError(f"request id {request_id!r} is already in use")
        ids = self.llm._check_ids(self.llm.encode_prompt(prompt), max_new=params.max_tokens)
        # A prompt (plus its first token) must fit in the whole pool, or it would wait forever.
        need = -(-(len(ids) + 1) // self.cache.block_size)
        if need > self.cache.num_blocks:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens but the KV cache holds only "
                f"{self.cache.capacity_tokens} tokens ({self.cache.num_blocks} blocks); "
                "give it more memory (kv_cache_gb)")
        tok = self.llm.tokenizer
        state = _State(Sampler(params, vocab_size=self.llm.sample_vocab),
                       IncrementalDecoder(tok, stop=params.stop or []) if tok else None)
        req = Request(request_id, ids, params, next(self._arrivals), state=state)
        self.requests[request_id] = req
        self.scheduler.add(req)

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            self.scheduler.finish(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def num_free_blocks(self) -> int:
        return self.cache.allocator.num_free

    def stats(self) -> EngineStats:
        s = self.blocks.stats([r.kv for r in self.scheduler.running])
        return EngineStats(
            running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
            kv_blocks_total=s.total, kv_blocks_used=s.used, kv_blocks_cached=s.cached,
            kv_usage=s.used / s.total, kv_waste=s.waste,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            preemptions_total=self.scheduler.preemptions,
            prefix_cache_hit_tokens=self.blocks.cache_hits)

    def step(self) -> list[EngineOutput]:
        """One forward pass over the scheduled batch; outputs of the requests that moved."""
        batch = self.scheduler.schedule()
        if not batch.items:
            return []
        tokens, positions, seqs, counts, rows, sampled = [], [], [], [], [], []
        for req, n in batch.items:
            start = req.num_computed
            self.blocks.prepare_write(req.kv, start, start + n)
            ids = req.token_ids()
            tokens.extend(ids[start:start + n])
            positions.extend(range(start, start + n))
            seqs.append(req.kv)
            counts.append(n)
            if start + n == req.num_tokens:          # its last known token: sample the next
                rows.append(len(tokens) - 1)
                sampled.append(req)
        try:
            kv = BatchKV.of(seqs, counts)
            logits = self.model.forward(np.asarray(tokens, np.int64),
                                        np.asarray(positions, np.int32), self.cache, kv,
                                        logit_rows=np.asarray(rows, np.int64))
            for req, n in batch.items:
                if req.num_computed < len(req.prompt_ids):
                    self.prompt_tokens_total += min(n, len(req.prompt_ids) - req.num_computed)
                req.num_computed += n
                req.kv.num_tokens = req.num_computed
                self.blocks.commit(req.kv, req.token_ids())
            return [self._advance(req, logits[j]) for j, req in enumerate(sampled)]
        except BaseException:
            # A failed step (a kernel error, KeyboardInterrupt) fails the requests it
            # carried: their cache contents are unknown. Their blocks go back first.
            for req, _ in batch.items:
                if req.status is not Status.FINISHED:
                    self.scheduler.finish(req)
                    self.requests.pop(req.request_id, None)
            raise

    # ------------------------------------------------------------ internals
    def _advance(self, req: Request, logits: np.ndarray) -> EngineOutput:
        st: _State = req.state
        p = req.params
        token = int(st.sampler.sample(logits, req.prompt_ids, req.output_ids))
        req.output_ids.append(token)
        self.generation_tokens_total += 1
        text, reason = "", None
        if st.sampler.is_stop_token(token, self.eos_ids):
            reason = "stop"
        elif st.detok is not None:
            text = st.detok.push(token)
            if st.detok.stopped:
                reason = "stop"
        if reason is None and (len(req.output_ids) >= p.max_tokens
                               or req.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if st.detok is not None and not st.detok.stopped:
                text += st.detok.flush()
            self.scheduler.finish(req)
            del self.requests[req.request_id]
        return EngineOutput(req.request_id, [token], text, reason is not None, reason,
                            len(req.prompt_ids), len(req.output_ids))
