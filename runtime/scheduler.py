"""Continuous batching: which requests run in the next forward pass, and how many tokens each.

Every step (vLLM's scheme, first come first served):
1. Running requests, oldest first, each get their next tokens: 1 when
   decoding, a chunk of the prompt when prefilling, all within one token
   budget (max_num_batched_tokens). A request that needs a block when the
   pool is dry preempts the newest running request (its blocks go back;
   it will be recomputed from its prompt and the tokens it already produced),
   possibly itself.
2. Then waiting requests are admitted in arrival order while the budget,
   max_num_seqs and the pool allow; each first takes the cached blocks of its
   longest cached prefix. Nothing is admitted in a step that preempted.
"""
from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .block_manager import BlockManager
from .kv_cache import SequenceKV
from .sampler import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int
    output_ids: list[int] = field(default_factory=list)
    kv: SequenceKV = field(default_factory=SequenceKV)
    num_computed: int = 0          # tokens whose keys/values are in the cache
    status: Status = Status.WAITING
    state: Any = None              # the engine's per-request sampler and detokenizer

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def prefilling(self) -> bool:
        return self.num_computed < len(self.prompt_ids)


@dataclass
class Batch:
    items: list[tuple[Request, int]]        # (request, tokens computed this step), in order
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int = 32,
                 max_num_batched_tokens: int = 512) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []      # in admission order
        self.preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request) -> None:
        """Take `req` out of the queues (finished, aborted or failed) and free its blocks."""
        if req.status is Status.RUNNING:
            self.running.remove(req)
        elif req.status is Status.WAITING:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self.blocks.free(req.kv)
        req.num_computed = 0
        req.status = Status.FINISHED

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.blocks.free(req.kv)
        req.num_computed = 0
        req.status = Status.WAITING
        self.preemptions += 1
        self.waiting.appendleft(req)     # first in line again: it arrived before the others

    def schedule(self) -> Batch:
        budget = self.max_num_batched_tokens
        items: list[tuple[Request, int]] = []
        preempted: list[Request] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed, budget)
            while not self.blocks.can_reserve(req.kv, req.num_computed + n):
                victim = self.running[-1]            # the newest: least work lost
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                break                                # it preempted itself: nothing after it runs
            self.blocks.reserve(req.kv, req.num_computed + n)
            items.append((req, n))
            budget -= n
            i += 1

        while (self.waiting and budget > 0 and not preempted
               and len(self.running) < self.max_num_seqs):
            req = self.waiting[0]
            if not req.kv.block_table:
                req.num_computed = self.blocks.allocate_prefix(req.kv, req.token_ids())
            n = min(req.num_tokens - req.num_computed, budget)
            if not self.blocks.can_reserve(req.kv, req.num_computed + n):
                self.blocks.free(req.kv)             # don't pin cached blocks while waiting
                req.num_computed = 0
                break
            self.blocks.reserve(req.kv, req.num_computed + n)
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            items.append((req, n))
            budget -= n
        return Batch(items, preempted)
