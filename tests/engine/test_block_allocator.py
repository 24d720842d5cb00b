"""The KV block pool's bookkeeping: reference counts, prefix hashes, LRU eviction."""

from __future__ import annotations

import pytest

from leapllm.engine.block_allocator import (
    BlockAllocator,
    extend_block_hashes,
    prefix_hashes,
)


def register(a: BlockAllocator, blocks, tokens, hashes, computed):
    """What the engine does when a sequence's first `computed` tokens are in its blocks."""
    extend_block_hashes(hashes, tokens, computed, a.block_size)
    a.register(blocks, hashes)


def cached_prefix(a: BlockAllocator, tokens):
    """What the scheduler does for a prompt on a pool of full layers: (the blocks of the longest
    cached run of full blocks, each now referenced once more, and their hash chain)."""
    hashes = prefix_hashes(tokens, a.block_size)
    hashes = hashes[:a.cached_run(hashes)]
    return a.take(hashes), hashes


def test_allocate_and_release_return_every_block():
    a = BlockAllocator(num_blocks=8, block_size=4)
    blocks = a.allocate(5)
    assert len(set(blocks)) == 5 and a.num_free == 3 and a.num_used == 5
    a.release(blocks)
    assert a.num_free == 8 and a.num_used == 0


def test_allocating_more_than_free_raises_instead_of_overcommitting():
    a = BlockAllocator(num_blocks=2, block_size=4)
    a.allocate(2)
    with pytest.raises(RuntimeError):
        a.allocate(1)


def test_double_release_is_detected():
    a = BlockAllocator(num_blocks=2, block_size=4)
    b = a.allocate(1)
    a.release(b)
    with pytest.raises(RuntimeError):
        a.release(b)


def test_full_computed_blocks_are_found_again_by_prefix_and_shared():
    a = BlockAllocator(num_blocks=8, block_size=4)
    tokens = list(range(10))  # two full blocks and a partial one
    blocks = a.allocate(3)
    hashes: list[int] = []
    register(a, blocks, tokens, hashes, computed=10)
    assert len(hashes) == 2
    hit, hit_hashes = cached_prefix(a, tokens + [99])
    assert hit == blocks[:2] and hit_hashes == hashes
    assert a.ref_count[blocks[0]] == 2  # shared by both holders
    a.release(blocks)
    a.release(hit)
    assert a.num_free == 8


def test_prefix_lookup_always_leaves_a_token_to_compute():
    a = BlockAllocator(num_blocks=4, block_size=4)
    tokens = list(range(8))
    blocks = a.allocate(2)
    register(a, blocks, tokens, [], computed=8)
    hit, _ = cached_prefix(a, tokens)  # exactly two full blocks: the last must be recomputed
    assert hit == blocks[:1]


def test_a_different_earlier_block_changes_every_later_hash():
    a = BlockAllocator(num_blocks=8, block_size=2)
    blocks = a.allocate(3)
    register(a, blocks, [1, 2, 3, 4, 5, 6], [], computed=6)
    hit, _ = cached_prefix(a, [9, 9, 3, 4, 5, 6, 7])
    assert hit == []


def test_freed_prefix_blocks_stay_cached_until_their_memory_is_needed():
    a = BlockAllocator(num_blocks=3, block_size=2)
    blocks = a.allocate(2)
    register(a, blocks, [1, 2, 3, 4], [], computed=4)
    a.release(blocks)
    assert a.num_free == 3
    hit, _ = cached_prefix(a, [1, 2, 3, 4, 5])
    assert hit == blocks  # still there after release
    a.release(hit)
    a.allocate(3)  # takes everything: the cached blocks are evicted
    assert a.block_of_hash == {}
    assert all(h is None for h in a.hash_of)


def test_disabled_prefix_caching_never_hits():
    a = BlockAllocator(num_blocks=4, block_size=2, enable_prefix_caching=False)
    blocks = a.allocate(2)
    register(a, blocks, [1, 2, 3, 4], [], computed=4)
    assert cached_prefix(a, [1, 2, 3, 4, 5]) == ([], [])


def test_blocks_that_hold_no_prefix_are_reused_before_blocks_never_written():
    """The pool's memory is mapped as blocks are first written: reusing a written block that caches
    nothing keeps it from growing, while blocks that cache a prefix are still evicted last."""
    a = BlockAllocator(num_blocks=8, block_size=4)
    tokens = list(range(8))
    first = a.allocate(2)
    register(a, first, tokens, [], computed=8)  # both full: they cache the prefix
    scratch = a.allocate(2)  # never registered: they hold nothing worth keeping
    a.release(first)
    a.release(scratch)
    assert a.allocate(2) == scratch  # written blocks first, in their order
    assert a.allocate(4) == [4, 5, 6, 7]  # then the never-written ones
    assert a.allocate(2) == first[::-1]  # the cached prefix is evicted last, its tail first
