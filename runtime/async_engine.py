"""AsyncLLM: one LLMEngine driven by one background thread, used from asyncio.

The engine is not thread-safe, so exactly one thread (started here) ever
calls it. Callers hand it requests and aborts through a thread-safe queue;
the thread hands each request's outputs back to the caller's event loop with
``call_soon_threadsafe``. With nothing to run, the thread blocks on the queue
(no busy spin).

A request whose consumer goes away (stops iterating, is cancelled, its HTTP
client disconnects) is aborted, so its KV blocks go back to the pool.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .errors import LingliError, QueueFullError

if TYPE_CHECKING:  # pragma: no cover
    from .engine import EngineOutput, EngineStats, LLMEngine
    from .sampler import SamplingParams

log = logging.getLogger("lingli.async_engine")

TOKENS_WINDOW_S = 10.0      # tokens/s is averaged over this many seconds

_ACK = object()             # posted to a stream once add_request accepted it
_ADD, _ABORT, _CLOSE = "add", "abort", "close"


class EngineClosedError(LingliError):
    """The AsyncLLM was closed (or its engine thread died); no request can run."""


class RequestStream:
    """The outputs of one request, in order: ``async for out in stream``.

    ``close()`` aborts the request if it has not finished; it is also called
    when the stream is garbage-collected, so a dropped stream never keeps
    its KV blocks.
    """

    def __init__(self, owner: "AsyncLLM", request_id: str,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.finished = False
        self._owner = owner
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()

    def _post(self, items: list) -> bool:
        """Engine thread: deliver items to the consumer's loop; False if that loop is gone."""
        try:
            self._loop.call_soon_threadsafe(self._deliver, items)
            return True
        except RuntimeError:    # the event loop was closed
            return False

    def _deliver(self, items: list) -> None:
        for item in items:
            self._queue.put_nowait(item)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> "EngineOutput":
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True          # the engine no longer holds this request
            raise item
        if item.finished:
            self.finished = True
        return item

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._owner._abort(self.request_id)

    async def aclose(self) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:   # interpreter shutdown
            pass


