"""Continuous batching engine: batch == alone, preemption by recompute, prefix sharing,
cancellation, and every block back in the pool after a random workload.

The exact token comparisons between different batch compositions run with a
float32 KV cache (EXACT). The kernels are not batch-invariant in the last bits
(a tile of four rows sums in another order than one row), and a float16 cache
can round such a difference into one half-precision step, which on this tiny
random model sometimes flips a near-tie token; these tests check scheduling
and cache bookkeeping, not that rounding (tests/test_parity_transformers.py
bounds the float16 cache's error; the other tests here run on it).
"""
from __future__ import annotations

import numpy as np
import pytest

from runtime import LLM, SamplingParams
from runtime.errors import ContextLengthError, LingliError
from runtime.kv_cache import PagedKVCache
from tiny_model import make_tiny_llama

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
EXACT = dict(kv_cache_dtype="float32")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    return make_tiny_llama(root / "m", "sp", root, max_positions=256)


def _gb(llm_or_dir, tokens: int, kv_itemsize: int = 2) -> float:
    """kv_cache_gb that holds `tokens` tokens of the tiny model (block size 16;
    float16 KV unless kv_itemsize says otherwise)."""
    from runtime.config import ModelConfig
    cfg = ModelConfig.from_dir(llm_or_dir)
    per = PagedKVCache.bytes_per_block(cfg.num_layers, 16, cfg.num_kv_heads, cfg.head_dim,
                                       kv_itemsize)
    return (tokens // 16) * per / 2**30 + 1e-12


def _prompts(llm, n, seed=0, lo=1, hi=70):
    rng = np.random.default_rng(seed)
    vocab = llm.sample_vocab
    return [[int(t) for t in rng.integers(3, vocab, rng.integers(lo, hi))] for _ in range(n)]


@pytest.mark.parametrize("quant", [None, "int4"])
def test_batch_equals_each_alone(model_dir, quant):
    llm = LLM(str(model_dir), quant=quant, progress=False, max_num_batched_tokens=64, **EXACT)
    prompts = _prompts(llm, 7) + ["你好，世界", "hello"]
    alone = [llm.generate(p, GREEDY)[0] for p in prompts]
    together = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert [o.text for o in together] == [o.text for o in alone]
    assert llm.engine().stats().kv_blocks_used == 0


def test_generate_takes_params_per_prompt(model_dir):
    llm = LLM(str(model_dir))
    ps = [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
          SamplingParams(temperature=0.9, seed=5, max_tokens=9, ignore_eos=True)]
    a, b = llm.generate(["one", "two"], ps)
    assert len(a.token_ids) == 3 and len(b.token_ids) == 9
    assert b.token_ids == llm.generate("two", ps[1])[0].token_ids   # seeded: reproducible
    with pytest.raises(LingliError, match="2 SamplingParams for 3 prompts"):
        llm.generate(["a", "b", "c"], ps)


def test_preempted_requests_give_the_same_tokens(model_dir):
    # A pool of 8 blocks (128 tokens) for 6 requests of up to ~90 tokens each: the
    # scheduler must preempt and recompute. Greedy and seeded sampling both must match.
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=40, ignore_eos=True)]
    big = LLM(str(model_dir), max_model_len=128, **EXACT)
    small = LLM(str(model_dir), max_model_len=128, kv_cache_gb=_gb(model_dir, 128, 4), **EXACT)
    assert small.cache.num_blocks == 8
    prompts = _prompts(big, 6, seed=3, lo=20, hi=50)
    for p in params:
        want = [big.generate(q, p)[0].token_ids for q in prompts]
        got = small.generate(prompts, p)
        assert [o.token_ids for o in got] == want
    st = small.engine().stats()
    assert st.preemptions_total > 0
    assert st.kv_blocks_used == 0


def test_shared_prefix_same_output_fewer_blocks(model_dir):
    """Requests with a common 64-token prefix: same tokens as without the prefix cache,
    fewer blocks in use while both run, and the cache reports the hits."""
    results = {}
    for caching in (True, False):
        llm = LLM(str(model_dir), enable_prefix_caching=caching, **EXACT)
        eng = llm.engine()
        prefix = _prompts(llm, 1, seed=9, lo=64, hi=65)[0]
        eng.add_request("a", prefix + [5, 6, 7], GREEDY)
        outs = {"a": [], "b": []}
        for o in eng.step():                          # a's prefill: its full blocks get hashed
            outs[o.request_id] += o.new_token_ids
        eng.add_request("b", prefix + [9, 9], GREEDY)
        peak = 0
        while eng.has_unfinished_requests():
            for o in eng.step():
                outs[o.request_id] += o.new_token_ids
            peak = max(peak, eng.stats().kv_blocks_used)
        results[caching] = (outs, peak, eng.stats().prefix_cache_hit_tokens)
    (o1, peak1, hits1), (o0, peak0, hits0) = results[True], results[False]
    assert o1 == o0 and len(o1["b"]) == GREEDY.max_tokens
    assert hits1 == 64 and hits0 == 0
    assert peak1 == peak0 - 4                          # the 4 prefix blocks are shared


