"""Which KV-cache blocks are free, who holds the others, and which hold a known prompt prefix.

Every block has a reference count. A block whose contents are a full block of tokens that has
been computed gets a hash that chains in every token before it (its prefix). When a new
sequence's prompt starts with the same tokens, it takes those blocks (count + 1) instead of
recomputing them: vLLM's automatic prefix caching.

Blocks with count 0 wait in one LRU queue: allocation takes the least recently freed, and a
block that still carried a hash is evicted from the prefix table at that moment. So a prefix
stays reusable until its memory is really needed, and "free" means count 0 whatever the hash.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


def block_hash(parent: int | None, tokens: Sequence[int]) -> int:
    """Hash of a full block given the hash of the block before it (None for the first)."""
    return hash((parent, tuple(tokens)))


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.block_of_hash: dict[int, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.prefix_hits = 0  # tokens served from the prefix cache, for metrics
        self.prefix_queries = 0  # prompt tokens looked up

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks (count 1); raises if fewer than n are free: check num_free first."""
        if n > len(self.free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self.free)} free")
        out = []
        for _ in range(n):
            block, _ = self.free.popitem(last=False)
            h = self.hash_of[block]
            if h is not None:  # evict the prefix it held
                if self.block_of_hash.get(h) == block:
                    del self.block_of_hash[h]
                self.hash_of[block] = None
            self.ref_count[block] = 1
            out.append(block)
        return out

    def share(self, blocks: Sequence[int]) -> None:
        """One more reference to each of these held blocks (a beam that continues another's)."""
        for block in blocks:
            if self.ref_count[block] < 1:
                raise RuntimeError(f"KV block {block} is shared while free")
            self.ref_count[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; blocks no one holds go back to the free queue.

        Released last block first, so that a sequence's tail (least likely to be shared) is evicted
        before its head. A block that holds no prefix goes to the front of the queue, to be reused
        before any block never written: the pool's memory (which the OS maps as blocks are first
        written, see model/kv_cache.py) then grows with what runs at once, not with what ran.
        """
        for block in reversed(blocks):
            self.ref_count[block] -= 1
            if self.ref_count[block] < 0:
                raise RuntimeError(f"KV block {block} released more often than allocated")
            if self.ref_count[block] == 0:
                self.free[block] = None
                if self.hash_of[block] is None:
                    self.free.move_to_end(block, last=False)

    def cached_run(self, hashes: Sequence[int]) -> int:
        """How many of the leading hashes have a block holding them."""
        if not self.enable_prefix_caching:
            return 0
        n = 0
        while n < len(hashes) and hashes[n] in self.block_of_hash:
            n += 1
        return n

    def holds(self, hashes: Sequence[int]) -> bool:
        """Whether every one of these hashes has a block holding it."""
        return self.enable_prefix_caching and all(h in self.block_of_hash for h in hashes)

    def take(self, hashes: Sequence[int]) -> list[int]:
        """A reference to the block holding each hash (all must be held: check with holds first)."""
        out = []
        for h in hashes:
            block = self.block_of_hash[h]
            if self.ref_count[block] == 0:
                del self.free[block]
            self.ref_count[block] += 1
            out.append(block)
        return out

    def count_lookup(self, queried: int, hit: int) -> None:
        """Record a prompt lookup of `queried` tokens of which `hit` came from the cache (metrics;
        nothing is looked up without prefix caching)."""
        if not self.enable_prefix_caching:
            return
        self.prefix_queries += queried
        self.prefix_hits += hit

    def register(self, blocks: Sequence[int], hashes: Sequence[int], first: int = 0) -> None:
        """Offer block i of a sequence to the prefix cache under hashes[i], for i >= first.

        A freed entry (< 0) or a block whose prefix another block already holds is left out (the
        first one serves)."""
        if not self.enable_prefix_caching:
            return
        for i in range(first, min(len(hashes), len(blocks))):
            block, h = blocks[i], hashes[i]
            if block >= 0 and self.hash_of[block] is None and h not in self.block_of_hash:
                self.hash_of[block] = h
                self.block_of_hash[h] = block


def prefix_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The hash chain of the full blocks of token_ids that a prefix lookup may serve: never the
    block of the final token, which is always computed."""
    return extend_block_hashes([], token_ids, len(token_ids) - 1, block_size)


def extend_block_hashes(hashes: list[int], token_ids: Sequence[int], computed: int, block_size: int) -> list[int]:
    """Extend a sequence's hash chain (in place) to every full block of its first `computed` tokens."""
    bs = block_size
    for i in range(len(hashes), max(computed, 0) // bs):
        hashes.append(block_hash(hashes[-1] if hashes else None, token_ids[i * bs:(i + 1) * bs]))
    return hashes
