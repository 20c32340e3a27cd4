"""Per-sequence KV block bookkeeping over the shared pool: prefix caching, copy on write.

The pool (runtime.kv_cache.BlockAllocator) counts references; this module
decides which blocks a sequence holds:

- Prefix caching. A full block is named by a hash of its tokens and of every
  token before it (a chain: h_i = H(h_{i-1}, tokens of block i)), so equal
  hashes mean equal keys/values. A new sequence takes references on the cached
  blocks of its longest cached prefix and computes only the rest. At least one
  prompt token is always computed (its logits pick the first output token).
- Copy on write. A sequence about to write into a block that others share
  (after `fork`) first copies it into a block of its own.
- Accounting: free / used / cached blocks and the reserved-but-unused slots.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .kv_cache import PagedKVCache, SequenceKV


def block_hashes(token_ids, block_size: int, n_blocks: int, parent: bytes = b"") -> list[bytes]:
    """Chained content hashes of the first `n_blocks` full blocks of `token_ids`."""
    out = []
    ids = np.asarray(token_ids[:n_blocks * block_size], dtype=np.int64)
    for i in range(n_blocks):
        parent = hashlib.blake2b(parent + ids[i * block_size:(i + 1) * block_size].tobytes(),
                                 digest_size=16).digest()
        out.append(parent)
    return out


@dataclass
class BlockStats:
    total: int
    used: int           # referenced by at least one sequence
    cached: int         # unreferenced but holding a reusable prefix block
    free: int           # total - used (cached blocks count as free: allocation may evict them)
    reserved_slots: int  # slots in blocks held by sequences
    filled_slots: int   # of which hold a token

    @property
    def waste(self) -> float:
        """Share of reserved slots that hold nothing (the paged cache's only waste)."""
        return 0.0 if self.reserved_slots == 0 else 1.0 - self.filled_slots / self.reserved_slots


class BlockManager:
    def __init__(self, cache: PagedKVCache, enable_prefix_caching: bool = True) -> None:
        self.cache = cache
        self.pool = cache.allocator
        self.block_size = cache.block_size
        self.prefix_caching = enable_prefix_caching
        self._hashes: dict[int, list[bytes]] = {}     # id(seq) -> hashes of its full blocks
        self.cache_hits = 0                            # prompt tokens served from the cache

    # ------------------------------------------------------------ queries
    def blocks_needed(self, seq: SequenceKV, num_tokens: int) -> int:
        """New blocks `seq` needs to hold `num_tokens` tokens in all."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_reserve(self, seq: SequenceKV, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.pool.num_free

    def stats(self, seqs: list[SequenceKV] = ()) -> BlockStats:
        reserved = sum(len(s.block_table) for s in seqs) * self.block_size
        filled = sum(s.num_tokens for s in seqs)
        return BlockStats(self.pool.num_blocks, self.pool.num_used, self.pool.num_cached,
                          self.pool.num_free, reserved, filled)

    # ------------------------------------------------------------ changes
    def allocate_prefix(self, seq: SequenceKV, token_ids) -> int:
        """Give an empty `seq` the cached blocks of `token_ids`' longest cached prefix.

        Returns how many tokens are already computed (a multiple of block_size,
        below len(token_ids))."""
        if seq.block_table:
            raise ValueError("allocate_prefix needs a sequence without blocks")
        self._hashes[id(seq)] = []
        if not self.prefix_caching:
            return 0
        n_full = (len(token_ids) - 1) // self.block_size
        for h in block_hashes(token_ids, self.block_size, n_full):
            block = self.pool.lookup(h)
            if block is None:
                break
            seq.block_table.append(block)
            self._hashes[id(seq)].append(h)
        seq.num_tokens = len(seq.block_table) * self.block_size
        self.cache_hits += seq.num_tokens
        return seq.num_tokens

    def reserve(self, seq: SequenceKV, num_tokens: int) -> None:
        """Blocks for positions [0, num_tokens); all or nothing (KVCacheFullError)."""
        self.cache.reserve(seq, num_tokens)

    def prepare_write(self, seq: SequenceKV, start: int, end: int) -> None:
        """Copy on write: make the blocks holding positions [start, end) private to `seq`."""
        bs = self.block_size
        for i in range(start // bs, -(-end // bs)):
            block = seq.block_table[i]
            if self.pool.ref_counts[block] > 1:
                new = self.pool.allocate()
                self.cache.copy_block(block, new)
                self.pool.free(block)
                seq.block_table[i] = new
            elif i >= len(self._hashes.get(id(seq), ())):
                # A block we alone hold and will overwrite must not stay findable by hash.
                self.pool.forget(block)

    def commit(self, seq: SequenceKV, token_ids) -> None:
        """After a forward pass wrote up to seq.num_tokens: hash the newly full blocks."""
        hashes = self._hashes.setdefault(id(seq), [])
        n_full = seq.num_tokens // self.block_size
        if not self.prefix_caching or n_full <= len(hashes):
            return
        parent = hashes[-1] if hashes else b""
        new = block_hashes(token_ids[len(hashes) * self.block_size:], self.block_size,
                           n_full - len(hashes), parent)
        for i, h in enumerate(new, start=len(hashes)):
            self.pool.register(seq.block_table[i], h)
        hashes.extend(new)

    def fork(self, parent: SequenceKV) -> SequenceKV:
        """A child sharing every block of `parent` (n > 1 samples of one prompt)."""
        child = SequenceKV(list(parent.block_table), parent.num_tokens)
        for block in child.block_table:
            self.pool.incref(block)
        self._hashes[id(child)] = list(self._hashes.get(id(parent), ()))
        return child

    def free(self, seq: SequenceKV) -> None:
        """Return `seq`'s blocks; full hashed blocks stay cached until evicted."""
        self.cache.release(seq)
        self._hashes.pop(id(seq), None)
