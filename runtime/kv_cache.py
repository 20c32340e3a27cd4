"""Paged KV cache: one preallocated pool of fixed-size blocks, per-sequence block tables.

Layout per layer (what the attention kernels read):

    k[layer], v[layer]: [num_blocks, n_kv_heads, block_size, head_dim]
    (float16 or float32 numpy arrays on the CPU backend; the backend allocates
    them and writes into them, see `kv_pool` and `rope_write` in runtime/backend_*.py)

A token at position p of a sequence lives in block `table[p // block_size]`,
slot `p % block_size`. Keeping a head's slots contiguous lets the attention
kernel stream one head's keys without striding over the other heads.

Blocks are reference-counted so sequences sharing a prompt prefix share
blocks. A full block may carry a content hash (runtime.block_manager): when
its last user lets go it is kept, still holding its keys and values, in a
least-recently-used list that later requests with the same prefix can reuse,
and that allocation evicts from only when no never-used block is left.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .errors import LingliError


class KVCacheFullError(LingliError):
    """The KV pool has no free block left for a sequence that needs one."""


class BlockAllocator:
    """Reference counts over block ids 0..num_blocks-1, with a prefix cache.

    A block is in exactly one state: free (never used, or holding nothing
    reusable), in use (ref count > 0), or cached (ref count 0 but holding the
    keys/values of a hashed full block; evicted least recently used first).
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        # Pop from the end: low ids are handed out first, which keeps tests readable.
        self._free = list(range(num_blocks - 1, -1, -1))
        self.ref_counts = np.zeros(num_blocks, dtype=np.int32)
        self._evictable: OrderedDict[int, None] = OrderedDict()   # cached, ref 0, LRU first
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now: never-used plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Blocks held only by the prefix cache (ref count 0, reusable by a matching prefix)."""
        return len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def allocate(self) -> int:
        if self._free:
            block = self._free.pop()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
            self.evictions += 1
        else:
            raise KVCacheFullError(
                f"KV cache is full: all {self.num_blocks} blocks are in use; "
                "shorten the request or give the cache more memory (kv_cache_gb)")
        self.ref_counts[block] = 1
        return block

    def incref(self, block: int) -> None:
        if self.ref_counts[block] <= 0:
            raise ValueError(f"block {block} is not allocated")
        self.ref_counts[block] += 1

    def free(self, block: int) -> None:
        if self.ref_counts[block] <= 0:
            raise ValueError(f"block {block} freed twice")
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            if block in self._hash_of:
                self._evictable[block] = None
            else:
                self._free.append(block)

    # ---------------------------------------------------------- prefix cache
    def lookup(self, h: bytes) -> int | None:
        """Take a reference on the cached block holding content `h`, if any."""
        block = self._block_of.get(h)
        if block is None:
            return None
        if self.ref_counts[block] == 0:
            del self._evictable[block]
        self.ref_counts[block] += 1
        return block

    def register(self, block: int, h: bytes) -> None:
        """Record that in-use `block` now holds the full block with content hash `h`."""
        if self.ref_counts[block] <= 0:
            raise ValueError(f"block {block} is not allocated")
        if h in self._block_of or block in self._hash_of:
            return          # an identical block is cached already (or this one is)
        self._block_of[h] = block
        self._hash_of[block] = h

    def forget(self, block: int) -> None:
        """Drop `block`'s hash (its content is about to change)."""
        h = self._hash_of.pop(block, None)
        if h is not None:
            del self._block_of[h]

    def check(self) -> None:
        """Internal consistency (tests): every block in exactly one state."""
        free, ev = set(self._free), set(self._evictable)
        used = {b for b in range(self.num_blocks) if self.ref_counts[b] > 0}
        assert len(free) == len(self._free), "a block is on the free list twice"
        assert not (free & ev) and not (free & used) and not (ev & used)
        assert len(free) + len(ev) + len(used) == self.num_blocks, "a block is lost"
        assert all(self._block_of[h] == b for b, h in self._hash_of.items())
        assert ev <= set(self._hash_of), "an evictable block has no hash"


