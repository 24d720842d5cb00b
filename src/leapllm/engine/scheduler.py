"""Continuous batching: which sequences run this step, and how many tokens each.

Every step has a token budget. Running sequences come first: each decoding one gets its next
token, a sequence still prefilling gets its next chunk. What budget remains goes to waiting
requests, oldest first, whose prompts start with any prefix the cache already holds. So new
requests join at any step, prefill is chunked and mixed with decode, and finished ones leave at
once.

Each KV group (a set of layers with one pool and one block table per sequence; see KVGroup) counts
its own blocks. In a group whose layers attend through a sliding window, a sequence's blocks whose
positions all lie before the window of its next query go back to the pool (their table entries
become FREED), so a long generation holds only about a window's worth of them: all of its blocks on
a model whose every layer is windowed (Mistral), those of the windowed layers on one that mixes
them with full layers (Gemma's local layers; vLLM's hybrid allocator does the same).

An encoder-decoder's requests have a second group, the cross-attention pool: a request's table
there covers its source, taken whole at admission. A beam search (beam_search.py) is admitted with
room for all of its beams among the running sequences; its later beams join `running` right after
its first (add_running_after).

When the KV pool runs out, the most recently admitted running sequence is preempted: its
blocks are returned and it goes back to the front of the queue, to be recomputed later
(vLLM's recompute preemption). Its full blocks keep their prefix hashes, so if nobody needed
them in between, the recomputation is mostly a prefix-cache hit.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from leapllm.engine.block_allocator import BlockAllocator, prefix_hashes
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


@dataclass
class KVGroup:
    """Layers whose keys and values share one pool, so a sequence has one block table for them."""
    allocator: BlockAllocator
    window: int | None = None  # the keys each query of these layers sees; None: all of them
    # An encoder-decoder's cross-attention pool: a table covers the request's source (encoded when
    # it is admitted), not its decoder tokens, so it never grows after admission.
    holds_source: bool = False

    def positions(self, seq: Request, num_tokens: int) -> int:
        """The positions seq's table in this group must cover when its decoder holds num_tokens."""
        return len(seq.encoder_ids) if self.holds_source else num_tokens


def first_visible_block(num_computed: int, window: int | None, block_size: int) -> int:
    """The first block a query at position num_computed still sees through `window`; the ones
    before hold only keys older than its window."""
    if window is None:
        return 0
    return max(0, (num_computed - window + 1) // block_size)


class Scheduler:
    def __init__(self, groups: list[KVGroup], max_num_seqs: int, max_num_batched_tokens: int):
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs (one token per running sequence)")
        if len({g.allocator.block_size for g in groups}) != 1:
            raise ValueError("every KV group needs the same block size")
        self.groups = groups
        self.block_size = groups[0].allocator.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, seq: Request) -> None:
        seq.block_tables = [[] for _ in self.groups]
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _release_all(self, seq: Request) -> None:
        for g, table in zip(self.groups, seq.block_tables):
            g.allocator.release(held_blocks(table))
        seq.block_tables = [[] for _ in self.groups]

    def free(self, seq: Request) -> None:
        """Return a sequence's blocks and drop it from the queues (finished or aborted)."""
        self._release_all(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _preempt(self, seq: Request, step: ScheduledStep) -> None:
        self._release_all(seq)
        self.running.remove(seq)
        self.requeue_first(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        step.preempted.append(seq)

    def _drop_out_of_window(self, seq: Request) -> None:
        """In each windowed group, give back the blocks no query from position seq.num_computed on
        can see."""
        for g, table in zip(self.groups, seq.block_tables):
            for j in range(min(first_visible_block(seq.num_computed, g.window, self.block_size), len(table))):
                if table[j] != FREED:
                    g.allocator.release([table[j]])
                    table[j] = FREED

    def _grow(self, seq: Request, num_tokens: int) -> bool:
        """Make seq's tables cover num_tokens positions in every group; False (and nothing taken) if
        some group's pool has too few free blocks."""
        needs = [g.allocator.blocks_needed(g.positions(seq, num_tokens)) - len(table)
                 for g, table in zip(self.groups, seq.block_tables)]
        if any(need > g.allocator.num_free for g, need in zip(self.groups, needs)):
            return False
        for g, table, need in zip(self.groups, seq.block_tables, needs):
            if need > 0:
                table.extend(g.allocator.allocate(need))
        return True

    def _take_cached_prefix(self, seq: Request) -> None:
        """Start seq on the longest cached prefix every group can serve: a full group needs all of
        its blocks, a windowed one only those its next query sees (the earlier entries are FREED)."""
        ids, bs = seq.all_ids, self.block_size
        hashes = prefix_hashes(ids, bs)
        m = len(hashes)
        for g in self.groups:
            if g.window is None:
                m = min(m, g.allocator.cached_run(hashes))
        for g in self.groups:
            while g.window is not None and m > 0 and \
                    not g.allocator.holds(hashes[first_visible_block(m * bs, g.window, bs):m]):
                m -= 1
        for i, g in enumerate(self.groups):
            first = first_visible_block(m * bs, g.window, bs)
            seq.block_tables[i] = [FREED] * first + g.allocator.take(hashes[first:m])
        seq.block_hashes = hashes[:m]
        seq.num_computed = m * bs
        self.groups[0].allocator.count_lookup(len(ids), seq.num_computed)

    def add_running_after(self, seq: Request, beams: list[Request]) -> None:
        """New beams of a running sequence (their blocks already given), right after it."""
        i = self.running.index(seq) + 1
        self.running[i:i] = beams
        for beam in beams:
            beam.status = RequestStatus.RUNNING

    def requeue_first(self, seq: Request) -> None:
        """Put a request that holds no blocks (a preempted one, a restarted beam search) back at the
        head of the queue, to be computed again from its start."""
        seq.block_tables = [[] for _ in self.groups]
        seq.block_hashes, seq.num_computed = [], 0
        seq.status = RequestStatus.WAITING
        self.waiting.appendleft(seq)

    def preempt_last(self, keep: list[Request]) -> Request | None:
        """Preempt the most recently admitted running sequence not in keep (to free blocks outside a
        step); None if there is none."""
        for seq in reversed(self.running):
            if not any(seq is k for k in keep):
                self._preempt(seq, ScheduledStep())
                return seq
        return None

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

        # Then waiting requests, unless this step had to preempt (the pool is full); a beam search
        # is admitted with room for all of its beams.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not step.preempted:
            seq = self.waiting[0]
            if self.running and len(self.running) + seq.width > self.max_num_seqs:
                break
            if not any(seq.block_tables) and seq.prompt_logprobs is None:
                self._take_cached_prefix(seq)
                if seq.num_preemptions == 0:
                    seq.num_cached_tokens = seq.num_computed
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._grow(seq, seq.num_computed + n):
                # Not now: give the prefix blocks back so they stay evictable, and keep its place.
                self._release_all(seq)
                seq.block_hashes, seq.num_computed = [], 0
                break
            self.waiting.popleft()
            seq.status = RequestStatus.RUNNING
            self.running.append(seq)
            (step.decodes.append(seq) if n == 1 else step.prefills.append((seq, n)))
            budget -= n
        return step
