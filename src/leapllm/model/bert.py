"""A BERT-family encoder (BERT, MiniLM, RoBERTa) in plain PyTorch, and sentence-embedding pooling.

Read top to bottom: embeddings (word + position + token type, then LayerNorm), post-norm layers
(attention, add, LayerNorm; GELU MLP, add, LayerNorm), and pooling. Unlike the decoder, every
token sees every other token; padding is hidden by a key mask. Q/K/V are one fused matmul.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class EncoderConfig:
    model_type: str  # "bert" or "roberta"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def position_offset(self) -> int:
        # RoBERTa numbers positions from pad_token_id + 1 (its position table has 2 extra rows).
        return self.pad_token_id + 1 if self.model_type == "roberta" else 0

    @property
    def max_tokens(self) -> int:
        return self.max_position_embeddings - self.position_offset


ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # the exact erf form, as BERT uses
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class EncoderEmbeddings(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.position_offset = c.position_offset

    def forward(self, input_ids, token_type_ids):
        # input_ids, token_type_ids: (batch, seq)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device) + self.position_offset
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None] \
            + self.token_type_embeddings(token_type_ids)
        return self.norm(x)  # (batch, seq, hidden)


class EncoderAttention(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.num_heads, self.head_dim = c.num_heads, c.head_dim
        self.qkv_proj = nn.Linear(c.hidden_size, 3 * c.hidden_size)
        self.o_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x, key_mask):
        batch, seq, hidden = x.shape
        q, k, v = self.qkv_proj(x).view(batch, seq, 3, self.num_heads, self.head_dim).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, heads, seq, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        out = out.transpose(1, 2).reshape(batch, seq, hidden)
        return self.norm(x + self.o_proj(out))  # post-norm: residual first, then LayerNorm


class EncoderMLP(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        if c.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {c.hidden_act!r}")
        self.act = ACTIVATIONS[c.hidden_act]

    def forward(self, x):
        return self.norm(x + self.down_proj(self.act(self.up_proj(x))))


class EncoderLayer(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.attn = EncoderAttention(c)
        self.mlp = EncoderMLP(c)

    def forward(self, x, key_mask):
        return self.mlp(self.attn(x, key_mask))


class Encoder(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.embeddings = EncoderEmbeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))

    @property
    def device(self) -> torch.device:
        return self.embeddings.word_embeddings.weight.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, attention_mask (1 = real token, 0 = padding): (batch, seq) -> hidden (batch, seq, hidden)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        key_mask = attention_mask.bool()[:, None, None, :]  # (batch, 1, 1, seq): who may be attended to
        for layer in self.layers:
            x = layer(x, key_mask)
        return x


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the real tokens' vectors, as sentence-transformers' mean pooling: (batch, hidden)."""
    mask = attention_mask.to(hidden.dtype)[:, :, None]
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "mean":
        return mean_pool(hidden, attention_mask)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(~attention_mask.bool()[:, :, None], -math.inf).max(1).values
    if mode == "mean_sqrt_len":
        mask = attention_mask.to(hidden.dtype)[:, :, None]
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1).sqrt()
    raise ValueError(f"unknown pooling mode {mode!r}")