class AsyncLLM:
    """Runs `engine` in a background thread and streams its outputs to coroutines.

    max_queue: most requests that may wait (submitted but not yet running,
        the engine's waiting list included); one more raises QueueFullError.
    llm: the engine's LLM (tokenizer, context window); default ``engine.llm``.
    """

    def __init__(self, engine: "LLMEngine", max_queue: int = 256, llm: Any = None) -> None:
        if max_queue < 1:
            raise LingliError(f"max_queue must be >= 1, got {max_queue}")
        self.engine = engine
        self.llm = llm if llm is not None else getattr(engine, "llm", None)
        self.max_queue = max_queue
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()   # reentrant: safe from __del__
        self._lock = threading.Lock()       # guards the counters and the stats snapshot
        self._closed = False
        self._unadmitted = 0                # submitted, not yet handed to the engine
        self._snapshot: EngineStats = engine.stats()
        self._waiting = self._snapshot.waiting
        self._token_log: deque[tuple[float, int]] = deque()
        self._streams: dict[str, RequestStream] = {}          # engine thread only
        self._thread = threading.Thread(target=self._run, name="lingli-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_llm(cls, llm: Any, max_queue: int = 256) -> "AsyncLLM":
        """Over `llm.engine()`; nothing else may use that engine (llm.generate/stream) meanwhile."""
        return cls(llm.engine(), max_queue=max_queue, llm=llm)

    # ------------------------------------------------------------------ API
    async def submit(self, prompt: str | Sequence[int], params: "SamplingParams",
                     request_id: str | None = None) -> RequestStream:
        """Queue a request; returns its stream once the engine accepted it.

        Raises QueueFullError at once when max_queue requests already wait,
        and the engine's add_request error (ContextLengthError, ...) if it
        refuses the request.
        """
        rid = request_id if request_id is not None else uuid.uuid4().hex
        stream = RequestStream(self, rid, asyncio.get_running_loop())
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine is shut down")
            queued = self._unadmitted + self._waiting
            if queued >= self.max_queue:
                raise QueueFullError(f"server at capacity: {queued} requests are waiting "
                                     f"(max_queue={self.max_queue}); retry later")
            self._unadmitted += 1
            # Put under the lock so no add can land behind close()'s command.
            self._cmds.put((_ADD, stream, prompt, params))
        try:
            first = await stream._queue.get()
        except BaseException:        # cancelled while waiting: do not leave it running
            stream.close()
            raise
        if first is not _ACK:
            stream.finished = True
            raise first
        return stream

    async def generate(self, prompt: str | Sequence[int], params: "SamplingParams",
                       request_id: str | None = None) -> AsyncIterator["EngineOutput"]:
        """Stream one request's outputs; leaving the loop early aborts the request."""
        stream = await self.submit(prompt, params, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        self._abort(request_id)

    def stats(self) -> "EngineStats":
        """The engine's latest stats; `waiting` also counts requests not yet handed to it."""
        with self._lock:
            return replace(self._snapshot, waiting=self._waiting + self._unadmitted)

    def generation_tokens_per_second(self) -> float:
        """Tokens generated per second, averaged over the last TOKENS_WINDOW_S seconds."""
        now = time.monotonic()
        with self._lock:
            self._prune_token_log(now)
            return sum(n for _, n in self._token_log) / TOKENS_WINDOW_S

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Abort every request (their streams raise EngineClosedError) and stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._cmds.put((_CLOSE,))
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # ------------------------------------------------------------ internals
    def _abort(self, request_id: str) -> None:
        self._cmds.put((_ABORT, request_id))

    def _prune_token_log(self, now: float) -> None:
        while self._token_log and self._token_log[0][0] < now - TOKENS_WINDOW_S:
            self._token_log.popleft()

    def _run(self) -> None:
        eng = self.engine
        try:
            while True:
                cmds = [] if eng.has_unfinished_requests() else [self._cmds.get()]
                while True:
                    try:
                        cmds.append(self._cmds.get_nowait())
                    except queue.Empty:
                        break
                for cmd in cmds:
                    if cmd[0] == _CLOSE:
                        self._fail_all(EngineClosedError("the engine is shut down"), drain=True)
                        return
                    if cmd[0] == _ADD:
                        self._add(*cmd[1:])
                    else:
                        eng.abort_request(cmd[1])
                        self._streams.pop(cmd[1], None)
                if eng.has_unfinished_requests():
                    try:
                        outs = eng.step()
                    except Exception as e:   # an engine bug: fail what is running, keep serving
                        log.exception("engine step failed")
                        self._fail_all(LingliError(f"engine step failed: {e}"))
                    else:
                        # Stats first: a consumer that sees its last output sees its stats too.
                        self._refresh()
                        self._dispatch(outs)
                        continue
                self._refresh()
        except BaseException as e:
            log.exception("engine thread died")
            with self._lock:
                self._closed = True
            self._fail_all(EngineClosedError(f"the engine thread died: {e!r}"), drain=True)

    def _add(self, stream: RequestStream, prompt: Any, params: Any) -> None:
        with self._lock:
            self._unadmitted -= 1
        rid = stream.request_id
        if rid in self._streams:
            stream._post([LingliError(f"request id {rid!r} is already running")])
            return
        try:
            self.engine.add_request(rid, prompt, params)
        except Exception as e:       # bad input: raised to the submitter
            stream._post([e])
            return
        self._streams[rid] = stream
        with self._lock:
            self._waiting += 1       # until the next stats refresh says otherwise
        if not stream._post([_ACK]):
            self._drop(rid)

    def _dispatch(self, outs: list["EngineOutput"]) -> None:
        per_stream: dict[str, list] = {}
        tokens = 0
        for out in outs:
            tokens += len(out.new_token_ids)
            if out.request_id in self._streams:
                per_stream.setdefault(out.request_id, []).append(out)
        for rid, items in per_stream.items():
            stream = self._streams[rid]
            if items[-1].finished:
                del self._streams[rid]
            if not stream._post(items):
                self._drop(rid)
        if tokens:
            now = time.monotonic()
            with self._lock:
                self._token_log.append((now, tokens))
                self._prune_token_log(now)

    def _drop(self, rid: str) -> None:
        """The consumer's event loop is gone: nobody can read this request."""
        self.engine.abort_request(rid)
        self._streams.pop(rid, None)

    def _fail_all(self, error: BaseException, drain: bool = False) -> None:
        for rid, stream in list(self._streams.items()):
            try:
                self.engine.abort_request(rid)
            except Exception:
                log.exception("abort_request(%r) failed", rid)
            stream._post([error])
        self._streams.clear()
        # Requests still queued behind a close (or a dead thread) must not hang.
        while drain:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == _ADD:
                with self._lock:
                    self._unadmitted -= 1
                cmd[1]._post([error])
        self._refresh()

    def _refresh(self) -> None:
        try:
            st = self.engine.stats()
        except Exception:
            log.exception("engine stats failed")
            return
        with self._lock:
            self._snapshot = st
            self._waiting = st.waiting
