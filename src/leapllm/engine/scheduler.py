"""Continuous batching: which sequences run this step, and how many tokens each.

Every step has a token budget. Running sequences come first: each decoding one gets its next
token, a sequence still prefilling gets its next chunk. What budget remains goes to waiting
requests, oldest first, whose prompts start with any prefix the cache already holds. So new
requests join at any step, prefill is chunked and mixed with decode, and finished ones leave at
once.

On a model whose every layer attends through a sliding window, a sequence's blocks whose positions
all lie before the window of its next query go back to the pool (their table entries become FREED),
so a long generation holds only about a window's worth of blocks.

When the KV pool runs out, the most recently admitted running sequence is preempted: its
blocks are returned and it goes back to the front of the queue, to be recomputed later
(vLLM's recompute preemption). Its full blocks keep their prefix hashes, so if nobody needed
them in between, the recomputation is mostly a prefix-cache hit.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from leapllm.engine.block_allocator import BlockAllocator
from leapllm.engine.request import Request, RequestStatus


@dataclass
class ScheduledStep:
    decodes: list[Request] = field(default_factory=list)  # one new token each
    prefills: list[tuple[Request, int]] = field(default_factory=list)  # (sequence, tokens in this chunk)
    preempted: list[Request] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)


# A block-table entry whose block went back to the pool because no query can see it again.
FREED = -1


def held_blocks(blocks: list[int]) -> list[int]:
    return [b for b in blocks if b != FREED]


class Scheduler:
    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_num_batched_tokens: int,
                 window: int | None = None):
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs (one token per running sequence)")
        self.window = window  # every layer's sliding window (ModelConfig.kv_window), or None
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, seq: Request) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def free(self, seq: Request) -> None:
        """Return a sequence's blocks and drop it from the queues (finished or aborted)."""
        self.allocator.release(held_blocks(seq.blocks))
        seq.blocks = []
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _preempt(self, seq: Request, step: ScheduledStep) -> None:
        self.allocator.release(held_blocks(seq.blocks))
        seq.blocks, seq.block_hashes, seq.num_computed = [], [], 0
        seq.status = RequestStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        step.preempted.append(seq)

    def _drop_out_of_window(self, seq: Request) -> None:
        """Give back the blocks no query from position seq.num_computed on can see (keys before
        num_computed - window + 1)."""
        if self.window is None:
            return
        bs = self.allocator.block_size
        for j in range(min((seq.num_computed - self.window + 1) // bs, len(seq.blocks))):
            if seq.blocks[j] != FREED:
                self.allocator.release([seq.blocks[j]])
                seq.blocks[j] = FREED

    def _grow(self, seq: Request, num_tokens: int) -> bool:
        """Make seq's blocks cover num_tokens positions; False if the pool has too few free blocks."""
        need = self.allocator.blocks_needed(num_tokens) - len(seq.blocks)
        if need <= 0:
            return True
        if need > self.allocator.num_free:
            return False
        seq.blocks.extend(self.allocator.allocate(need))
        return True

    def reserve(self, seq: Request, num_tokens: int) -> bool:
        """Grow a running sequence's blocks to num_tokens positions from free blocks only (speculative
        tokens may use room nobody needs; they never preempt); False if there are too few."""
        return self._grow(seq, num_tokens)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        budget = self.max_num_batched_tokens

        # Running sequences first, in admission order; victims of preemption come from the back.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            self._drop_out_of_window(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self._grow(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim, step)
                if victim is seq:
                    break
            if seq.status is not RequestStatus.RUNNING:
                break  # it preempted itself: everything after it is gone too
            (step.decodes.append(seq) if n == 1 else step.prefills.append((seq, n)))
            budget -= n
            i += 1

        # Then waiting requests, unless this step had to preempt (the pool is full).
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not step.preempted:
            seq = self.waiting[0]
            if not seq.blocks and seq.prompt_logprobs is None:
                seq.blocks, seq.block_hashes = self.allocator.cached_prefix(seq.all_ids)
                seq.num_computed = len(seq.blocks) * self.allocator.block_size
                if seq.num_preemptions == 0:
                    seq.num_cached_tokens = seq.num_computed
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._grow(seq, seq.num_computed + n):
                # Not now: give the prefix blocks back so they stay evictable, and keep its place.
                self.allocator.release(seq.blocks)
                seq.blocks, seq.block_hashes, seq.num_computed = [], [], 0
                break
            self.waiting.popleft()
            seq.status = RequestStatus.RUNNING
            self.running.append(seq)
            (step.decodes.append(seq) if n == 1 else step.prefills.append((seq, n)))
            budget -= n
        return step