def test_abort_and_early_stream_exit_free_blocks(model_dir):
    llm = LLM(str(model_dir))
    eng = llm.engine()
    total = eng.stats().kv_blocks_total
    eng.add_request("x", "a long enough prompt for a couple of blocks " * 3, GREEDY)
    eng.add_request("y", "another", GREEDY)
    eng.step()
    assert eng.stats().kv_blocks_used > 0
    eng.abort_request("x")
    eng.abort_request("y")
    eng.abort_request("never-existed")                 # ignored
    assert not eng.has_unfinished_requests() and eng.num_free_blocks() == total
    it = llm.stream("stream then walk away", SamplingParams(max_tokens=50, ignore_eos=True))
    next(it)
    it.close()                                         # the caller stopped iterating
    assert eng.num_free_blocks() == total and eng.stats().kv_blocks_used == 0


def test_bad_requests(model_dir):
    llm = LLM(str(model_dir), max_model_len=256, kv_cache_gb=_gb(model_dir, 256))
    eng = llm.engine()
    eng.add_request("r", "hi", GREEDY)
    with pytest.raises(LingliError, match="already in use"):
        eng.add_request("r", "hi", GREEDY)
    with pytest.raises(ContextLengthError, match="context window is 256"):
        eng.add_request("long", [5] * 300, GREEDY)
    with pytest.raises(LingliError, match="not in the vocabulary"):
        eng.add_request("v", [10**6], GREEDY)
    with pytest.raises(LingliError, match="empty"):
        eng.add_request("e", [], GREEDY)
    eng.abort_request("r")
    with pytest.raises(LingliError, match="kv_cache_gb=.* holds 128 tokens, less than one context"):
        LLM(str(model_dir), max_model_len=256, kv_cache_gb=_gb(model_dir, 128))


def test_stop_strings_and_eos_finish_requests(model_dir):
    llm = LLM(str(model_dir))
    free = llm.generate(["abc"] * 2, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    text = free[0].text
    assert len(text) > 4
    stop = text[2:4]
    out = llm.generate("abc", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                             stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == text[:text.index(stop)]
    tok = free[0].token_ids[3]
    out = llm.generate("abc", SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[tok],
                                             ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.token_ids == free[0].token_ids[:4]


def test_random_workload_returns_every_block(model_dir):
    """1,000 requests of random lengths through a small pool, with random aborts at
    random points: preemptions happen, the pool stays consistent after every step,
    and when all is done every block is free."""
    llm = LLM(str(model_dir), max_model_len=128, kv_cache_gb=_gb(model_dir, 256),
              max_num_seqs=12, max_num_batched_tokens=96)
    eng = llm.engine()
    pool = llm.cache.allocator
    rng = np.random.default_rng(2024)
    vocab = llm.sample_vocab
    shared = [int(t) for t in rng.integers(3, vocab, 40)]
    live: set[str] = set()
    finished = aborted = 0
    for i in range(1000):
        n = int(rng.integers(1, 90))
        prompt = [int(t) for t in rng.integers(3, vocab, n)]
        if rng.random() < 0.3:                         # some share a prefix (cache hits)
            prompt = shared[:int(rng.integers(16, 40))] + prompt[:40]
        p = SamplingParams(temperature=float(rng.choice([0, 0.7])), seed=i,
                           max_tokens=int(rng.integers(1, 128 - len(prompt) + 1)),
                           ignore_eos=bool(rng.random() < 0.8))
        eng.add_request(str(i), prompt, p)
        live.add(str(i))
        for _ in range(int(rng.integers(0, 3))):
            for o in eng.step():
                if o.finished:
                    live.discard(o.request_id)
                    finished += 1
            pool.check()
        if live and rng.random() < 0.15:
            victim = sorted(live)[int(rng.integers(len(live)))]
            eng.abort_request(victim)
            live.discard(victim)
            aborted += 1
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                live.discard(o.request_id)
                finished += 1
        pool.check()
    st = eng.stats()
    assert not live and finished + aborted == 1000 and aborted > 50
    assert st.preemptions_total > 0 and st.prefix_cache_hit_tokens > 0
    assert st.kv_blocks_used == 0 and pool.num_free == pool.num_blocks
    assert int(pool.ref_counts.sum()) == 0


def test_failed_step_frees_the_batch(model_dir, monkeypatch):
    llm = LLM(str(model_dir))
    eng = llm.engine()
    eng.add_request("a", "some prompt text", GREEDY)
    eng.add_request("b", "other prompt", GREEDY)
    eng.step()

    def boom(*a, **k):
        raise RuntimeError("kernel failed")
    monkeypatch.setattr(llm.model, "forward", boom)
    with pytest.raises(RuntimeError, match="kernel failed"):
        eng.step()
    assert not eng.has_unfinished_requests() and not eng.requests
    assert eng.stats().kv_blocks_used == 0
    monkeypatch.undo()
    assert len(llm.generate("again", GREEDY)[0].token_ids) == GREEDY.max_tokens


def test_kv_waste_is_the_last_partial_blocks(model_dir):
    """Waste = reserved-but-empty slots: at most one partly filled block per sequence."""
    llm = LLM(str(model_dir), max_num_seqs=8)
    eng = llm.engine()
    rng = np.random.default_rng(5)
    for i in range(8):
        eng.add_request(str(i), _prompts(llm, 1, seed=i, lo=5, hi=90)[0],
                        SamplingParams(temperature=0, max_tokens=int(rng.integers(5, 60)),
                                       ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
        running = [r.kv for r in eng.scheduler.running]
        st = eng.blocks.stats(running)
        assert st.reserved_slots - st.filled_slots <= 16 * len(running) - len(running)
        assert st.reserved_slots == 16 * sum(len(k.block_table) for k in running)
        if running:
            assert eng.stats().kv_waste == pytest.approx(st.waste)
