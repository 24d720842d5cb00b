"""BERT-family encoders (BERT, MiniLM, DistilBERT, RoBERTa, XLM-R, ALBERT) in plain PyTorch, their
task heads, and sentence-embedding pooling.

Read top to bottom: embeddings (word + position [+ token type], then LayerNorm, and for ALBERT a
projection from its small embedding width up to the hidden width), post-norm layers (attention,
add, LayerNorm; GELU MLP, add, LayerNorm), the heads fine-tuned checkpoints carry, and pooling.
Unlike the decoder, every token sees every other token; padding is hidden by a key mask. Q/K/V
are one fused matmul.

The families differ only in switches of one config: DistilBERT has no token types, RoBERTa and
XLM-R number positions from pad_token_id + 1, and ALBERT shares its layers: `layers` holds the
distinct layers (num_hidden_groups x inner_group_num) and `layer_schedule` says which one runs at
each step, so its one layer group runs num_hidden_layers times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class EncoderConfig:
    model_type: str  # "bert", "roberta" (XLM-R too), "distilbert" or "albert"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int  # 0: no token-type embeddings (DistilBERT)
    layer_norm_eps: float
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    embedding_size: int | None = None  # ALBERT's factorized embeddings; None: hidden_size
    num_hidden_groups: int = 1  # ALBERT: distinct layer groups, each run num_layers / groups times
    inner_group_num: int = 1  # ALBERT: layers in one group

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def embedding_width(self) -> int:
        return self.embedding_size or self.hidden_size

    @property
    def position_offset(self) -> int:
        # RoBERTa numbers positions from pad_token_id + 1 (its position table has 2 extra rows).
        return self.pad_token_id + 1 if self.model_type == "roberta" else 0

    @property
    def max_tokens(self) -> int:
        return self.max_position_embeddings - self.position_offset

    @property
    def layer_schedule(self) -> list[int]:
        """Which of the distinct layers runs at each step (ALBERT's grouping; 0..n-1 for the others)."""
        if self.model_type != "albert":
            return list(range(self.num_layers))
        steps = []
        for i in range(self.num_layers):
            group = int(i / (self.num_layers / self.num_hidden_groups))  # as ALBERT's own code computes it
            steps += [group * self.inner_group_num + j for j in range(self.inner_group_num)]
        return steps

    @property
    def num_distinct_layers(self) -> int:
        return self.num_hidden_groups * self.inner_group_num if self.model_type == "albert" else self.num_layers


ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # the exact erf form, as BERT uses
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class EncoderEmbeddings(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        width = c.embedding_width
        self.word_embeddings = nn.Embedding(c.vocab_size, width)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, width)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, width) if c.type_vocab_size > 0 else None
        self.norm = nn.LayerNorm(width, eps=c.layer_norm_eps)
        self.roberta_positions = c.model_type == "roberta"
        self.pad_token_id = c.pad_token_id

    def forward(self, input_ids, token_type_ids):
        # input_ids, token_type_ids: (batch, seq)
        if self.roberta_positions:
            # Real tokens count up from pad + 1 and padding sits at pad, wherever it is (left padding too).
            real = (input_ids != self.pad_token_id).long()
            positions = torch.cumsum(real, dim=1) * real + self.pad_token_id
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.norm(x)  # (batch, seq, embedding width)


class EncoderAttention(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.num_heads, self.head_dim = c.num_heads, c.head_dim
        self.qkv_proj = nn.Linear(c.hidden_size, 3 * c.hidden_size)
        self.o_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x, key_mask, return_attention: bool = False):
        batch, seq, hidden = x.shape
        q, k, v = self.qkv_proj(x).view(batch, seq, 3, self.num_heads, self.head_dim).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, heads, seq, head_dim)
        probs = None
        if return_attention:
            # The explicit form, only when the probabilities are wanted: SDPA never materializes them.
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # (batch, heads, seq, seq)
            probs = scores.masked_fill(~key_mask, -math.inf).softmax(dim=-1)
            out = probs @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        out = out.transpose(1, 2).reshape(batch, seq, hidden)
        return self.norm(x + self.o_proj(out)), probs  # post-norm: residual first, then LayerNorm


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

    def forward(self, x, key_mask, return_attention: bool = False):
        x, probs = self.attn(x, key_mask, return_attention)
        return self.mlp(x), probs


class Encoder(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.embeddings = EncoderEmbeddings(config)
        # ALBERT's embeddings are narrower than its layers; the others need no projection.
        self.embedding_projection = nn.Linear(config.embedding_width, config.hidden_size) \
            if config.embedding_width != config.hidden_size else None
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_distinct_layers))
        self.layer_schedule = config.layer_schedule

    @property
    def device(self) -> torch.device:
        return self.embeddings.word_embeddings.weight.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, return_attention: bool = False):
        """input_ids, attention_mask (1 = real token, 0 = padding): (batch, seq) -> hidden (batch, seq, hidden).

        With return_attention, (hidden, attentions): one (batch, heads, seq, seq) tensor of attention
        probabilities per layer run, in order (a query row sums to 1 over the real tokens)."""
        if token_type_ids is None or self.embeddings.token_type_embeddings is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        if self.embedding_projection is not None:
            x = self.embedding_projection(x)
        key_mask = attention_mask.bool()[:, None, None, :]  # (batch, 1, 1, seq): who may be attended to
        attentions = []
        for index in self.layer_schedule:
            x, probs = self.layers[index](x, key_mask, return_attention)
            attentions.append(probs)
        return (x, attentions) if return_attention else x


# -- task heads --------------------------------------------------------------------------------
# Fine-tuned checkpoints put one of these on the encoder. Every sequence-classification layout is
# "dense, activation, out" on the first token ([CLS] or <s>): BERT and ALBERT call the dense part
# their pooler (tanh), RoBERTa/XLM-R its classifier.dense (tanh), DistilBERT its pre_classifier (ReLU).

class SequenceClassificationHead(nn.Module):
    def __init__(self, hidden_size: int, num_labels: int, activation: str = "tanh"):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, num_labels)
        self.activation = torch.tanh if activation == "tanh" else F.relu

    def forward(self, hidden):  # (batch, seq, hidden) -> (batch, labels)
        return self.out(self.activation(self.dense(hidden[:, 0])))


class TokenHead(nn.Module):
    """One linear layer over every token: per-token label logits (token classification), or the
    (start, end) logit pair of extractive question answering (num_outputs = 2)."""

    def __init__(self, hidden_size: int, num_outputs: int):
        super().__init__()
        self.out = nn.Linear(hidden_size, num_outputs)

    def forward(self, hidden):  # (batch, seq, hidden) -> (batch, seq, outputs)
        return self.out(hidden)


class EncoderWithHead(nn.Module):
    """An encoder and its task head: (batch, seq) ids -> the head's logits."""

    def __init__(self, encoder: Encoder, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    @property
    def config(self) -> EncoderConfig:
        return self.encoder.config

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return self.head(self.encoder(input_ids, attention_mask, token_type_ids))


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
