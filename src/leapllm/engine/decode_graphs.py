"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

On a GPU a small model's decode step is launch-bound: hundreds of kernel launches from Python for a
few microseconds of work each. A CUDA graph records a step's launches once and replays them with one
call. A graph replays the very tensors it was recorded with, so every input of the step lives in a
static buffer that each step overwrites: token ids, positions, the slots new keys go to, each
sequence's block table (as wide as the longest sequence the model admits) and length. Attention
reads the pool in place through those tables (kernels/paged_attention.py), so a step's shapes depend
on the batch size alone.

A step of B sequences runs the graph of the smallest bucket >= B (1, 2, 4, then multiples of 8 up
to max_num_seqs, as vLLM's). The rows past B are padding: their key and value go to a scratch block
that no sequence owns (the pool's last block, which the allocator never hands out), their attention
reads only that block, and their logits are dropped. Steps with prefill chunks or speculative
verification run eagerly; so does everything with `enforce_eager` (`--enforce-eager`).

Off the GPU nothing is captured: `DecodeGraphs(capture=False)` runs the same static buffers eagerly,
which is how the tests check the padding and the buffers on the CPU.
"""

from __future__ import annotations

import torch

from leapllm.model.paged_kv_cache import PagedAttentionBatch, PagedKVCache, SequenceTables


def decode_buckets(max_num_seqs: int) -> list[int]:
    """The batch sizes graphs are captured for: 1, 2, 4, multiples of 8, and max_num_seqs itself."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs] + list(range(8, max_num_seqs, 8)) + [max_num_seqs]
    return sorted(set(sizes))


class DecodeGraphs:
    """The decode step of `model` on `cache` for up to max_num_seqs sequences, from static buffers.

    scratch_blocks: per block table kind (the full layers', then a hybrid model's windowed layers'),
    the block padding rows write to. max_blocks: the block tables' width.
    """

    def __init__(self, model, cache: PagedKVCache, block_size: int, max_blocks: int, scratch_blocks: tuple[int, ...],
                 max_num_seqs: int, capture: bool):
        self.model, self.cache = model, cache
        self.block_size, self.max_blocks, self.scratch_blocks = block_size, max_blocks, scratch_blocks
        self.buckets = decode_buckets(max_num_seqs)
        n, kinds, device = self.buckets[-1], len(scratch_blocks), model.device
        pin = device.type == "cuda"
        # Host side: filled each step, then copied over the device buffers in three copies.
        self.host_ids = torch.zeros((2 + kinds, n), dtype=torch.long, pin_memory=pin)  # tokens, positions, slots
        self.host_tables = torch.zeros((kinds, n, max_blocks), dtype=torch.int32, pin_memory=pin)
        self.host_lengths = torch.zeros(n, dtype=torch.int32, pin_memory=pin)
        self.ids = torch.zeros((2 + kinds, n), dtype=torch.long, device=device)
        self.tables = torch.zeros((kinds, n, max_blocks), dtype=torch.int32, device=device)
        self.lengths = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=device)  # one token per sequence
        self.rows = torch.arange(n, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.num_replays = self.num_eager = 0
        if capture:
            self._capture()

    def fits(self, num_seqs: int, block_tables: list[list[list[int]]]) -> bool:
        """Whether a decode step of these sequences' tables can run here (else it runs eagerly)."""
        return num_seqs <= self.buckets[-1] and all(len(t) <= self.max_blocks
                                                    for tables in block_tables for t in tables)

    def run(self, decodes: list[tuple[list[list[int]], int]], tokens: list[int]) -> torch.Tensor:
        """decodes: (block tables, position) of each sequence; tokens: its token -> logits (B, vocab)."""
        n = next(b for b in self.buckets if b >= len(tokens))
        self._fill(decodes, tokens, n)
        if n in self.graphs:
            graph, logits = self.graphs[n]
            graph.replay()
            self.num_replays += 1
        else:
            logits = self._forward(n)
            self.num_eager += 1
        return logits[:len(tokens)]

    def _fill(self, decodes: list[tuple[list[list[int]], int]], tokens: list[int], n: int) -> None:
        bs, b = self.block_size, len(tokens)
        ids, tables, lengths = self.host_ids.numpy(), self.host_tables.numpy(), self.host_lengths.numpy()
        ids[:, :n] = 0
        ids[0, :b] = tokens
        ids[1, :b] = [pos for _, pos in decodes]
        lengths[:b] = ids[1, :b] + 1
        lengths[b:n] = 1  # a padding row sees one key: its own, in the scratch block
        # Attention reads a row's table no further than its length: columns past the step's longest
        # table keep whatever they held, and are neither reset nor copied.
        width = max([len(t) for seq_tables, _ in decodes for t in seq_tables] + [1])
        tables[:, :n, :width] = -1
        for kind, scratch in enumerate(self.scratch_blocks):
            ids[2 + kind, :b] = [seq_tables[kind][pos // bs] * bs + pos % bs for seq_tables, pos in decodes]
            ids[2 + kind, b:n] = scratch * bs
            tables[kind, b:n, 0] = scratch
            for row, (seq_tables, _) in enumerate(decodes):
                table = seq_tables[kind]
                tables[kind, row, :len(table)] = table
        self.ids[:, :n].copy_(self.host_ids[:, :n])
        self.tables[:, :n, :width].copy_(self.host_tables[:, :n, :width])
        self.lengths[:n].copy_(self.host_lengths[:n])

    def _forward(self, n: int) -> torch.Tensor:
        """The model's step on the first n rows of the static buffers."""
        batches = [PagedAttentionBatch(self.ids[2 + kind, :n], self.ids[1, :n], n, [], [],
                                       tables=SequenceTables(self.tables[kind, :n], self.lengths[:n],
                                                             self.query_start[:n + 1], 1))
                   for kind in range(len(self.scratch_blocks))]
        batch = batches[0]
        if len(batches) > 1:
            batch.windowed = batches[1]
        return self.model.forward_paged(self.ids[0, :n], self.cache, batch, self.rows[:n])

    @torch.inference_mode()  # as the engine's steps run: no autograd state recorded into the graphs
    def _capture(self) -> None:
        """Record a graph per bucket, the largest first so that the smaller ones reuse its memory."""
        from tqdm import tqdm
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for n in tqdm(sorted(self.buckets, reverse=True), desc="Capturing CUDA graphs", unit="graph", leave=False):
            self._fill([], [], n)  # every row padding: warm-up and capture write the scratch block only
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # Triton compiles and the allocator settles outside the capture
                    self._forward(n)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(n)
            self.graphs[n] = (graph, logits)
        torch.cuda.synchronize()
