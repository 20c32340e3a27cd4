"""Block manager: prefix caching by block hash, LRU eviction, copy on write, accounting."""
from __future__ import annotations

import numpy as np
import pytest

from runtime.block_manager import BlockManager, block_hashes
from runtime.kv_cache import KVCacheFullError, PagedKVCache, SequenceKV

BS = 4


def make(num_blocks=8, caching=True):
    cache = PagedKVCache(num_layers=2, num_blocks=num_blocks, block_size=BS, num_kv_heads=1,
                         head_dim=2)
    return cache, BlockManager(cache, caching)


def fill(cache, seq, start, end, value):
    """Pretend a forward pass wrote tokens [start, end) with a recognizable value."""
    for p in range(start, end):
        b, s = seq.block_table[p // BS], p % BS
        for layer in range(cache.num_layers):
            cache.k[layer][b, :, s] = value + p
            cache.v[layer][b, :, s] = -(value + p)
    seq.num_tokens = end


def test_hash_chain_depends_on_every_earlier_token():
    a = block_hashes(list(range(12)), BS, 3)
    b = block_hashes([99] + list(range(1, 12)), BS, 3)
    assert len(a) == 3 and len(set(a)) == 3
    assert all(x != y for x, y in zip(a, b))            # first token differs -> all differ
    c = block_hashes(list(range(8)) + [0, 0, 0, 0], BS, 3)
    assert a[:2] == c[:2] and a[2] != c[2]


def test_prefix_is_reused_and_needs_fewer_blocks():
    cache, bm = make()
    prompt = list(range(10))                             # 2 full blocks + 2 tokens
    a = SequenceKV()
    assert bm.allocate_prefix(a, prompt) == 0
    bm.reserve(a, len(prompt))
    fill(cache, a, 0, 10, 100)
    bm.commit(a, prompt)
    used_one = bm.pool.num_used
    b = SequenceKV()
    assert bm.allocate_prefix(b, prompt + [7, 7]) == 8   # both full blocks found
    assert b.block_table == a.block_table[:2]
    bm.reserve(b, 12)
    assert bm.pool.num_used == used_one + 1              # only the tail block is new
    assert bm.pool.ref_counts[a.block_table[0]] == 2
    bm.free(a)
    bm.free(b)
    assert bm.pool.num_used == 0 and bm.pool.num_cached == 2
    bm.pool.check()


def test_whole_prompt_cached_still_computes_last_token():
    cache, bm = make()
    prompt = list(range(8))                              # exactly two full blocks
    a = SequenceKV()
    bm.allocate_prefix(a, prompt)
    bm.reserve(a, 8)
    fill(cache, a, 0, 8, 0)
    bm.commit(a, prompt)
    bm.free(a)
    b = SequenceKV()
    assert bm.allocate_prefix(b, prompt) == 4            # the last block is recomputed


def test_cached_blocks_are_evicted_lru_only_when_needed():
    cache, bm = make(num_blocks=6)
    seqs = []
    for first in (0, 50):
        s = SequenceKV()
        prompt = [first] * 9
        bm.allocate_prefix(s, prompt)
        bm.reserve(s, 9)
        fill(cache, s, 0, 9, first)
        bm.commit(s, prompt)
        seqs.append((s, prompt))
    with pytest.raises(KVCacheFullError):
        bm.reserve(SequenceKV(), 4 * BS)
    for s, _ in seqs:
        bm.free(s)
    assert bm.pool.num_cached == 4 and bm.pool.num_free == 6
    # A new unrelated sequence needs 4 blocks: the 2 never-cached ones first, then the
    # least recently used cached ones (the first prompt's).
    c = SequenceKV()
    bm.allocate_prefix(c, [9] * 16)
    bm.reserve(c, 16)
    assert bm.pool.evictions == 2
    d = SequenceKV()
    assert bm.allocate_prefix(d, [50] * 9) == 8          # the second prompt is still cached
    e = SequenceKV()
    assert bm.allocate_prefix(e, [0] * 9) == 0           # the first was evicted
    bm.pool.check()


def test_fork_then_copy_on_write_keeps_parent_intact():
    cache, bm = make()
    parent = SequenceKV()
    bm.allocate_prefix(parent, list(range(6)))
    bm.reserve(parent, 6)
    fill(cache, parent, 0, 6, 10)
    child = bm.fork(parent)
    shared = parent.block_table[1]
    assert bm.pool.ref_counts[shared] == 2
    bm.reserve(child, 7)
    bm.prepare_write(child, 6, 7)                        # writes into the shared partial block
    assert child.block_table[1] != shared and child.block_table[0] == parent.block_table[0]
    assert bm.pool.ref_counts[shared] == 1
    fill(cache, child, 6, 7, 1000)
    for layer in range(cache.num_layers):
        # the copy holds the parent's tokens 4..5, then the child's token 6
        np.testing.assert_array_equal(cache.k[layer][child.block_table[1], 0, :2, 0], [14, 15])
        assert cache.k[layer][child.block_table[1], 0, 2, 0] == 1006
        assert cache.k[layer][shared, 0, 2, 0] != 1006     # parent's block untouched
    bm.prepare_write(parent, 6, 7)                       # parent alone now: no copy
    assert parent.block_table[1] == shared
    bm.free(parent)
    bm.free(child)
    assert bm.pool.num_used == 0
    bm.pool.check()


def test_stats_count_waste():
    cache, bm = make()
    s = SequenceKV()
    bm.allocate_prefix(s, [1] * 5)
    bm.reserve(s, 5)
    s.num_tokens = 5
    st = bm.stats([s])
    assert (st.total, st.used, st.reserved_slots, st.filled_slots) == (8, 2, 8, 5)
    assert st.waste == pytest.approx(3 / 8)


def test_prefix_caching_off_shares_nothing():
    cache, bm = make(caching=False)
    a = SequenceKV()
    bm.allocate_prefix(a, list(range(9)))
    bm.reserve(a, 9)
    bm.commit(a, list(range(9)))
    b = SequenceKV()
    assert bm.allocate_prefix(b, list(range(9))) == 0
    bm.free(a)
    assert bm.pool.num_cached == 0


def _resident_pages(a: np.ndarray) -> int:
    """Pages of `a`'s buffer the kernel has mapped (mincore), Linux only."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    start = a.ctypes.data // page * page
    n = -(-(a.ctypes.data + a.nbytes - start) // page)
    vec = (ctypes.c_ubyte * n)()
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(n * page), vec) != 0:
        pytest.skip("mincore failed")
    return sum(v & 1 for v in vec)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_cpu_pool_is_lazy_until_committed(dtype):
    """The CPU backend's pool maps no memory until used; commit() maps all of it
    (what `lingli serve` does at startup) and leaves it zero and writable."""
    import sys
    if not sys.platform.startswith("linux"):
        pytest.skip("mincore is Linux-only here")
    from runtime.backend_cpu import CpuBackend

    be = CpuBackend(1, kv_dtype=dtype)
    cache = PagedKVCache(num_layers=2, num_blocks=512, block_size=16, num_kv_heads=2,
                         head_dim=64, pool=be.kv_pool, commit=be.kv_commit)
    arrays = cache.k + cache.v
    assert all(a.dtype == np.dtype(dtype) for a in arrays)
    assert sum(_resident_pages(a) for a in arrays) == 0
    cache.commit()
    for a in arrays:
        assert _resident_pages(a) == -(-a.nbytes // 4096)
        assert not a.any()
    cache.k[1][3, 1, 2] = 7
    assert cache.k[1][3, 1, 2, 0] == 7


def test_commit_of_a_plain_array_writes_zeros():
    """A pool that is not over an mmap (another backend's numpy) is committed by writing it."""
    from runtime.backend_cpu import CpuBackend

    a = np.ones((4, 2, 3), np.float16)
    CpuBackend(1).kv_commit(a)
    assert not a.any()
