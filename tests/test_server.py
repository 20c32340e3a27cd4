"""The OpenAI-compatible server, driven over real HTTP by the `openai` client.

uvicorn runs in a background thread on a free loopback port. The model
(serving_helpers.make_bigram_llama) writes Chinese characters that are not in
its vocabulary, byte piece by byte piece, so streaming has to hold partial
characters back. Requests that must stay "in flight" are held by a gated
engine, never by timing.
"""
from __future__ import annotations

import asyncio
import json
import socket

import httpx
import openai
import pytest

from runtime import LLM, SamplingParams
from runtime.async_engine import AsyncLLM
from runtime.chat import chat_prompt_ids
from runtime.server import MAX_N, create_app
from runtime.tokenizer import Tokenizer
from serving_helpers import GatedEngine, ServerThread, has_cjk, make_bigram_llama, wait_until

MODEL = "tiny-bigram"
KEY = "sk-test-key"
CTX = 512


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    return make_bigram_llama(root / "m", root, max_positions=CTX)


class Served:
    def __init__(self, model_dir, max_queue: int, api_key: str | None, max_num_seqs: int = 8):
        self.llm = LLM(str(model_dir), progress=False, max_num_seqs=max_num_seqs)
        self.tok = self.llm.tokenizer
        self.engine = GatedEngine(self.llm.engine())
        self.async_llm = AsyncLLM(self.engine, max_queue=max_queue, llm=self.llm)
        self.http = ServerThread(create_app(self.async_llm, MODEL, api_key=api_key))
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def __enter__(self) -> "Served":
        self.http.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.engine.release()
        self.http.__exit__(*exc)
        self.async_llm.close()

    @property
    def url(self) -> str:
        return self.http.url

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=120,
                             **kw)

    def post(self, path: str, body, **kw) -> httpx.Response:
        data = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return httpx.post(self.url + path, content=data, timeout=60,
                          headers={"Content-Type": "application/json", **self.headers}, **kw)

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=60).text)


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, value = line.split(" ")
        out[name] = float(value)
    return out


@pytest.fixture(scope="module")
def served(model_dir):
    with Served(model_dir, max_queue=64, api_key=KEY) as s:
        yield s


@pytest.fixture(autouse=True)
def _idle_after(request):
    """Every test leaves the server idle: no request running and every block back."""
    yield
    if "served" in request.fixturenames:
        s = request.getfixturevalue("served")
        s.engine.release()
        wait_until(lambda: (m := s.metrics())["lingli_kv_blocks_used"] == 0
                   and m["lingli_requests_running"] == 0, "the server to go idle")


def _greedy(**kw) -> dict:
    return {"temperature": 0, **kw}


# --------------------------------------------------------------- basics
def test_health_and_models(served):
    assert httpx.get(served.url + "/health").text == "ok"
    models = served.client().models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_usage_and_length(served):
    c = served.client()
    prompt = "你好 hello world"
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=9, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == MODEL and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(served.tok.encode(prompt))
    assert r.usage.completion_tokens == 9
    assert r.usage.total_tokens == r.usage.prompt_tokens + 9
    assert has_cjk(r.choices[0].text)


def test_completion_token_id_prompts_and_batches(served):
    c = served.client()
    ids = served.tok.encode("你好")
    texts = []
    for prompt in ([ids, ids], ["你好", "你好"], ids):
        r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=6, **_greedy(),
                                 extra_body={"ignore_eos": True})
        n = 1 if prompt is ids else 2
        assert [ch.index for ch in r.choices] == list(range(n))
        assert r.usage.prompt_tokens == n * len(ids) and r.usage.completion_tokens == 6 * n
        texts += [ch.text for ch in r.choices]
    assert len(set(texts)) == 1 and has_cjk(texts[0])


def test_chat_usage_and_content(served):
    c = served.client()
    messages = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"}]
    r = c.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=8,
                                  temperature=0, extra_body={"ignore_eos": True})
    expected_prompt = chat_prompt_ids(served.tok, messages, None, "raw")  # no template: raw
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(expected_prompt)
    assert r.usage.completion_tokens == 8
    assert has_cjk(r.choices[0].message.content)


def test_chat_default_max_tokens_fills_the_context(served):
    r = served.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "你好"}],
                                             "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    u = r.json()["usage"]
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert u["prompt_tokens"] + u["completion_tokens"] == CTX


def test_stop_strings(served):
    c = served.client()
    full = c.completions.create(model=MODEL, prompt="你好", max_tokens=24, **_greedy(),
                                extra_body={"ignore_eos": True}).choices[0].text
    cut = full.index("囍")
    assert cut > 0
    r = c.completions.create(model=MODEL, prompt="你好", max_tokens=24, stop="囍", **_greedy(),
                             extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[:cut] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 24
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "你好"}],
                                  max_tokens=24, stop=["界", "囍"], temperature=0)
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and "界" not in text and "囍" not in text
    # The same prompt without stop strings does contain them.
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "你好"}],
                                  max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].message.content.startswith(text + "界")


