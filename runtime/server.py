"""OpenAI-compatible HTTP server over an AsyncLLM (FastAPI; `lingli serve`).

    GET  /health                liveness
    GET  /v1/models             the one served model
    POST /v1/completions        text completion, streamed (SSE) or not
    POST /v1/chat/completions   chat completion, streamed (SSE) or not
    GET  /metrics               Prometheus text format

Errors use OpenAI's body: {"error": {"message", "type", "param", "code"}}.
Besides OpenAI's sampling fields the requests accept vLLM's extensions
top_k, min_p, repetition_penalty, ignore_eos and stop_token_ids; other
unknown fields are ignored. A client that disconnects has its engine
requests aborted, so their KV blocks return to the pool at once.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from .async_engine import AsyncLLM, EngineClosedError, RequestStream
from .chat import chat_prompt_ids
from .chat_template import PRESETS, preset_stop_strings
from .errors import ContextLengthError, LingliError, QueueFullError, SamplingError
from .sampler import SamplingParams

MAX_N = 16                   # most choices per request
DEFAULT_COMPLETION_TOKENS = 16   # OpenAI's default for /v1/completions
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list"}
_FIELD_HELP = {   # clearer than pydantic's message about the first member of a union
    "prompt": "prompt must be a string, a list of strings, a list of token ids or a list of "
              "token id lists",
    "stop": "stop must be a string or a list of strings",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = \
            status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# ---------------------------------------------------------------- requests
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool | None = False


class _Sampling(BaseModel):
    """Fields common to both endpoints. None means "the default"."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class ChatRequest(_Sampling):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    tools: list[Any] | None = None


def _check_ranges(r: _Sampling) -> None:
    def bad(param: str, why: str) -> APIError:
        return APIError(400, f"{param}={getattr(r, param)!r}: {why}", param=param)

    if r.temperature is not None and not 0.0 <= r.temperature <= 2.0:
        raise bad("temperature", "must be between 0 and 2")
    if r.top_p is not None and not 0.0 < r.top_p <= 1.0:
        raise bad("top_p", "must be in (0, 1]")
    if r.n is not None and not 1 <= r.n <= MAX_N:
        raise bad("n", f"must be between 1 and {MAX_N}")
    for p in ("presence_penalty", "frequency_penalty"):
        if getattr(r, p) is not None and not -2.0 <= getattr(r, p) <= 2.0:
            raise bad(p, "must be between -2 and 2")
    for p in ("max_tokens", "max_completion_tokens"):
        if getattr(r, p, None) is not None and getattr(r, p) < 1:
            raise bad(p, "must be at least 1")
    if r.seed is not None and r.seed < 0:
        raise bad("seed", "must be >= 0")


def _sampling_params(r: _Sampling, max_tokens: int, seed: int | None,
                     extra_stop: Sequence[str] = ()) -> SamplingParams:
    stop = [r.stop] if isinstance(r.stop, str) else list(r.stop or [])
    given = {k: getattr(r, k) for k in ("temperature", "top_p", "presence_penalty",
                                        "frequency_penalty", "top_k", "min_p",
                                        "repetition_penalty", "ignore_eos", "stop_token_ids")
             if getattr(r, k) is not None}
    try:
        return SamplingParams(max_tokens=max_tokens, seed=seed,
                              stop=list(dict.fromkeys(stop + list(extra_stop))), **given)
    except SamplingError as e:
        param = str(e).split("=", 1)[0].removeprefix("SamplingParams.")
        raise APIError(400, str(e), param=param if param in given or param == "stop" else None)


# ------------------------------------------------------------------ engine
def _engine_error(e: Exception, param: str | None = None) -> APIError:
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), type="rate_limit_error", code="queue_full")
    if isinstance(e, EngineClosedError):
        return APIError(503, str(e), type="server_error", code="engine_closed")
    if isinstance(e, ContextLengthError):
        return APIError(400, str(e), param=param, code="context_length_exceeded")
    if isinstance(e, LingliError):
        return APIError(400, str(e), param=param)
    return APIError(500, f"internal error: {e!r}", type="server_error")