@dataclass
class SequenceKV:
    """A sequence's view of the cache: its block table and how many tokens are stored."""

    block_table: list[int] = field(default_factory=list)
    num_tokens: int = 0

    def table_array(self) -> np.ndarray:
        return np.asarray(self.block_table, dtype=np.int32)


@dataclass
class BatchKV:
    """Where each token of one forward pass reads and writes the cache.

    block_tables int32 [S, nb]: one row per sequence (ragged rows padded with 0);
    seq_ids int32 [T]: the row of each token. Token t of the batch lives at
    block block_tables[seq_ids[t], pos // block_size], slot pos % block_size.
    """

    block_tables: np.ndarray
    seq_ids: np.ndarray

    @classmethod
    def of(cls, seqs: list[SequenceKV], counts: list[int]) -> "BatchKV":
        """Sequences seqs[i] contribute counts[i] consecutive tokens to the batch."""
        nb = max(1, max(len(s.block_table) for s in seqs))
        tables = np.zeros((len(seqs), nb), dtype=np.int32)
        for i, s in enumerate(seqs):
            tables[i, :len(s.block_table)] = s.block_table
        return cls(tables, np.repeat(np.arange(len(seqs), dtype=np.int32), counts))


class PagedKVCache:
    """The pool of K/V blocks for every layer, plus the allocator that hands them out."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int,
                 num_kv_heads: int, head_dim: int, pool=None, commit=None) -> None:
        """pool(shape) allocates one layer's K or V storage (a backend's
        `kv_pool`); by default a float32 numpy array. commit(array) backs one
        with memory (a backend's `kv_commit`; see `commit`)."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"KV cache needs num_blocks >= 1 and block_size >= 1, "
                             f"got {num_blocks} and {block_size}")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        # np.zeros maps untouched pages lazily, so a large pool costs nothing until used.
        pool = pool or (lambda shp: np.zeros(shp, dtype=np.float32))
        self.k = [pool(shape) for _ in range(num_layers)]
        self.v = [pool(shape) for _ in range(num_layers)]
        self.allocator = BlockAllocator(num_blocks)
        self._commit = commit

    def commit(self) -> None:
        """Back the whole pool with memory now instead of page by page on first write.

        The server does this at startup: a machine without the memory fails
        there, not mid-request, and the first requests do not pay the page
        faults (on the 2-core build VM a first-touched 4 KiB page costs ~13 us:
        a 16-stream SmolLM2 decode step spent ~1.5 ms in them)."""
        if self._commit is not None:
            for a in self.k + self.v:
                self._commit(a)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int,
                        head_dim: int, itemsize: int = 4) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def reserve(self, seq: SequenceKV, num_tokens: int) -> None:
        """Make sure `seq` has blocks for positions [0, num_tokens); all-or-nothing."""
        needed = -(-num_tokens // self.block_size) - len(seq.block_table)
        if needed <= 0:
            return
        if needed > self.allocator.num_free:
            raise KVCacheFullError(
                f"KV cache is full: the sequence needs {needed} more blocks of "
                f"{self.block_size} tokens but only {self.allocator.num_free} of "
                f"{self.num_blocks} are free")
        for _ in range(needed):
            seq.block_table.append(self.allocator.allocate())

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's keys and values in every layer (copy on write)."""
        for layer in range(self.num_layers):
            self.k[layer][dst] = self.k[layer][src]
            self.v[layer][dst] = self.v[layer][src]

    def release(self, seq: SequenceKV) -> None:
        """Return every block of `seq` to the pool."""
        # Last block first, so the prefix cache's LRU list evicts a prefix's tail
        # before its head (a head is useful without its tail, not the reverse).
        for block in reversed(seq.block_table):
            self.allocator.free(block)
        seq.block_table.clear()
        seq.num_tokens = 0