def test_unknown_fields_are_ignored(served):
    r = served.post("/v1/completions", {"prompt": "你好", "max_tokens": 2, "frobnicate": [1],
                                        "user": "x", "logit_bias": {}})
    assert r.status_code == 200, r.text


# ------------------------------------------------------------ streaming
def _stream_texts(stream, chat: bool) -> tuple[dict[int, list[str]], dict[int, str], list]:
    pieces: dict[int, list[str]] = {}
    reasons: dict[int, str] = {}
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        for ch in chunk.choices:
            text = (ch.delta.content if chat else ch.text) or ""
            pieces.setdefault(ch.index, []).append(text)
            if ch.finish_reason:
                reasons[ch.index] = ch.finish_reason
    return pieces, reasons, chunks


def _check_pieces(pieces: list[str], full: str) -> None:
    """Each streamed piece is whole characters: it equals the full text at its place."""
    assert "".join(pieces) == full
    at = 0
    for p in pieces:
        for k, ch in enumerate(p):
            if ch == "\ufffd":
                assert full[at + k] == "\ufffd"
        at += len(p)


@pytest.fixture(scope="module")
def reference(model_dir):
    """A second LLM with its own engine: offline results to hold the server's against."""
    return LLM(str(model_dir), progress=False)


@pytest.mark.parametrize("seed", [1, 2, 5])
def test_streamed_chinese_is_whole_characters(served, reference, seed):
    c = served.client()
    kw = dict(model=MODEL, prompt="你好", max_tokens=40, temperature=1.0, seed=seed,
              extra_body={"ignore_eos": True})
    full = c.completions.create(**kw).choices[0].text
    ref = reference.generate("你好", SamplingParams(max_tokens=40, temperature=1.0, seed=seed,
                                                    ignore_eos=True))[0]
    # The text is the tokens' decode: a character split over byte tokens arrives whole.
    assert full == ref.text == served.tok.decode(ref.token_ids)
    assert "龘" in full or "囍" in full          # built from <0xXX> byte pieces
    pieces, reasons, _ = _stream_texts(c.completions.create(stream=True, **kw), chat=False)
    _check_pieces(pieces[0], full)
    assert reasons == {0: "length"}
    # Partial characters were held back: some piece holds a character that took 3 tokens.
    assert any(("龘" in p or "囍" in p) for p in pieces[0])


def test_streamed_bytes_are_valid_utf8_sse(served):
    """At the wire: every SSE event is complete UTF-8 JSON, then [DONE]."""
    body = {"prompt": "你好", "max_tokens": 30, "temperature": 1.0, "seed": 1, "stream": True,
            "ignore_eos": True}
    events = []
    with httpx.stream("POST", served.url + "/v1/completions", json=body, headers=served.headers,
                      timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        buf = b""
        for raw in r.iter_raw():
            buf += raw
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                assert event.startswith(b"data: ")
                events.append(event[6:].decode("utf-8", errors="strict"))
    assert buf == b"" and events[-1] == "[DONE]"
    texts = [json.loads(e)["choices"][0]["text"] for e in events[:-1]]
    assert has_cjk("".join(texts))


def test_chat_stream_equals_non_stream(served):
    c = served.client()
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "你好"}], max_tokens=30,
              temperature=1.0, seed=7, n=2, extra_body={"ignore_eos": True})
    full = c.chat.completions.create(**kw)
    pieces, reasons, chunks = _stream_texts(c.chat.completions.create(stream=True, **kw),
                                            chat=True)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    for choice in full.choices:
        _check_pieces(pieces[choice.index], choice.message.content)
        assert reasons[choice.index] == choice.finish_reason == "length"
    assert any(ch in full.choices[0].message.content for ch in "龘囍")   # from byte pieces