async def _submit_all(llm: AsyncLLM, jobs: list[tuple[Any, SamplingParams]], base_id: str,
                      param: str) -> list[RequestStream]:
    """Submit every job; if any is refused, abort the others and raise its error."""
    results = await asyncio.gather(
        *(llm.submit(prompt, params, f"{base_id}-{i}") for i, (prompt, params) in enumerate(jobs)),
        return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for r in results:
            if isinstance(r, RequestStream):
                r.close()
        if isinstance(errors[0], asyncio.CancelledError):
            raise errors[0]
        raise _engine_error(errors[0], param)
    return results


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, output) from all streams as they arrive; closing it aborts the rest."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                q.put_nowait((i, out))
        except Exception as e:
            q.put_nowait((i, e))
        finally:
            q.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(streams)
        while live:
            i, item = await q.get()
            if item is None:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.close()


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work) -> Any:
    """Run `work`; cancel it (aborting its engine requests) if the client goes away."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        return None
    finally:
        for t in (task, watch):
            t.cancel()


# -------------------------------------------------------------- responses
def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _Tally:
    """Token counts of a request's choices; a prompt shared by n choices counts once."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.prompt: dict[int, int] = {}
        self.completion: dict[int, int] = {}

    def add(self, index: int, out: Any) -> None:
        self.prompt[index // self.n] = out.prompt_tokens
        self.completion[index] = out.completion_tokens

    def usage(self) -> dict:
        return _usage(sum(self.prompt.values()), sum(self.completion.values()))


# -------------------------------------------------------------------- app
def create_app(async_llm: AsyncLLM, model_name: str, api_key: str | None = None,
               chat_template: str | None = None) -> FastAPI:
    """The FastAPI app serving `async_llm` as `model_name`.

    api_key: when set, /v1/* requires ``Authorization: Bearer <api_key>``.
    chat_template: a preset name (runtime.chat_template); default: the
        checkpoint's own template, else "raw".
    """
    if chat_template is not None and chat_template not in PRESETS:
        raise LingliError(f"unknown chat template preset {chat_template!r}; known: "
                          f"{', '.join(PRESETS)}")
    llm = async_llm.llm
    tok = getattr(llm, "tokenizer", None)
    max_model_len = getattr(llm, "max_model_len", None)
    preset = chat_template
    if preset is None and tok is not None and not tok.chat_template:
        preset = "raw"
    template = None if preset else getattr(tok, "chat_template", None)
    chat_stops = preset_stop_strings(preset) if preset else []
    started = int(time.time())

    app = FastAPI(title="Lingli", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        err = (e.errors() or [{}])[0]
        # Drop "body" and pydantic's union-member tags ("str", "list[int]") from the path.
        loc = [str(x) for x in err.get("loc", ())
               if x != "body" and not (isinstance(x, str) and (x in _TYPE_TAGS or "[" in x))]
        if err.get("type") == "json_invalid":
            return APIError(400, f"the request body is not valid JSON: {err.get('msg')}",
                            code="invalid_json").response()
        where = ".".join(loc) or "body"
        msg = _FIELD_HELP.get(where) or f"{where}: {err.get('msg', 'invalid')}"
        return APIError(400, msg, param=loc[0] if loc else None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return APIError(e.status_code, str(e.detail),
                        code="not_found" if e.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {e!r}", type="server_error").response()

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 api_key.encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                           type="invalid_request_error", code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                                f"{model_name!r}", param="model", code="model_not_found")

    @app.get("/health")
    async def health() -> Response:
        if async_llm.closed:
            return APIError(503, "the engine is shut down", type="server_error").response()
        return PlainTextResponse("ok")

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": started, "owned_by": "lingli"}
        if max_model_len:
            card["max_model_len"] = max_model_len
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(_metrics_text(async_llm),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        _check_ranges(body)
        _refuse_unsupported(body, ("echo", "logprobs", "suffix"))
        n = body.n or 1
        if body.best_of not in (None, 1, n):
            raise APIError(400, "best_of other than n is not supported", param="best_of")
        prompts = _prompt_list(body.prompt)
        max_tokens = body.max_tokens or DEFAULT_COMPLETION_TOKENS
        jobs = [(p, _sampling_params(body, max_tokens, _seed(body.seed, i)))
                for p in prompts for i in range(n)]
        return await _respond(request, body, jobs, n, "prompt", chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(body: ChatRequest, request: Request) -> Response:
        check_model(body.model)
        _check_ranges(body)
        _refuse_unsupported(body, ("logprobs", "tools"))
        if tok is None:
            raise APIError(400, "this model has no tokenizer, so it cannot chat")
        try:
            ids = chat_prompt_ids(tok, _messages(body.messages), template, preset)
        except ValueError as e:   # bad messages or a template error
            raise APIError(400, str(e), param="messages")
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:     # OpenAI: up to the context window
            max_tokens = max(1, (max_model_len or len(ids) + 1) - len(ids))
        n = body.n or 1
        jobs = [(ids, _sampling_params(body, max_tokens, _seed(body.seed, i), chat_stops))
                for i in range(n)]
        return await _respond(request, body, jobs, n, "messages", chat=True)

    async def _respond(request: Request, body: _Sampling, jobs: list, n: int, param: str,
                       chat: bool) -> Response:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        streams = await _submit_all(async_llm, jobs, rid, param)
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(streams, head, n, chat, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        result = await _unless_disconnected(request, _collect(streams, head, n, chat))
        if result is None:      # the client went away; its requests were aborted
            return Response(status_code=499)
        return JSONResponse(result)

    return app


def _refuse_unsupported(body: BaseModel, fields: Sequence[str]) -> None:
    """Fields that would change the answer's meaning get a 400, never silence."""
    for f in fields:
        if getattr(body, f, None):
            raise APIError(400, f"{f} is not supported", param=f)


def _seed(seed: int | None, i: int) -> int | None:
    return None if seed is None else seed + i


def _prompt_list(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    if isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


def _messages(messages: list[dict[str, Any]]) -> list[dict]:
    """OpenAI messages -> {role, content: str}; content parts must be text."""
    out = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role == "developer":   # OpenAI's newer name for the system message
            role = "system"
        if content is None:
            content = ""
        elif isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" \
                        or not isinstance(part.get("text"), str):
                    raise APIError(400, f"messages[{i}].content: only text parts are supported",
                                   param="messages")
                texts.append(part["text"])
            content = "".join(texts)
        out.append({"role": role, "content": content})
    return out


async def _collect(streams: list[RequestStream], head: dict, n: int, chat: bool) -> dict:
    texts = [[] for _ in streams]
    reasons: list[str | None] = [None] * len(streams)
    tally = _Tally(n)
    try:
        async for i, out in _merge(streams):
            texts[i].append(out.new_text)
            tally.add(i, out)
            if out.finished:
                reasons[i] = out.finish_reason
    except Exception as e:
        raise _engine_error(e)
    choices = []
    for i, parts in enumerate(texts):
        text = "".join(parts)
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": text},
                            "logprobs": None, "finish_reason": reasons[i]})
        else:
            choices.append({"index": i, "text": text, "logprobs": None,
                            "finish_reason": reasons[i]})
    return {**head, "choices": choices, "usage": tally.usage()}


async def _stream(streams: list[RequestStream], head: dict, n: int, chat: bool,
                  include_usage: bool) -> AsyncIterator[str]:
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    extra = {"usage": None} if include_usage else {}
    tally = _Tally(n)

    def chunk(i: int, text: str | None, reason: str | None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else \
                ({"content": text} if text else {})
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}
        return _sse({**head, "choices": [choice], **extra})

    try:
        if chat:
            for i in range(len(streams)):
                yield chunk(i, None, None, role=True)
        async for i, out in _merge(streams):
            tally.add(i, out)
            if out.new_text or out.finished:
                yield chunk(i, out.new_text, out.finish_reason if out.finished else None)
    except Exception as e:
        yield _sse(_engine_error(e).body())
    else:
        if include_usage:
            yield _sse({**head, "choices": [], "usage": tally.usage()})
    yield "data: [DONE]\n\n"


# ----------------------------------------------------------------- metrics
_METRICS = [
    # name, type, help, value(stats, async_llm)
    ("lingli_requests_running", "gauge", "Requests in the running batch.",
     lambda s, a: s.running),
    ("lingli_requests_waiting", "gauge", "Requests waiting to run (queued included).",
     lambda s, a: s.waiting),
    ("lingli_kv_cache_usage_ratio", "gauge", "Fraction of KV cache blocks in use.",
     lambda s, a: s.kv_usage),
    ("lingli_kv_blocks_total", "gauge", "KV cache blocks in the pool.",
     lambda s, a: s.kv_blocks_total),
    ("lingli_kv_blocks_used", "gauge", "KV cache blocks held by requests.",
     lambda s, a: s.kv_blocks_used),
    ("lingli_kv_blocks_cached", "gauge", "Free KV cache blocks kept for prefix reuse.",
     lambda s, a: s.kv_blocks_cached),
    ("lingli_generation_tokens_per_second", "gauge",
     "Generated tokens per second over the last 10 s.",
     lambda s, a: a.generation_tokens_per_second()),
    ("lingli_prompt_tokens_total", "counter", "Prompt tokens prefilled.",
     lambda s, a: s.prompt_tokens_total),
    ("lingli_generation_tokens_total", "counter", "Tokens generated.",
     lambda s, a: s.generation_tokens_total),
    ("lingli_preemptions_total", "counter", "Requests preempted for lack of KV blocks.",
     lambda s, a: s.preemptions_total),
    ("lingli_prefix_cache_hit_tokens_total", "counter",
     "Prompt tokens whose KV blocks came from the prefix cache.",
     lambda s, a: getattr(s, "prefix_cache_hit_tokens", 0)),
]


def _metrics_text(async_llm: AsyncLLM) -> str:
    stats = async_llm.stats()
    lines = []
    for name, kind, help_, value in _METRICS:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}",
                  f"{name} {_num(value(stats, async_llm))}"]
    return "\n".join(lines) + "\n"


def _num(x: float) -> str:
    return str(int(x)) if isinstance(x, int) or float(x).is_integer() else repr(float(x))
