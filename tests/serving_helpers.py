"""Helpers for the AsyncLLM and server tests: a model that writes Chinese through
byte-fallback tokens, an engine whose steps a test can hold, a uvicorn thread."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np

from runtime.safetensors_io import open_safetensors, save_safetensors
from runtime.tokenizer import Tokenizer
from tiny_model import make_tiny_llama

# 龘 and 囍 are not in the test sentencepiece vocabulary: each is three <0xXX> byte pieces.
CYCLE_TEXT = "你好龘界囍"


def make_bigram_llama(out: Path, cache_root: Path, max_positions: int = 512) -> Path:
    """A tiny sentencepiece LLaMA that mostly walks the token cycle of CYCLE_TEXT.

    The attention and MLP outputs are scaled down so the residual stream is
    nearly the current token's embedding, and lm_head row `next` points along
    the embedding of the token before it: greedy decoding after "你好" writes
    "龘界囍 你好龘界囍 ..." from byte pieces, while temperature-1 sampling
    strays now and then, leaving stray bytes that decode to U+FFFD.
    """
    d = make_tiny_llama(out, "sp", cache_root, max_positions=max_positions)
    cycle = Tokenizer.from_dir(d).encode(CYCLE_TEXT, add_bos=False)
    with open_safetensors(d / "model.safetensors") as f:
        w = {k: np.array(f.get(k)) for k in f.keys()}
    for k in w:
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            w[k] *= 0.05
    emb = w["model.embed_tokens.weight"]
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    head = w["lm_head.weight"] * 0.1
    for cur, nxt in zip(cycle, cycle[1:] + cycle[:1]):
        head[nxt] = 12.0 * unit[cur]
    w["lm_head.weight"] = head
    w["model.norm.weight"] = np.ones_like(w["model.norm.weight"])
    save_safetensors(d / "model.safetensors", w)
    return d


def has_cjk(text: str) -> bool:
    return any("\u4e00" <= c <= "\u9fff" for c in text)


class GatedEngine:
    """An LLMEngine whose steps a test can hold, so "slow" requests need no timing.

    hold(k): allow k more steps, then block in step() until release().
    Records every abort and every finish reason.
    """

    def __init__(self, engine) -> None:
        self.engine = engine
        self.llm = engine.llm
        self._cond = threading.Condition()
        self._budget: int | None = None        # None: unlimited
        self.blocked = False                   # a step is waiting for the gate
        self.aborted: list[str] = []
        self.finished: dict[str, str] = {}

    def hold(self, steps: int = 0) -> None:
        with self._cond:
            self._budget = steps

    def release(self) -> None:
        with self._cond:
            self._budget = None
            self._cond.notify_all()

    def step(self):
        with self._cond:
            self.blocked = True
            self._cond.wait_for(lambda: self._budget is None or self._budget > 0)
            self.blocked = False
            if self._budget is not None:
                self._budget -= 1
        outs = self.engine.step()
        for o in outs:
            if o.finished:
                self.finished[o.request_id] = o.finish_reason
        return outs

    def abort_request(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.engine.abort_request(request_id)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def wait_until(cond, what: str, timeout: float = 60.0, interval: float = 0.02):
    """Poll `cond` until it returns a truthy value (a guard against hangs, not a timing check)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(interval)


class ServerThread:
    """uvicorn serving `app` on a free loopback port from a background thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run,
                                       kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), "uvicorn start")
        assert self.server.started, "uvicorn did not start"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