def test_stream_include_usage(served):
    c = served.client()
    stream = c.completions.create(model=MODEL, prompt="你好", max_tokens=5, stream=True,
                                  stream_options={"include_usage": True}, **_greedy(),
                                  extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert all(ch.usage is None for ch in chunks[:-1])
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.prompt_tokens == len(served.tok.encode("你好"))
    assert last.usage.completion_tokens == 5 and last.usage.total_tokens == 5 + 3


def test_n_choices_with_seeds(served):
    c = served.client()
    kw = dict(model=MODEL, prompt="你好", max_tokens=20, temperature=1.0,
              extra_body={"ignore_eos": True})
    r = c.completions.create(n=3, seed=11, **kw)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert r.usage.prompt_tokens == len(served.tok.encode("你好"))   # counted once
    assert r.usage.completion_tokens == 60
    # Choice i is the request with seed + i.
    for i, ch in enumerate(r.choices):
        assert ch.text == c.completions.create(seed=11 + i, **kw).choices[0].text


def test_concurrent_streaming_clients(served):
    before = served.metrics()

    async def one(c: openai.AsyncOpenAI, i: int) -> tuple[int, str, str]:
        stream = await c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"你好 {i}"}], max_tokens=10 + i % 5,
            temperature=1.0, seed=i, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        text, reason, usage = [], None, None
        async for chunk in stream:
            for ch in chunk.choices:
                text.append(ch.delta.content or "")
                reason = ch.finish_reason or reason
            usage = chunk.usage or usage
        return usage.completion_tokens, reason, "".join(text)

    async def main():
        async with openai.AsyncOpenAI(base_url=served.url + "/v1", api_key=KEY,
                                      max_retries=0, timeout=300) as c:
            return await asyncio.gather(*(one(c, i) for i in range(32)))

    results = asyncio.run(main())
    for i, (n_tokens, reason, text) in enumerate(results):
        assert (n_tokens, reason) == (10 + i % 5, "length")
        assert text
    after = served.metrics()
    assert after["lingli_generation_tokens_total"] - before["lingli_generation_tokens_total"] \
        >= sum(10 + i % 5 for i in range(32))


# ---------------------------------------------------------- disconnects
def _request_ids(served, prefix: str) -> list[str]:
    return [r for r in served.engine.aborted if r.startswith(prefix)]


def test_stream_disconnect_aborts_and_frees_blocks(served):
    served.engine.hold(6)   # far fewer steps than the request's 400 tokens
    body = {"prompt": "你好" * 40, "max_tokens": 400, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body, headers=served.headers,
                      timeout=60) as r:
        assert r.status_code == 200
        # Keep the line iterator alive: closing it would close the connection early.
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        rid = json.loads(first[6:])["id"]
        assert served.metrics()["lingli_kv_blocks_used"] > 0
        assert not _request_ids(served, rid)          # still running
    # The connection is closed; the engine resumes and the request must be aborted.
    served.engine.release()
    wait_until(lambda: _request_ids(served, rid), "the abort")
    wait_until(lambda: served.metrics()["lingli_kv_blocks_used"] == 0, "blocks to return")
    assert f"{rid}-0" not in served.engine.finished


def test_non_stream_disconnect_aborts(served):
    served.engine.hold(3)
    body = json.dumps({"prompt": "你好" * 40, "max_tokens": 400, "temperature": 0,
                       "ignore_eos": True}).encode()
    before = set(served.engine.aborted)
    with socket.create_connection(("127.0.0.1", served.http.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\n".encode()
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_until(lambda: served.engine.blocked, "the request to be running")
    served.engine.release()
    new = wait_until(lambda: set(served.engine.aborted) - before, "the abort")
    wait_until(lambda: served.metrics()["lingli_kv_blocks_used"] == 0, "blocks to return")
    assert not any(r in served.engine.finished for r in new)


# ---------------------------------------------------------------- errors
BAD = [
    # (path, body, status, param)
    ("/v1/completions", "{not json", 400, None),
    ("/v1/completions", "[1, 2]", 400, None),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": {"a": 1}}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "n": MAX_N + 1}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "seed": -1}, 400, "seed"),
    ("/v1/completions", {"prompt": [999999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "你好" * CTX}, 400, "prompt"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "nope"},
     404, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "好" * 2 * CTX}]},
     400, "messages"),
]


