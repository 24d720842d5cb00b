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

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; blocks no one holds go back to the free queue.

        Released last block first, so that a sequence's tail (least likely to be shared) is evicted
        before its head.
        """
        for block in reversed(blocks):
            self.ref_count[block] -= 1
            if self.ref_count[block] < 0:
                raise RuntimeError(f"KV block {block} released more often than allocated")
            if self.ref_count[block] == 0:
                self.free[block] = None

    def cached_prefix(self, token_ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """Blocks already holding the longest cached run of full blocks at the start of token_ids.

        Takes a reference to each, and returns (blocks, their hash chain). At least one token is
        always left to compute, so the block that would cover the final token is never taken.
        """
        if not self.enable_prefix_caching:
            return [], []
        bs = self.block_size
        full = (len(token_ids) - 1) // bs
        self.prefix_queries += len(token_ids)
        out: list[int] = []
        hashes: list[int] = []
        parent = None
        for i in range(full):
            parent = block_hash(parent, token_ids[i * bs:(i + 1) * bs])
            block = self.block_of_hash.get(parent)
            if block is None:
                break
            hashes.append(parent)
            if self.ref_count[block] == 0:
                del self.free[block]
            self.ref_count[block] += 1
            out.append(block)
        self.prefix_hits += len(out) * bs
        return out, hashes

    def register_full_blocks(self, blocks: Sequence[int], token_ids: Sequence[int], hashes: list[int],
                             computed: int) -> None:
        """Hash each full block of a sequence whose tokens are now all in the cache (computed tokens).

        `hashes` is the sequence's chain of block hashes so far; it is extended in place. A block
        whose prefix another block already holds is left unregistered (the first one serves).
        """
        bs = self.block_size
        for i in range(len(hashes), computed // bs):
            h = block_hash(hashes[-1] if hashes else None, token_ids[i * bs:(i + 1) * bs])
            hashes.append(h)
            if not self.enable_prefix_caching:
                continue
            block = blocks[i]
            if block >= 0 and self.hash_of[block] is None and h not in self.block_of_hash:  # (< 0: freed)
                self.hash_of[block] = h
                self.block_of_hash[h] = block
