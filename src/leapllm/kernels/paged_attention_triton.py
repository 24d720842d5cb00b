"""The Triton kernel of kernels/paged_attention.py's `paged_attention` (its docstring says the contract).

Under TRITON_INTERPRET=1, set before Triton is imported, triton.jit runs the kernel in Triton's
interpreter on CPU tensors: how the tests check it without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def paged_attention_triton(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, query_start: torch.Tensor, max_query_len: int, block_size: int,
                           scale: float, softcap: float | None = None, window: int | None = None) -> torch.Tensor:
    num_tokens, heads, head_dim = q.shape
    kv_heads = k_pool.shape[1]
    group = heads // kv_heads  # query heads per kv head
    # A program's rows are BLOCK_Q tokens x `group` heads; tl.dot wants at least 16 of them.
    block_q = max(1, min(triton.next_power_of_2(max_query_len), max(1, 64 // group)))
    block_m = max(16, triton.next_power_of_2(block_q * group))
    out = torch.empty_like(q)
    grid = (block_tables.shape[0], kv_heads, triton.cdiv(max_query_len, block_q))
    _paged_attention_kernel[grid](
        q, k_pool, v_pool, out, block_tables, seq_lens, query_start,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0), scale, softcap or 0.0, window or 0, head_dim,
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_D=triton.next_power_of_2(head_dim),
        PAGE=block_size, SOFTCAP=softcap is not None, WINDOW=window is not None,
        IEEE=q.dtype == torch.float32,
    )
    return out


@triton.jit
def _paged_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, seq_lens_ptr, query_start_ptr,
                            stride_qt, stride_qh, stride_ks, stride_kh, stride_ot, stride_oh, stride_table,
                            scale, softcap, window, head_dim,
                            GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_D: tl.constexpr, PAGE: tl.constexpr, SOFTCAP: tl.constexpr,
                            WINDOW: tl.constexpr, IEEE: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_block = tl.program_id(2)
    first_token = tl.load(query_start_ptr + seq)
    query_len = tl.load(query_start_ptr + seq + 1) - first_token
    if q_block * BLOCK_Q >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - query_len  # keys cached before this step's tokens

    rows = tl.arange(0, BLOCK_M)  # row r: token q_block * BLOCK_Q + r // GROUP, head r % GROUP of kv_head
    query = q_block * BLOCK_Q + rows // GROUP  # (BLOCK_M,) index among the sequence's queries
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (query < query_len)
    pos = context + query  # (BLOCK_M,) each row's position
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim

    token = first_token + query
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    last = tl.minimum(context + (q_block + 1) * BLOCK_Q, seq_len)  # keys 0 .. last-1 can be seen
    first_key = 0
    if WINDOW:
        first_key = tl.maximum(context + q_block * BLOCK_Q - window + 1, 0)
    offs = tl.arange(0, PAGE)
    for page in range(first_key // PAGE, tl.cdiv(last, PAGE)):
        block = tl.maximum(tl.load(tables_ptr + seq * stride_table + page), 0)  # (freed window pages read as 0)
        key = page * PAGE + offs  # (PAGE,) key positions
        slot = block.to(tl.int64) * PAGE + offs
        kv_off = slot[None, :] * stride_ks + kv_head * stride_kh + d[:, None]  # (BLOCK_D, PAGE)
        k = tl.load(k_ptr + kv_off, mask=d_ok[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = s * scale  # (BLOCK_M, PAGE)
        if SOFTCAP:
            s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)  # softcap * tanh(s / softcap)
        seen = (key[None, :] <= pos[:, None]) & (key[None, :] < seq_len)
        if WINDOW:
            seen &= key[None, :] > pos[:, None] - window
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + tl.trans(kv_off), mask=d_ok[None, :], other=0.0)  # (PAGE, BLOCK_D)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