@pytest.mark.parametrize("path,body,status,param", BAD,
                         ids=[f"{i}-{b[3] or 'body'}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_errors(served, path, body, status, param):
    r = served.post(path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and err["type"]
    assert err["param"] == param


def test_context_length_error_code(served):
    r = served.post("/v1/completions", {"prompt": "你好" * CTX})
    assert r.json()["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        served.client().completions.create(model=MODEL, prompt="x", temperature=3)
    with pytest.raises(openai.NotFoundError):
        served.client().completions.create(model="nope", prompt="x")


def test_unknown_route_is_404_with_error_body(served):
    r = httpx.get(served.url + "/v1/nothing", headers=served.headers)
    assert r.status_code == 404 and "error" in r.json()


def test_api_key(served):
    body = {"prompt": "x", "max_tokens": 1}
    assert httpx.post(served.url + "/v1/completions", json=body).status_code == 401
    r = httpx.post(served.url + "/v1/completions", json=body,
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(served.url + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.url + "/v1", api_key="wrong",
                      max_retries=0).models.list()
    assert served.post("/v1/completions", body).status_code == 200
    assert httpx.get(served.url + "/health").status_code == 200   # open: load balancers


# --------------------------------------------------------------- metrics
def test_metrics_parse_and_move(served):
    names = ["lingli_requests_running", "lingli_requests_waiting",
             "lingli_kv_cache_usage_ratio", "lingli_kv_blocks_total", "lingli_kv_blocks_used",
             "lingli_kv_blocks_cached", "lingli_generation_tokens_per_second",
             "lingli_prompt_tokens_total", "lingli_generation_tokens_total",
             "lingli_preemptions_total"]
    text = httpx.get(served.url + "/metrics").text
    for name in names:
        assert f"# TYPE {name} " in text
    before = parse_metrics(text)
    assert set(names) <= set(before)
    assert before["lingli_kv_blocks_total"] > 0
    served.client().completions.create(model=MODEL, prompt="你好 metrics", max_tokens=7,
                                       extra_body={"ignore_eos": True})
    after = served.metrics()
    assert after["lingli_generation_tokens_total"] - before["lingli_generation_tokens_total"] == 7
    assert after["lingli_prompt_tokens_total"] > before["lingli_prompt_tokens_total"]
    assert after["lingli_generation_tokens_per_second"] > 0


def test_metrics_show_a_running_request(served):
    served.engine.hold(2)
    body = {"prompt": "你好" * 20, "max_tokens": 50, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body, headers=served.headers,
                      timeout=60) as r:
        assert r.status_code == 200
        wait_until(lambda: served.engine.blocked, "the engine to hold")
        m = served.metrics()
        assert m["lingli_requests_running"] == 1
        assert m["lingli_kv_blocks_used"] > 0 and 0 < m["lingli_kv_cache_usage_ratio"] < 1
        served.engine.release()
        r.read()


# ------------------------------------------------------------ admission
def test_queue_full_is_429(model_dir):
    with Served(model_dir, max_queue=2, api_key=None) as s:
        s.engine.hold(0)        # nothing runs: every request waits
        body = {"prompt": "你好", "max_tokens": 3, "ignore_eos": True}

        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                waiting = [asyncio.create_task(c.post("/v1/completions", json=body))
                           for _ in range(2)]
                while s.async_llm.stats().waiting < 2:
                    await asyncio.sleep(0.01)
                full = await c.post("/v1/completions", json=body)
                s.engine.release()
                return full, await asyncio.gather(*waiting)

        full, done = asyncio.run(main())
        assert full.status_code == 429
        err = full.json()["error"]
        assert err["code"] == "queue_full" and "max_queue=2" in err["message"]
        assert [d.status_code for d in done] == [200, 200]
        assert all(d.json()["usage"]["completion_tokens"] == 3 for d in done)
        # The openai client sees the 429 as RateLimitError.
        s.engine.hold(0)
        with pytest.raises(openai.RateLimitError):
            _fill_and_overflow(s)


def _fill_and_overflow(s: Served) -> None:
    """Two requests waiting (in threads), then a third through the openai client."""
    import threading

    def post():
        httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=60)

    threads = [threading.Thread(target=post, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    wait_until(lambda: s.async_llm.stats().waiting >= 2, "two waiting requests")
    try:
        openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0,
                      timeout=60).completions.create(model=MODEL, prompt="x", max_tokens=1)
    finally:
        s.engine.release()
        for t in threads:
            t.join(60)


# ------------------------------------------------------------ lingli serve
def test_serve_command_defaults_and_imports():
    import subprocess
    import sys

    from runtime.cli import build_parser

    a = build_parser().parse_args(["serve", "some/model"])
    assert (a.model, a.host, a.port, a.api_key, a.max_queue) == \
        ("some/model", "127.0.0.1", 8000, None, 256)
    # Only `serve` needs fastapi; nothing on the CPU path imports torch.
    code = ("import sys, runtime.cli; runtime.cli.build_parser(); import runtime.async_engine; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_serve_command_end_to_end(model_dir):
    """`python -m runtime serve` answers an OpenAI client, then exits on SIGINT."""
    import signal
    import subprocess
    import sys

    with socket.socket() as sock:       # a free port (released just before the server binds)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime", "serve", str(model_dir), "--port", str(port),
         "--api-key", KEY, "--served-model-name", "served", "--max-num-seqs", "4",
         "--kv-cache-gb", "0.05", "--chat-template", "linly"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def up():
            if proc.poll() is not None:
                raise AssertionError(f"lingli serve exited: {proc.stdout.read()}")
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
            except httpx.TransportError:
                return False
        wait_until(up, "lingli serve to start", timeout=120, interval=0.2)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0,
                          timeout=120)
        assert [m.id for m in c.models.list().data] == ["served"]
        r = c.chat.completions.create(model="served", max_tokens=4, temperature=0,
                                      messages=[{"role": "user", "content": "你好"}])
        # The linly preset: "User:你好\n", then the answer.
        tok = Tokenizer.from_dir(model_dir)
        assert r.usage.prompt_tokens == len(tok.encode("User:你好\n"))
        assert r.usage.completion_tokens <= 4
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0
