"""A paged key/value cache and the attention that reads it.

Keys and values of every sequence live in one preallocated pool of fixed-size blocks (vLLM's
PagedAttention layout): a sequence owns a list of block ids (its block table) and token t of it
sits in slot `block_table[t // block_size] * block_size + t % block_size`. Sequences of any length
then share one pool without fragmentation, and blocks of a shared prompt prefix can be shared.

A model that mixes windowed and full layers (Gemma) keeps its windowed layers' keys in pools of
their own size, indexed by a second block table per sequence, so that the blocks that fall out of
the window can be given back while the full layers keep everything (`windowed_layers`).

Which blocks a sequence owns is the engine's business (engine/block_allocator.py); this file
holds the tensors and, per step, the `PagedAttentionBatch` that says where each new token's
keys go and which slots each query attends to.

A step's tokens are flattened into one row: first the sequences that add one token (decode),
then the chunks of prompts being prefilled. Projections and the MLP then run as one GEMM over
all tokens; attention runs once per decode group (on the CPU read in place from the pool by a
C++ kernel, elsewhere gathered and padded, with a length mask) and once per prefill chunk (the
CPU kernel's causal chunk attention, or SDPA). Decode sequences are sorted by length
and split into groups whose lengths are within 2x of each other, so a few long contexts do not
make every short one pay for their padding.

On a GPU the step is described per sequence instead (`SequenceTables`: block tables, lengths and
where each sequence's tokens start) and one kernel per layer reads the pool in place for decodes
and prefill chunks alike (kernels/paged_attention.py): no padded copy, nothing read back to the host,
and fixed shapes that a CUDA graph can capture (engine/decode_graphs.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from leapllm.config import KV_DTYPES
from leapllm.kernels.paged_attention import paged_attention
from leapllm.model.attention import AttentionParams, attention, visible_keys
from leapllm.model.kv_cache import cpu_attention_kernels, kv_storage_dtype, lazily_zeroed


class PagedKVCache:
    """Per layer, a key pool and a value pool of shape (num_blocks * block_size, kv_heads, head_dim).

    kv_dtype "int8" stores keys and values as int8 with one float32 scale per (token, kv head):
    1 + 4 / head_dim bytes per value instead of 4 (float32), so the same memory holds ~3.8x the
    tokens. They are dequantized when gathered for attention.

    windowed_layers (with num_window_blocks): the layers whose pools have num_window_blocks blocks
    and that read the step's `windowed` batch, for a model that mixes windowed and full layers.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, kv_dtype: str = "auto",
                 windowed_layers=(), num_window_blocks: int = 0):
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
        if windowed_layers and num_window_blocks < 1:
            raise ValueError("windowed layers need a pool of at least one block")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.windowed_layers, self.num_window_blocks = frozenset(windowed_layers), num_window_blocks
        self.dtype, self.quantized = dtype, kv_dtype == "int8"
        slots = [(num_window_blocks if i in self.windowed_layers else num_blocks) * block_size
                 for i in range(num_layers)]
        store = torch.int8 if self.quantized else kv_storage_dtype(kv_dtype, dtype, device)
        # (slots, kv_heads, head_dim) per layer; in memory as their blocks are first written (on CPU)
        self.k = [lazily_zeroed((n, num_kv_heads, head_dim), store, device) for n in slots]
        self.v = [lazily_zeroed((n, num_kv_heads, head_dim), store, device) for n in slots]
        if self.quantized:
            self.k_scale = [lazily_zeroed((n, num_kv_heads, 1), torch.float32, device) for n in slots]
            self.v_scale = [lazily_zeroed((n, num_kv_heads, 1), torch.float32, device) for n in slots]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype, kv_dtype: str = "auto", device: torch.device | str = "cpu") -> int:
        if kv_dtype == "int8":
            per_value = 1 + 4 / head_dim  # the int8 value plus its share of the float32 scale
        else:
            per_value = torch.empty(0, dtype=kv_storage_dtype(kv_dtype, dtype, device)).element_size()
        return int(2 * num_layers * block_size * num_kv_heads * head_dim * per_value)

    def nbytes(self) -> int:
        pools = self.k + self.v + (self.k_scale + self.v_scale if self.quantized else [])
        return sum(t.numel() * t.element_size() for t in pools)

    def store(self, layer: int, slots: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """k_new, v_new (T, kv_heads, hd) into the pool rows `slots` (T,)."""
        if not self.quantized:
            self.k[layer].index_copy_(0, slots, k_new.to(self.k[layer].dtype))
            self.v[layer].index_copy_(0, slots, v_new.to(self.v[layer].dtype))
            return
        for pool, scales, x in ((self.k[layer], self.k_scale[layer], k_new),
                                (self.v[layer], self.v_scale[layer], v_new)):
            x = x.float()
            scale = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-8)  # (T, kv_heads, 1)
            pool.index_copy_(0, slots, torch.round(x / scale).to(torch.int8))
            scales.index_copy_(0, slots, scale)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks (source, destination) in every layer's pool: copy-on-write of a block
        that several sequences shared (beam search), before one of them writes into it."""
        if not pairs:
            return
        device, bs = self.k[0].device, self.block_size
        offsets = torch.arange(bs, device=device)
        src = (torch.tensor([a for a, _ in pairs], device=device)[:, None] * bs + offsets).reshape(-1)
        dst = (torch.tensor([b for _, b in pairs], device=device)[:, None] * bs + offsets).reshape(-1)
        pools = self.k + self.v + (self.k_scale + self.v_scale if self.quantized else [])
        for i, pool in enumerate(pools):
            if i % len(self.k) not in self.windowed_layers:  # (windowed pools have tables of their own)
                pool.index_copy_(0, dst, pool[src])

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the pool rows `slots` (any shape S) -> (*S, kv_heads, hd) in the compute dtype."""
        if not self.quantized:
            return self.k[layer][slots].to(self.dtype), self.v[layer][slots].to(self.dtype)
        k = (self.k[layer][slots].float() * self.k_scale[layer][slots]).to(self.dtype)
        v = (self.v[layer][slots].float() * self.v_scale[layer][slots]).to(self.dtype)
        return k, v

    def decode_kernels(self):
        """leapllm's CPU kernels when decode attention can read this pool in place (float32 queries,
        a float32 or float16 pool, on the CPU, kernels built); else None, and decode groups are gathered
        and padded for PyTorch's SDPA. The in-place read skips copying every sequence's keys and values
        each layer and step, which took more time than the attention itself at 16 sequences."""
        if self.quantized:
            return None
        return cpu_attention_kernels(self.dtype, self.k[0].dtype, self.k[0].device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: AttentionParams,
               b: PagedAttentionBatch) -> torch.Tensor:
        """q (1, heads, T, hd), k/v (1, kv_heads, T, hd) for the step's T flattened tokens -> (1, heads, T, hd).

        Writes the new keys/values into the slots `b` names, then attends each query over the keys
        of its sequence it sees (the last params.window of them in a windowed layer).
        """
        if layer in self.windowed_layers:
            b = b.windowed  # this layer's pool is indexed by the windowed block tables
        self.store(layer, b.slot_mapping, k[0].transpose(0, 1), v[0].transpose(0, 1))  # (T, kv_heads, hd)
        if b.tables is not None:
            return self._attend_in_place(layer, q, params, b.tables)
        outs = []
        kernels = self.decode_kernels() if params.softcap is None else None
        for g in b.decode_groups:
            slots, lengths, mask = g.window_view(params.window)
            if kernels is not None:
                qd = q[0, :, g.start:g.end].transpose(0, 1).contiguous()  # (d, heads, hd)
                od = kernels.paged_decode_attention(qd, self.k[layer], self.v[layer], slots, lengths,
                                                    params.softmax_scale(q.shape[-1]))
                outs.append(od.transpose(0, 1))  # (heads, d, hd)
                continue
            qd = q[0, :, g.start:g.end].transpose(0, 1).unsqueeze(2)  # (d, heads, 1, hd)
            kd, vd = self.gather(layer, slots)  # (d, keys, kv_heads, hd)
            kd, vd = kd.transpose(1, 2), vd.transpose(1, 2)  # (d, kv_heads, keys, hd)
            od = attention(qd, kd, vd, params, mask)
            outs.append(od.squeeze(2).transpose(0, 1))  # (heads, d, hd)
        for chunk in b.prefills:
            qc = q[:, :, chunk.start:chunk.end]  # (1, heads, n, hd)
            if chunk.slots is None:
                # Nothing cached before this chunk: its own keys are all it sees, as the pool holds them.
                kc, vc = k[:, :, chunk.start:chunk.end], v[:, :, chunk.start:chunk.end]
                if self.k[layer].dtype not in (self.dtype, torch.int8):
                    kc, vc = kc.to(self.k[layer].dtype).to(self.dtype), vc.to(self.k[layer].dtype).to(self.dtype)
            else:
                kc, vc = self.gather(layer, chunk.slots)  # (context, kv_heads, hd)
                kc, vc = kc.transpose(0, 1).unsqueeze(0), vc.transpose(0, 1).unsqueeze(0)  # (1, kv_heads, context, hd)
            if kernels is not None and q.shape[-1] % 16 == 0:  # the CPU kernel's causal chunk attention
                oc = kernels.cached_prefill_attention(qc, kc, vc, chunk.first, params.window or 0,
                                                      params.softmax_scale(q.shape[-1]))  # (1, n, heads, hd)
                outs.append(oc[0].transpose(0, 1))
                continue
            mask = chunk.mask_for(params.window, q.device)
            oc = attention(qc, kc, vc, params, mask, is_causal=mask is None and chunk.end - chunk.start > 1)
            outs.append(oc[0])
        return torch.cat(outs, dim=1).unsqueeze(0) if len(outs) > 1 else outs[0].unsqueeze(0)

    def _attend_in_place(self, layer: int, q: torch.Tensor, params: AttentionParams, t: SequenceTables
                         ) -> torch.Tensor:
        if self.quantized:
            raise ValueError("attention from sequence tables reads float keys; an int8 pool runs by decode groups")
        qt = q[0].transpose(0, 1).contiguous()  # (T, heads, hd)
        out = paged_attention(qt, self.k[layer], self.v[layer], t.block_tables, t.seq_lens, t.query_start,
                              t.max_query_len, self.block_size, params.softmax_scale(q.shape[-1]), params.softcap,
                              params.window)
        return out.transpose(0, 1).unsqueeze(0)  # (1, heads, T, hd)


