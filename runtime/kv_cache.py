"""Paged KV cache: one preallocated pool of fixed-size blocks, per-sequence block tables.

Layout per layer (what the attention kernels read):

    k[layer], v[layer]: float32 [num_blocks, n_kv_heads, block_size, head_dim]

A token at position p of a sequence lives in block `table[p // block_size]`,
slot `p % block_size`. Keeping a head's slots contiguous lets the attention
kernel stream one head's keys without striding over the other heads.

Blocks are reference-counted so that later (the engine) sequences sharing a
prompt prefix can share blocks; for now each sequence owns its blocks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import LingliError


class KVCacheFullError(LingliError):
    """The KV pool has no free block left for a sequence that needs one."""


class BlockAllocator:
    """Free list plus reference counts over block ids 0..num_blocks-1."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        # Pop from the end: low ids are handed out first, which keeps tests readable.
        self._free = list(range(num_blocks - 1, -1, -1))
        self.ref_counts = np.zeros(num_blocks, dtype=np.int32)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise KVCacheFullError(
                f"KV cache is full: all {self.num_blocks} blocks are in use; "
                "shorten the request or give the cache more memory (kv_cache_gb)")
        block = self._free.pop()
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
            self._free.append(block)


@dataclass
class SequenceKV:
    """A sequence's view of the cache: its block table and how many tokens are stored."""

    block_table: list[int] = field(default_factory=list)
    num_tokens: int = 0

    def table_array(self) -> np.ndarray:
        return np.asarray(self.block_table, dtype=np.int32)


class PagedKVCache:
    """The pool of K/V blocks for every layer, plus the allocator that hands them out."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int,
                 num_kv_heads: int, head_dim: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"KV cache needs num_blocks >= 1 and block_size >= 1, "
                             f"got {num_blocks} and {block_size}")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        # np.zeros maps untouched pages lazily, so a large pool costs nothing until used.
        self.k = [np.zeros(shape, dtype=np.float32) for _ in range(num_layers)]
        self.v = [np.zeros(shape, dtype=np.float32) for _ in range(num_layers)]
        self.allocator = BlockAllocator(num_blocks)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int,
                        head_dim: int) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * 4

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

    def release(self, seq: SequenceKV) -> None:
        """Return every block of `seq` to the pool."""
        for block in seq.block_table:
            self.allocator.free(block)
        seq.block_table.clear()
        seq.num_tokens = 0

    def write(self, layer: int, seq: SequenceKV, positions: np.ndarray,
              k: np.ndarray, v: np.ndarray) -> None:
        """Store k, v [T, n_kv_heads, head_dim] at `positions` (blocks already reserved)."""
        table = np.asarray(seq.block_table, dtype=np.int64)
        blocks = table[positions // self.block_size]
        slots = positions % self.block_size
        # Advanced indexes on axes 0 and 2 -> the indexed shape is [T, n_kv_heads, head_dim].
        self.k[layer][blocks, :, slots, :] = k
        self.v[layer][blocks, :, slots, :] = v
