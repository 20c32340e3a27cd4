"""AsyncLLM alone: streaming, errors, abort on consumer exit, the admission queue, close."""
from __future__ import annotations

import asyncio

import pytest

from runtime import LLM, SamplingParams
from runtime.async_engine import AsyncLLM, EngineClosedError
from runtime.errors import ContextLengthError, LingliError, QueueFullError
from serving_helpers import GatedEngine, make_bigram_llama, wait_until

LONG = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("async")
    return make_bigram_llama(root / "m", root)


@pytest.fixture
def llm(model_dir):
    """A fresh LLM (and so a fresh engine and KV pool) per test: tiny, loads at once."""
    return LLM(str(model_dir), progress=False, max_num_seqs=4)


@pytest.fixture
def gated(llm):
    eng = GatedEngine(llm.engine())
    a = AsyncLLM(eng, max_queue=2, llm=llm)
    yield a, eng
    eng.release()
    a.close()
    assert eng.engine.num_free_blocks() == eng.engine.cache.num_blocks


async def _collect(a: AsyncLLM, prompt, params, rid=None):
    return [o async for o in a.generate(prompt, params, rid)]


def test_generate_streams_whole_request(gated, llm):
    a, eng = gated
    p = SamplingParams(temperature=1.0, seed=3, max_tokens=24, ignore_eos=True)

    async def main():
        return await asyncio.gather(_collect(a, "你好", p), _collect(a, "你好", p))

    outs1, outs2 = asyncio.run(main())
    for outs in (outs1, outs2):
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        assert not any(o.finished for o in outs[:-1])
        assert sum(len(o.new_token_ids) for o in outs) == 24 == outs[-1].completion_tokens
        assert outs[-1].prompt_tokens == len(llm.tokenizer.encode("你好"))
    # Same seed, same prompt: same text, also when batched together.
    assert "".join(o.new_text for o in outs1) == "".join(o.new_text for o in outs2)
    assert a.stats().generation_tokens_total >= 48
    assert a.generation_tokens_per_second() > 0
    wait_until(lambda: a.stats().kv_blocks_used == 0, "blocks to return")


def test_add_request_errors_reach_the_caller(gated, llm):
    a, _ = gated

    async def main():
        with pytest.raises(ContextLengthError):
            await _collect(a, [5] * (llm.max_model_len + 1), SamplingParams(max_tokens=4))
        with pytest.raises(LingliError, match="vocabulary"):
            await _collect(a, [10 ** 7], SamplingParams(max_tokens=4))
        s = await asyncio.wait_for(a.submit("你好", LONG, "dup"), 60)
        try:
            with pytest.raises(LingliError, match="already"):
                await asyncio.wait_for(a.submit("你好", LONG, "dup"), 60)
        finally:
            await s.aclose()
        # The engine still serves after the errors.
        outs = await _collect(a, "你好", SamplingParams(temperature=0, max_tokens=3,
                                                        ignore_eos=True))
        assert outs[-1].completion_tokens == 3

    asyncio.run(main())


def test_consumer_exit_aborts_and_frees_blocks(gated):
    a, eng = gated
    eng.hold(8)     # the request cannot reach its 400 tokens before it is abandoned

    async def main():
        got = 0
        gen = a.generate("你好" * 30, LONG, "quitter")
        async for out in gen:
            got += len(out.new_token_ids)
            if got >= 2:
                break
        await gen.aclose()
        return got

    assert asyncio.run(main()) >= 2
    eng.release()
    wait_until(lambda: "quitter" in eng.aborted, "the abort")
    wait_until(lambda: a.stats().kv_blocks_used == 0 and a.stats().running == 0,
               "blocks to return")
    assert "quitter" not in eng.finished       # aborted, never ran to its length


def test_cancelled_consumer_aborts(gated):
    a, eng = gated
    eng.hold(4)

    async def main():
        first = asyncio.Event()

        async def consume():
            async for _ in a.generate("你好", LONG, "cancelled"):
                first.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    eng.release()
    wait_until(lambda: "cancelled" in eng.aborted, "the abort")
    wait_until(lambda: a.stats().kv_blocks_used == 0, "blocks to return")
    assert "cancelled" not in eng.finished


def test_queue_full_raises_at_once(gated):
    a, eng = gated        # max_queue=2
    eng.hold(0)           # nothing runs: every request stays waiting

    async def main():
        s1 = await a.submit("你好", SamplingParams(max_tokens=2), "q1")   # taken, engine waiting
        t2 = asyncio.create_task(a.submit("你好", SamplingParams(max_tokens=2), "q2"))
        await asyncio.sleep(0)           # q2 is queued, not yet taken (the thread is held)
        assert a.stats().waiting == 2
        with pytest.raises(QueueFullError, match="max_queue=2"):
            # No wait needed: the refusal comes before the engine thread is involved.
            await asyncio.wait_for(a.submit("你好", SamplingParams(max_tokens=2), "q3"), 60)
        eng.release()
        s2 = await asyncio.wait_for(t2, 60)
        outs = [[o async for o in s] for s in (s1, s2)]
        return outs

    outs = asyncio.run(main())
    assert [o[-1].finish_reason for o in outs] == ["length", "length"]


def test_close_fails_open_streams_and_new_requests(llm):
    eng = GatedEngine(llm.engine())
    a = AsyncLLM(eng, max_queue=4, llm=llm)
    eng.hold(2)

    async def main():
        s = await a.submit("你好", LONG, "open")
        closer = asyncio.get_running_loop().run_in_executor(None, a.close)
        wait_until(lambda: a.closed, "close to start")
        eng.release()
        await closer
        with pytest.raises(EngineClosedError):
            async for _ in s:
                pass
        with pytest.raises(EngineClosedError):
            await a.submit("你好", LONG)

    asyncio.run(main())
    assert "open" in eng.aborted
    assert eng.engine.num_free_blocks() == eng.engine.cache.num_blocks
    assert not a._thread.is_alive()