@dataclass
class SequenceTables:
    """A step per sequence, in the step's token order, for attention that reads the pool in place."""
    block_tables: torch.Tensor  # (S, max_blocks) int32; -1 past a sequence's blocks
    seq_lens: torch.Tensor  # (S,) int32: keys of each sequence once this step's tokens are stored
    query_start: torch.Tensor  # (S + 1,) int32: each sequence's first token in the step; T at the end
    max_query_len: int  # the most tokens one sequence has in the step


def sequence_tables(pieces: list[tuple[list[int], int, int]], device) -> SequenceTables:
    """pieces: (block table, first position, tokens in this step) of each sequence in token order;
    the tables as wide as the longest."""
    width = max(len(table) for table, _, _ in pieces)
    rows = [table + [-1] * (width - len(table)) for table, _, _ in pieces]
    lengths = [first + n for _, first, n in pieces]
    starts = [0]
    for _, _, n in pieces:
        starts.append(starts[-1] + n)
    return SequenceTables(torch.tensor(rows, dtype=torch.int32, device=device),
                          torch.tensor(lengths, dtype=torch.int32, device=device),
                          torch.tensor(starts, dtype=torch.int32, device=device), max(n for _, _, n in pieces))


@dataclass
class DecodeGroup:
    start: int  # decode tokens [start, end) of the step, one per sequence
    end: int
    slots: torch.Tensor  # (end - start, max_len) slots of each sequence's positions, padded
    mask: torch.Tensor  # (end - start, 1, 1, max_len) bool, True where a key is real
    lengths: torch.Tensor  # (end - start,) int64: how many of each row's slots are real
    _windows: dict = field(default_factory=dict, repr=False)  # window -> window_view's answer, built once a step

    def window_view(self, window: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(slots, lengths, mask) of the keys each row's query sees: all of them, or the last
        `window` (row r's slots start at its length - window, so the first lengths[r] are real)."""
        max_len = self.slots.shape[1]
        if window is None or max_len <= window:
            return self.slots, self.lengths, self.mask
        if window not in self._windows:
            first = (self.lengths - window).clamp(min=0)  # (d,)
            cols = (first[:, None] + torch.arange(window, device=self.slots.device)).clamp(max=max_len - 1)
            lengths = self.lengths.clamp(max=window)
            mask = (torch.arange(window, device=self.slots.device)[None, :] < lengths[:, None])[:, None, None, :]
            self._windows[window] = (self.slots.gather(1, cols), lengths, mask)
        return self._windows[window]


@dataclass
class PrefillChunk:
    start: int  # this chunk's tokens are [start, end) of the step's flattened tokens
    end: int
    first: int  # the position of the chunk's first token in its sequence
    slots: torch.Tensor | None  # (context,) slots of positions 0 .. last of the chunk; None if nothing cached before
    verify: bool = False  # a speculative verification chunk: each token's pass is its own decode step
    _masks: dict = field(default_factory=dict, repr=False)  # window -> mask_for's answer, built once a step

    def mask_for(self, window: int | None, device) -> torch.Tensor | None:
        """visible_keys' mask (n, context) for this chunk's queries: None means plain causal."""
        if window not in self._masks:
            self._masks[window] = visible_keys(self.first, self.end - self.start, window, device)[0]
        return self._masks[window]


@dataclass
class PagedAttentionBatch:
    """Where a step's tokens go in the pool and what each query attends to (built once, used by every layer)."""
    slot_mapping: torch.Tensor  # (T,) slot of each new token
    positions: torch.Tensor  # (T,) position of each new token in its sequence
    num_decode: int  # the first num_decode tokens are one-token steps of distinct sequences
    decode_groups: list[DecodeGroup]
    prefills: list[PrefillChunk]
    # The same step on the windowed layers' block tables, for a cache with windowed_layers.
    windowed: PagedAttentionBatch | None = None
    # An encoder-decoder's step: the source each token's cross-attention reads.
    cross: CrossAttentionBatch | None = None
    # Set instead of decode_groups and prefills: attention reads the pool in place per sequence.
    tables: SequenceTables | None = None

    def pass_lengths(self) -> torch.Tensor:
        """(T,) for each token, its sequence's last position in this step + 1: the length a model
        would see running that sequence's piece of the step alone (LongRoPE and dynamic NTK)."""
        lengths = self.positions + 1
        for chunk in self.prefills:
            if not chunk.verify:  # (a verification chunk's tokens keep their own, as decode steps would)
                lengths[chunk.start:chunk.end] = lengths[chunk.end - 1]
        return lengths


@dataclass
class CrossAttentionBatch:
    """Where the encoder outputs (cross-attention keys and values) of each of a step's T tokens lie:
    its request's source, in a pool of its own. Cross-attention has no causal order, so every token
    of the step, decode or prefill, is one row of one attention over its source's slots."""
    slots: torch.Tensor  # (T, longest source) pool rows of each token's source, padded
    lengths: torch.Tensor  # (T,) int64: the source's length (its first `length` slots are real)
    mask: torch.Tensor  # (T, 1, 1, longest) bool, True on real source positions


def build_cross_batch(pieces: list[tuple[list[int], int, int]], block_size: int, device) -> CrossAttentionBatch:
    """pieces: (the source's block table, source length, tokens in this step) of each request's
    piece of the step, in the step's token order (build_paged_batch's)."""
    longest = max(length for _, length, _ in pieces)
    slots = slot_table([table for table, _, _ in pieces], longest, block_size, device)  # (pieces, longest)
    counts = torch.tensor([n for _, _, n in pieces], dtype=torch.long, device=device)
    lengths = torch.tensor([length for _, length, _ in pieces], dtype=torch.long, device=device)
    slots, lengths = slots.repeat_interleave(counts, dim=0), lengths.repeat_interleave(counts)
    mask = (torch.arange(longest, device=device)[None, :] < lengths[:, None])[:, None, None, :]
    return CrossAttentionBatch(slots, lengths, mask)


def slot_table(block_tables: list[list[int]], length: int, block_size: int, device) -> torch.Tensor:
    """(len(block_tables), length) slots of positions 0 .. length-1 of each sequence.

    Tables shorter than `length` needs are padded with their first block, and entries freed out
    of a sliding window (negative) read as block 0: those slots are real memory, and the caller
    masks them out.
    """
    num = -(-length // block_size)
    padded = [t[:num] + [t[0]] * (num - len(t[:num])) for t in block_tables]
    tables = torch.tensor(padded, dtype=torch.long, device=device).clamp(min=0)  # (seqs, blocks)
    j = torch.arange(length, device=device)
    return tables[:, j // block_size] * block_size + j % block_size


def build_paged_batch(decodes: list[tuple[list[int], int]], prefills: list[tuple], block_size: int,
                      device: torch.device, per_sequence: bool = False) -> PagedAttentionBatch:
    """decodes: (block_table, position) of each one-token sequence, longest first; prefills:
    (block_table, first position, number of tokens) of each chunk, with True as a fourth item for a
    speculative verification chunk. Token order in the step: decodes, then chunks.

    per_sequence: describe the step by SequenceTables (attention in place on a GPU) instead of decode
    groups and prefill chunks."""
    if per_sequence:
        pieces = [(table, pos, 1) for table, pos in decodes] + [(table, first, n) for table, first, n, *_ in prefills]
        slots, positions = [], []
        for table, first, n in pieces:
            for pos in range(first, first + n):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
            positions.extend(range(first, first + n))
        return PagedAttentionBatch(torch.tensor(slots, dtype=torch.long, device=device),
                                   torch.tensor(positions, dtype=torch.long, device=device), len(decodes), [], [],
                                   tables=sequence_tables(pieces, device))
    slot_mapping: list = []  # ints for decode tokens, then a tensor per prefill chunk
    positions: list[int] = []
    groups = []
    lengths = [pos + 1 for _, pos in decodes]
    if any(a < b for a, b in zip(lengths, lengths[1:])):
        raise ValueError("decode sequences must come longest first")
    start = 0
    while start < len(decodes):
        end = start + 1
        while end < len(decodes) and 2 * lengths[end] > lengths[start]:
            end += 1
        max_len = lengths[start]
        for table, pos in decodes[start:end]:
            slot_mapping.append(table[pos // block_size] * block_size + pos % block_size)
            positions.append(pos)
        slots = slot_table([table for table, _ in decodes[start:end]], max_len, block_size, device)
        lengths_t = torch.tensor(lengths[start:end], dtype=torch.long, device=device)
        mask = (torch.arange(max_len, device=device)[None, :] < lengths_t[:, None])[:, None, None, :]
        groups.append(DecodeGroup(start, end, slots, mask, lengths_t))
        start = end
    chunks = []
    offset = len(decodes)
    for table, first, n, *verify in prefills:
        slots = slot_table([table], first + n, block_size, device)[0]  # (first + n,)
        slot_mapping.append(slots[first:])
        positions.extend(range(first, first + n))
        chunks.append(PrefillChunk(offset, offset + n, first, slots if first > 0 else None, bool(verify and verify[0])))
        offset += n
    decode_slots = [torch.tensor(slot_mapping[:len(decodes)], dtype=torch.long, device=device)]
    return PagedAttentionBatch(
        slot_mapping=torch.cat(decode_slots + slot_mapping[len(decodes):]),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        num_decode=len(decodes), decode_groups=groups, prefills=chunks,
    )
