"""The attention core every path shares: which keys a query sees, and softmax(q.k * scale) v.

A layer's attention differs between model families in three ways, all held by `AttentionParams`:
the softmax scale (Gemma's query_pre_attn_scalar), a soft cap on the scores (Gemma 2's
cap * tanh(scores / cap)) and a sliding window (Mistral, Gemma's local layers: a query sees its
own key and the window - 1 keys before it, as transformers' sliding-window mask does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionParams:
    grouped: bool  # grouped-query attention: several query heads share a kv head
    scale: float | None = None  # None: 1 / sqrt(head_dim)
    softcap: float | None = None
    window: int | None = None  # keys a query sees, its own included; None: every key before it

    def softmax_scale(self, head_dim: int) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(head_dim)


def visible_keys(first: int, n: int, window: int | None, device) -> tuple[torch.Tensor | None, bool]:
    """What queries at positions first .. first+n-1 see of keys 0 .. first+n-1: (mask, is_causal).

    mask is bool (n, first + n), True where a key is visible; None with is_causal when the plain
    causal rule says it (nothing before the queries), None without it when every key is visible.
    """
    if window is None or first + n <= window:
        if first == 0:
            return None, n > 1
        if n == 1:
            return None, False
    keys = torch.arange(first + n, device=device)
    queries = torch.arange(first, first + n, device=device)[:, None]
    mask = keys[None, :] <= queries
    if window is not None:
        mask &= keys[None, :] > queries - window
    return mask, False


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: AttentionParams,
              mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """q (batch, heads, n, hd), k and v (batch, kv_heads, m, hd) -> (batch, heads, n, hd).

    mask: bool, broadcastable to (batch, heads, n, m), True where a key is visible.
    """
    if params.softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=params.scale,
                                              enable_gqa=params.grouped)
    # PyTorch's SDPA has no soft cap: the scores are materialized, as transformers' eager path does.
    probs = attention_probabilities(q, k, params, mask, is_causal)  # (batch, heads, n, m)
    if params.grouped:
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return torch.matmul(probs.to(q.dtype), v)


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, params: AttentionParams,
                            mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """The softmax that `attention` weighs the values with, materialized: (batch, heads, n, m), float32.

    Only the soft-capped path and attention maps (`Transformer.attention_maps`) compute it; every
    other path leaves the probabilities inside SDPA.
    """
    if params.grouped:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * params.softmax_scale(q.shape[-1])  # (batch, heads, n, m)
    if params.softcap is not None:
        scores = torch.tanh(scores / params.softcap) * params.softcap
    if is_causal:
        n, m = scores.shape[-2:]
        mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1)


@dataclass
class AttentionMaps:
    """One kind of attention of a model over a text ("self" in a decoder or an encoder; "encoder",
    "decoder" and "cross" in an encoder-decoder): per layer, the probabilities each query token
    gives each key token."""

    kind: str
    query_tokens: list[str]
    key_tokens: list[str]
    layers: list[torch.Tensor]  # per layer (heads, queries, keys), float32; each row sums to 1
