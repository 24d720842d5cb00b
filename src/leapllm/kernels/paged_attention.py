"""Attention that reads a paged KV pool in place, for a whole step at once (decodes and prefill chunks).

One call per layer covers every sequence of the step: its queries are the step's flattened tokens,
`query_start` says which tokens belong to which sequence, and each sequence's keys are found through
its row of `block_tables` (token t of it in slot `block_tables[s, t // block_size] * block_size +
t % block_size`, the layout of model/paged_kv_cache.py). A sequence's queries are its last tokens: the
query i of a sequence with n queries and `seq_lens[s]` keys sits at position seq_lens[s] - n + i and
sees the keys at or before it (the last `window` of them in a windowed layer).

Every argument is a tensor of fixed shape for a given batch size and table width, and nothing is read
back to the host: a decode step built on it can be captured in a CUDA graph (engine/decode_graphs.py).

Two implementations of the same contract:
- `paged_attention_triton` (kernels/paged_attention_triton.py): a Triton kernel (GPU). Each program
  takes one sequence, one kv head and a block of its queries (with all query heads that share the kv
  head, so grouped-query attention reads each key once), walks the sequence's pages from its block
  table, and keeps an online softmax in float32 (FlashAttention's recurrence). Only the pages a query
  block can see are read.
- `paged_attention_torch`: the same in PyTorch, gathering every sequence's whole table (the reference
  the kernel is tested against, and the path wherever Triton is missing). Its cost grows with the
  table width, not the sequences' lengths.
"""

from __future__ import annotations

import functools
import importlib.util

import torch


@functools.cache
def triton_available() -> bool:
    """Triton ships with PyTorch's CUDA builds; CPU-only installs run the PyTorch path. (Found without
    importing it: the import alone takes ~0.2 s, which a CPU process never needs to pay.)"""
    return importlib.util.find_spec("triton") is not None


def triton_supports(device: torch.device, q_dtype: torch.dtype, kv_dtype: torch.dtype, block_size: int) -> bool:
    """Whether the Triton kernel runs a step here: on a CUDA device, pages of a power of two of at
    least 16 tokens, keys and values stored in the queries' dtype."""
    return (triton_available() and device.type == "cuda" and block_size >= 16
            and block_size & (block_size - 1) == 0 and kv_dtype == q_dtype)


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start: torch.Tensor, max_query_len: int, block_size: int,
                    scale: float, softcap: float | None = None, window: int | None = None) -> torch.Tensor:
    """q (T, heads, hd); k_pool, v_pool (slots, kv_heads, hd); block_tables (S, max_blocks) int32;
    seq_lens (S,) int32, keys of each sequence after this step; query_start (S + 1,) int32, the first
    token of each sequence in q (and T at the end); max_query_len: the most tokens of one sequence
    (a host-side int, so that the launch needs no sync) -> (T, heads, hd) in q's dtype."""
    if triton_supports(q.device, q.dtype, k_pool.dtype, block_size):
        from leapllm.kernels.paged_attention_triton import paged_attention_triton
        return paged_attention_triton(q, k_pool, v_pool, block_tables, seq_lens, query_start, max_query_len,
                                      block_size, scale, softcap, window)
    return paged_attention_torch(q, k_pool, v_pool, block_tables, seq_lens, query_start, block_size, scale,
                                 softcap, window)


def token_positions(seq_lens: torch.Tensor, query_start: torch.Tensor, num_tokens: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(T,) the sequence of each token and (T,) its position, computed on the device."""
    t = torch.arange(num_tokens, device=query_start.device, dtype=torch.int32)
    seq = torch.searchsorted(query_start[1:].contiguous(), t, right=True)  # (T,)
    query_len = query_start[seq + 1] - query_start[seq]
    return seq, (seq_lens[seq] - query_len + (t - query_start[seq])).long()


def paged_attention_torch(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                          seq_lens: torch.Tensor, query_start: torch.Tensor, block_size: int, scale: float,
                          softcap: float | None = None, window: int | None = None) -> torch.Tensor:
    """paged_attention in PyTorch: each token gathers its sequence's whole table (T, max_blocks *
    block_size keys) and masks what it does not see."""
    num_tokens, heads, _ = q.shape
    kv_heads = k_pool.shape[1]
    seq, pos = token_positions(seq_lens, query_start, num_tokens)
    width = block_tables.shape[1] * block_size
    j = torch.arange(width, device=q.device)
    slots = block_tables.long().clamp(min=0)[seq][:, j // block_size] * block_size + j % block_size  # (T, width)
    visible = j[None, :] <= pos[:, None]
    if window is not None:
        visible &= j[None, :] > pos[:, None] - window
    k = k_pool[slots].to(q.dtype).transpose(1, 2)  # (T, kv_heads, width, hd)
    v = v_pool[slots].to(q.dtype).transpose(1, 2)
    if heads != kv_heads:
        k, v = k.repeat_interleave(heads // kv_heads, dim=1), v.repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.matmul(q.float()[:, :, None, :], k.float().transpose(-1, -2))[:, :, 0] * scale  # (T, heads, width)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs[:, :, None, :], v.float())[:, :, 0].to(q.dtype)  # (T, heads, hd)
