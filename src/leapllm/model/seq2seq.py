"""Encoder-decoder transformers (T5 v1.0/v1.1/Flan-T5/mT5, BART, mBART, MarianMT) in plain PyTorch.

Read top to bottom: the norms and embeddings, attention (self and cross) with its one core, the
feed-forward, the encoder and decoder layers, the two stacks, and the whole model. One set of
modules covers the four families; `Seq2SeqConfig.family` switches what differs:

    family   norm            where         positions                       embeddings         head
    t5       RMS, no bias    pre-norm      relative buckets (layer 0's,    unscaled           tied: d_model**-0.5
                                           shared by every layer)                             rescale (v1.0)
    bart     LayerNorm       post-norm     learned, offset 2               LayerNorm after    + final_logits_bias
    mbart    LayerNorm       pre-norm +    learned, offset 2               sqrt(d) scale,     + final_logits_bias
                             final norms                                   LayerNorm after
    marian   LayerNorm       post-norm     sinusoidal (static)             sqrt(d) scale      + final_logits_bias

T5 has no biases anywhere and does not scale its attention scores by 1/sqrt(head_dim).

Decoding runs one token per step against a `DecoderCache`: each layer's self-attention keys and
values (batch-first, appended at `length`) and its cross-attention keys and values, projected once
per request from the encoder output (and expanded per beam once). Attention goes through
F.scaled_dot_product_attention; only `return_attention=True` takes the explicit softmax, to hand
back every layer's probabilities (batch, heads, q_len, k_len) for attention maps.

The serving engine (engine/llm_engine.py) decodes through `forward_paged` instead: many requests'
decoder tokens flattened into one pass, as the decoder LLMs' serving step. Their self-attention
keys and values live in a paged pool, their sources' cross-attention keys and values in a second
one, written once by `encode_paged` when a request starts (`PagedDecoderCache`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from leapllm.model.attention import AttentionParams
from leapllm.model.llama import RMSNorm
from leapllm.model.paged_kv_cache import CrossAttentionBatch, PagedAttentionBatch, PagedKVCache

FAMILIES = ("t5", "bart", "mbart", "marian")

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,  # the exact erf form
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,  # Marian's name for SiLU
}


@dataclass
class Seq2SeqConfig:
    family: str  # one of FAMILIES
    vocab_size: int  # the encoder's (and the shared) vocabulary
    d_model: int
    num_heads: int
    head_dim: int  # T5 sets it apart (d_kv): heads * head_dim may differ from d_model
    encoder_layers: int
    decoder_layers: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    activation: str = "relu"
    gated_ffn: bool = False  # T5 v1.1: act(gate(x)) * up(x)
    norm_eps: float = 1e-5
    max_positions: int = 0  # rows of the learned / sinusoidal table (BART, mBART, Marian)
    relative_buckets: int = 32  # T5's relative position buckets and the distance the last one starts at
    relative_max_distance: int = 128
    scale_embedding: bool = False  # multiply token embeddings by sqrt(d_model)
    scale_decoder_output: bool = False  # T5 v1.0 with tied head: decoder output * d_model**-0.5
    decoder_vocab_size: int = 0  # Marian with separate vocabularies; 0: the same as vocab_size
    pad_token_id: int = 0

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown encoder-decoder family {self.family!r}")
        self.decoder_vocab_size = self.decoder_vocab_size or self.vocab_size

    @property
    def is_t5(self) -> bool:
        return self.family == "t5"

    @property
    def pre_norm(self) -> bool:
        return self.family in ("t5", "mbart")

    @property
    def final_norm(self) -> bool:  # a norm after the last layer of each stack
        return self.family in ("t5", "mbart")

    @property
    def embedding_norm(self) -> bool:  # BART's layernorm_embedding
        return self.family in ("bart", "mbart")

    @property
    def bias(self) -> bool:
        return not self.is_t5

    @property
    def logits_bias(self) -> bool:  # final_logits_bias
        return not self.is_t5

    @property
    def attention_scale(self) -> float:
        return 1.0 if self.is_t5 else self.head_dim ** -0.5

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def context_length(self) -> int:
        """The most decoder positions: the position table's rows; T5's relative positions set no
        limit (the KV pool does)."""
        return 1 << 30 if self.is_t5 else self.max_positions

    @property
    def max_source_tokens(self) -> int | None:
        """The longest source the position table holds; None for T5 (relative positions)."""
        return None if self.is_t5 else self.max_positions


def make_norm(c: Seq2SeqConfig) -> nn.Module:
    if c.is_t5:  # T5's norm is the decoders' RMSNorm: scale only, no mean, no bias
        return RMSNorm(c.d_model, c.norm_eps)
    return nn.LayerNorm(c.d_model, eps=c.norm_eps)


def sinusoidal_table(num_positions: int, dim: int) -> torch.Tensor:
    """Marian's static position table as transformers builds it: sin of every even frequency in the
    first half of each row, cos of the same frequencies in the second half (not interleaved)."""
    j = torch.arange(dim, dtype=torch.float64)
    angles = torch.arange(num_positions, dtype=torch.float64)[:, None] / torch.pow(10000.0, 2 * (j // 2) / dim)
    half = (dim + 1) // 2
    table = torch.empty(num_positions, dim, dtype=torch.float64)
    table[:, :half] = torch.sin(angles[:, 0::2])
    table[:, half:] = torch.cos(angles[:, 1::2])
    return table.float()


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5's bucket of each (key position - query position): exact buckets for the nearest half,
    logarithmically wider ones up to max_distance, the last bucket beyond. Bidirectional (the
    encoder) gives keys after the query their own half of the buckets; causal (the decoder) folds
    them into distance 0."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    # The same float32 arithmetic as the reference, so that the bucket edges fall alike.
    log_bucket = max_exact + (torch.log(distance.clamp(min=1).float() / max_exact)
                              / math.log(max_distance / max_exact) * (num_buckets - max_exact)).long()
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, log_bucket)


class RelativePositionBias(nn.Module):
    """T5's learned per-head score bias by relative-position bucket: (1, heads, q_len, k_len)."""

    def __init__(self, c: Seq2SeqConfig, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = c.relative_buckets, c.relative_max_distance
        self.embedding = nn.Embedding(c.relative_buckets, c.num_heads)

    def forward(self, query_positions: torch.Tensor, key_length: int) -> torch.Tensor:
        keys = torch.arange(key_length, device=query_positions.device)
        buckets = relative_position_bucket(keys[None, :] - query_positions[:, None], self.bidirectional,
                                           self.num_buckets, self.max_distance)  # (q_len, k_len)
        return self.embedding(buckets).permute(2, 0, 1)[None]


class Embeddings(nn.Module):
    """Token embeddings (scaled or not) plus absolute positions (learned or sinusoidal), then
    BART's LayerNorm; T5's token embeddings alone."""

    def __init__(self, c: Seq2SeqConfig, vocab_size: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, c.d_model)
        self.scale = math.sqrt(c.d_model) if c.scale_embedding else 1.0
        self.position_offset = 0
        self.positions: nn.Module | None = None
        if c.family in ("bart", "mbart"):
            self.position_offset = 2  # BART numbers positions from 2 (its table has 2 extra rows)
            self.positions = nn.Embedding(c.max_positions + 2, c.d_model)
        elif c.family == "marian":
            self.register_buffer("sinusoids", sinusoidal_table(c.max_positions, c.d_model), persistent=False)
        self.norm = make_norm(c) if c.embedding_norm else None

    def forward(self, input_ids: torch.Tensor, start: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        # input_ids: (batch, seq) at positions start, start + 1, ... or at `positions` (seq,)
        x = self.tokens(input_ids)
        if self.scale != 1.0:
            x = x * self.scale
        if positions is None:
            positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        if self.positions is not None:
            x = x + self.positions(positions + self.position_offset)[None]
        elif hasattr(self, "sinusoids"):
            x = x + self.sinusoids[positions].to(x.dtype)[None]
        return self.norm(x) if self.norm is not None else x  # (batch, seq, d_model)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float,
           return_attention: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q: (batch, heads, q_len, head_dim), k/v: (batch, heads, k_len, head_dim); bias: additive
    scores (masks and T5's position bias) broadcastable to (batch, heads, q_len, k_len)."""
    if not return_attention:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale), None
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    probs = scores.float().softmax(dim=-1).to(q.dtype)
    return torch.matmul(probs, v), probs


class SelfAttention(nn.Module):
    def __init__(self, c: Seq2SeqConfig):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = c.num_heads, c.head_dim, c.attention_scale
        self.qkv_proj = nn.Linear(c.d_model, 3 * c.inner_dim, bias=c.bias)  # q, k, v in one matmul
        self.o_proj = nn.Linear(c.inner_dim, c.d_model, bias=c.bias)

    def forward(self, x, bias, cache: DecoderCache | None = None, layer: int = 0, return_attention: bool = False):
        batch, seq, _ = x.shape
        q, k, v = self.qkv_proj(x).view(batch, seq, 3, self.num_heads, self.head_dim).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, heads, seq, head_dim)
        if cache is not None:  # the decoder: append, then attend to everything so far
            k, v = cache.append(layer, k, v)
        out, probs = attend(q, k, v, bias, self.scale, return_attention)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1)), probs

    def forward_paged(self, x, pool: PagedKVCache, layer: int, batch: PagedAttentionBatch,
                      biases: PagedPositionBiases | None):
        """x (1, T, d_model): a serving step's tokens; their keys and values go into the pool."""
        tokens = x.shape[1]
        q, k, v = self.qkv_proj(x).view(1, tokens, 3, self.num_heads, self.head_dim).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (1, heads, T, head_dim)
        if biases is None:  # no position bias: the decoder LLMs' paged attention (in place on the CPU)
            out = pool.attend(layer, q, k, v, AttentionParams(grouped=False, scale=self.scale), batch)
        else:
            out = paged_attention_with_bias(pool, layer, q, k, v, batch, biases, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(1, tokens, -1))


class CrossAttention(nn.Module):
    def __init__(self, c: Seq2SeqConfig):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = c.num_heads, c.head_dim, c.attention_scale
        self.q_proj = nn.Linear(c.d_model, c.inner_dim, bias=c.bias)
        self.kv_proj = nn.Linear(c.d_model, 2 * c.inner_dim, bias=c.bias)  # k, v in one matmul
        self.o_proj = nn.Linear(c.inner_dim, c.d_model, bias=c.bias)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder output's keys and values: (batch, src, d_model) -> 2 x (batch, heads, src, head_dim)."""
        batch, src, _ = memory.shape
        k, v = self.kv_proj(memory).view(batch, src, 2, self.num_heads, self.head_dim).unbind(2)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, k, v, bias, return_attention: bool = False):
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        out, probs = attend(q, k, v, bias, self.scale, return_attention)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1)), probs

    def forward_paged(self, x, pool: PagedKVCache, layer: int, cross: CrossAttentionBatch):
        """x (1, T, d_model): each token attends over its own request's source in the pool."""
        tokens = x.shape[1]
        q = self.q_proj(x).view(tokens, self.num_heads, self.head_dim)
        kernels = pool.decode_kernels()
        if kernels is not None:  # reads the pool in place, one row per token
            out = kernels.paged_decode_attention(q.contiguous(), pool.k[layer], pool.v[layer], cross.slots,
                                                 cross.lengths, self.scale)  # (T, heads, head_dim)
        else:
            k, v = pool.gather(layer, cross.slots)  # (T, longest, heads, head_dim)
            out = F.scaled_dot_product_attention(q[:, :, None], k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=cross.mask, scale=self.scale)[:, :, 0]
        return self.o_proj(out.reshape(1, tokens, -1))


class FeedForward(nn.Module):
    def __init__(self, c: Seq2SeqConfig, ffn_dim: int):
        super().__init__()
        self.act = ACTIVATIONS[c.activation]
        self.gate_proj = nn.Linear(c.d_model, ffn_dim, bias=c.bias) if c.gated_ffn else None
        self.up_proj = nn.Linear(c.d_model, ffn_dim, bias=c.bias)
        self.down_proj = nn.Linear(ffn_dim, c.d_model, bias=c.bias)

    def forward(self, x):
        if self.gate_proj is not None:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class EncoderLayer(nn.Module):
    def __init__(self, c: Seq2SeqConfig):
        super().__init__()
        self.pre_norm = c.pre_norm
        self.self_attn, self.self_attn_norm = SelfAttention(c), make_norm(c)
        self.ffn, self.ffn_norm = FeedForward(c, c.encoder_ffn_dim), make_norm(c)

    def forward(self, x, bias, return_attention=False):
        if self.pre_norm:
            out, probs = self.self_attn(self.self_attn_norm(x), bias, return_attention=return_attention)
            x = x + out
            return x + self.ffn(self.ffn_norm(x)), probs
        out, probs = self.self_attn(x, bias, return_attention=return_attention)
        x = self.self_attn_norm(x + out)  # post-norm: residual first, then the norm
        return self.ffn_norm(x + self.ffn(x)), probs


class DecoderLayer(nn.Module):
    def __init__(self, c: Seq2SeqConfig):
        super().__init__()
        self.pre_norm = c.pre_norm
        self.self_attn, self.self_attn_norm = SelfAttention(c), make_norm(c)
        self.cross_attn, self.cross_attn_norm = CrossAttention(c), make_norm(c)
        self.ffn, self.ffn_norm = FeedForward(c, c.decoder_ffn_dim), make_norm(c)

    def forward(self, x, self_bias, cache: DecoderCache, layer: int, return_attention=False):
        k, v = cache.cross_keys[layer], cache.cross_values[layer]
        if self.pre_norm:
            out, self_probs = self.self_attn(self.self_attn_norm(x), self_bias, cache, layer, return_attention)
            x = x + out
            out, cross_probs = self.cross_attn(self.cross_attn_norm(x), k, v, cache.cross_bias, return_attention)
            x = x + out
            return x + self.ffn(self.ffn_norm(x)), self_probs, cross_probs
        out, self_probs = self.self_attn(x, self_bias, cache, layer, return_attention)
        x = self.self_attn_norm(x + out)
        out, cross_probs = self.cross_attn(x, k, v, cache.cross_bias, return_attention)
        x = self.cross_attn_norm(x + out)
        return self.ffn_norm(x + self.ffn(x)), self_probs, cross_probs

    def forward_paged(self, x, cache: PagedDecoderCache, layer: int, batch: PagedAttentionBatch,
                      biases: PagedPositionBiases | None):
        if self.pre_norm:
            x = x + self.self_attn.forward_paged(self.self_attn_norm(x), cache.self_kv, layer, batch, biases)
            x = x + self.cross_attn.forward_paged(self.cross_attn_norm(x), cache.cross_kv, layer, batch.cross)
            return x + self.ffn(self.ffn_norm(x))
        x = self.self_attn_norm(x + self.self_attn.forward_paged(x, cache.self_kv, layer, batch, biases))
        x = self.cross_attn_norm(x + self.cross_attn.forward_paged(x, cache.cross_kv, layer, batch.cross))
        return self.ffn_norm(x + self.ffn(x))


def padding_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, src) of 1 (token) / 0 (padding) -> additive (batch, 1, 1, src): the dtype's minimum on
    padding (not -inf, so that a fully padded row still softmaxes to numbers)."""
    return torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        attention_mask == 0, torch.finfo(dtype).min)[:, None, None, :]


@dataclass
class EncoderOutput:
    hidden: torch.Tensor  # (batch, src, d_model)
    attention_mask: torch.Tensor  # (batch, src): 1 token, 0 padding
    attentions: list[torch.Tensor] = field(default_factory=list)  # per layer (batch, heads, src, src), if asked


class Encoder(nn.Module):
    def __init__(self, c: Seq2SeqConfig):
        super().__init__()
        self.embed = Embeddings(c, c.vocab_size)
        self.relative_bias = RelativePositionBias(c, bidirectional=True) if c.is_t5 else None
        self.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.encoder_layers))
        self.final_norm = make_norm(c) if c.final_norm else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                return_attention: bool = False) -> EncoderOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.embed(input_ids)
        bias = padding_bias(attention_mask, x.dtype)  # (batch, 1, 1, src)
        if self.relative_bias is not None:  # computed once, shared by every layer
            src = input_ids.shape[1]
            bias = bias + self.relative_bias(torch.arange(src, device=x.device), src).to(x.dtype)
        attentions = []
        for layer in self.layers:
            x, probs = layer(x, bias, return_attention)
            if return_attention:
                attentions.append(probs)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return EncoderOutput(x, attention_mask, attentions)


class DecoderCache:
    """What decoding keeps per request: each layer's self-attention keys and values (batch, heads,
    capacity, head_dim), filled up to `length`, and its cross-attention keys and values
    (batch, heads, src, head_dim) with the source padding bias, all batch-first so that beam search
    reorders rows."""

    def __init__(self, cross_keys: list[torch.Tensor], cross_values: list[torch.Tensor], cross_bias: torch.Tensor,
                 capacity: int):
        self.cross_keys, self.cross_values, self.cross_bias = cross_keys, cross_values, cross_bias
        batch, heads, _, head_dim = cross_keys[0].shape
        shape = (batch, heads, max(capacity, 1), head_dim)
        like = cross_keys[0]
        self.keys = [like.new_empty(shape) for _ in cross_keys]
        self.values = [like.new_empty(shape) for _ in cross_keys]
        self.length = 0  # tokens held; a decoder pass appends at length, then advances it

    @property
    def batch_size(self) -> int:
        return self.cross_keys[0].shape[0]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the pass's keys and values after the held ones; return all of them."""
        end = self.length + k.shape[2]
        if end > self.keys[layer].shape[2]:  # out of room: double (beyond the planned length only)
            grow = max(end, 2 * self.keys[layer].shape[2]) - self.keys[layer].shape[2]
            pad = (0, 0, 0, grow)
            self.keys[layer] = F.pad(self.keys[layer], pad)
            self.values[layer] = F.pad(self.values[layer], pad)
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: row i now continues row rows[i] (a beam of the same source, so the cross
        keys and values, identical across a source's beams, stay)."""
        for cache in (self.keys, self.values):
            for t in cache:
                t[:, :, :self.length] = t[rows, :, :self.length]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows (sources whose generation goes on)."""
        for cache in (self.keys, self.values, self.cross_keys, self.cross_values):
            for i, t in enumerate(cache):
                cache[i] = t[rows]
        self.cross_bias = self.cross_bias[rows]


class PagedDecoderCache:
    """The serving engine's decoder caches: every request's decoder keys and values in one paged
    pool, and every request's source as cross-attention keys and values in a second pool, indexed
    by a block table of its own (written once by Seq2SeqModel.encode_paged)."""

    def __init__(self, config: Seq2SeqConfig, num_blocks: int, num_source_blocks: int, block_size: int,
                 dtype: torch.dtype, device, kv_dtype: str = "auto"):
        layers, heads, head_dim = config.decoder_layers, config.num_heads, config.head_dim
        self.self_kv = PagedKVCache(layers, num_blocks, block_size, heads, head_dim, dtype, device, kv_dtype)
        self.cross_kv = PagedKVCache(layers, num_source_blocks, block_size, heads, head_dim, dtype, device, kv_dtype)

    def nbytes(self) -> int:
        return self.self_kv.nbytes() + self.cross_kv.nbytes()


@dataclass
class PagedPositionBiases:
    """T5's relative position bias of a serving step's self-attention, with the causal mask in it,
    built once a step for every layer: per decode group (rows, heads, 1, keys), per prefill chunk
    (1, heads, tokens, keys)."""
    decodes: list[torch.Tensor]
    prefills: list[torch.Tensor]


def paged_attention_with_bias(pool: PagedKVCache, layer: int, q, k, v, batch: PagedAttentionBatch,
                              biases: PagedPositionBiases, scale: float) -> torch.Tensor:
    """PagedKVCache.attend with an additive score bias (T5): q (1, heads, T, hd), k/v (1, heads, T, hd)
    -> (1, heads, T, hd). The new keys and values go into the pool first; each decode group and
    prefill chunk then attends over what its sequences hold, through SDPA."""
    pool.store(layer, batch.slot_mapping, k[0].transpose(0, 1), v[0].transpose(0, 1))  # (T, heads, hd)
    outs = []
    for group, bias in zip(batch.decode_groups, biases.decodes, strict=True):
        qd = q[0, :, group.start:group.end].transpose(0, 1).unsqueeze(2)  # (d, heads, 1, hd)
        kd, vd = pool.gather(layer, group.slots)  # (d, keys, heads, hd)
        od = F.scaled_dot_product_attention(qd, kd.transpose(1, 2), vd.transpose(1, 2), attn_mask=bias, scale=scale)
        outs.append(od.squeeze(2).transpose(0, 1))  # (heads, d, hd)
    for chunk, bias in zip(batch.prefills, biases.prefills, strict=True):
        qc = q[:, :, chunk.start:chunk.end]  # (1, heads, n, hd)
        if chunk.slots is None:  # nothing cached before the chunk: its own keys are all it sees
            kc, vc = k[:, :, chunk.start:chunk.end], v[:, :, chunk.start:chunk.end]
        else:
            kc, vc = pool.gather(layer, chunk.slots)  # (keys, heads, hd)
            kc, vc = kc.transpose(0, 1).unsqueeze(0), vc.transpose(0, 1).unsqueeze(0)
        outs.append(F.scaled_dot_product_attention(qc, kc, vc, attn_mask=bias, scale=scale)[0])
    return torch.cat(outs, dim=1).unsqueeze(0) if len(outs) > 1 else outs[0].unsqueeze(0)


@dataclass
class DecoderOutput:
    logits: torch.Tensor  # (batch, seq, vocab)
    self_attentions: list[torch.Tensor] = field(default_factory=list)  # per layer (batch, heads, seq, past + seq)
    cross_attentions: list[torch.Tensor] = field(default_factory=list)  # per layer (batch, heads, seq, src)


class Decoder(nn.Module):
    def __init__(self, c: Seq2SeqConfig):
        super().__init__()
        self.embed = Embeddings(c, c.decoder_vocab_size)
        self.relative_bias = RelativePositionBias(c, bidirectional=False) if c.is_t5 else None
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.decoder_layers))
        self.final_norm = make_norm(c) if c.final_norm else None

    def self_attention_bias(self, past: int, seq: int, device, dtype) -> torch.Tensor | None:
        """Additive (1, heads or 1, seq, past + seq) bias of the pass's queries: causal among the
        new tokens, plus T5's relative positions. None for one new token without T5 (it sees all)."""
        bias = None
        if seq > 1:
            queries = torch.arange(past, past + seq, device=device)[:, None]
            future = torch.arange(past + seq, device=device)[None, :] > queries
            bias = torch.zeros(future.shape, dtype=dtype, device=device).masked_fill(future, torch.finfo(dtype).min)
            bias = bias[None, None]
        if self.relative_bias is not None:
            rel = self.relative_bias(torch.arange(past, past + seq, device=device), past + seq).to(dtype)
            bias = rel if bias is None else bias + rel
        return bias

    def forward(self, input_ids: torch.Tensor, cache: DecoderCache, return_attention: bool = False):
        """input_ids: (batch, seq), the tokens after the cache's -> hidden (batch, seq, d_model)."""
        past, seq = cache.length, input_ids.shape[1]
        x = self.embed(input_ids, start=past)
        bias = self.self_attention_bias(past, seq, x.device, x.dtype)
        self_attn, cross_attn = [], []
        for i, layer in enumerate(self.layers):
            x, self_probs, cross_probs = layer(x, bias, cache, i, return_attention)
            if return_attention:
                self_attn.append(self_probs)
                cross_attn.append(cross_probs)
        cache.length += seq
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x, self_attn, cross_attn

    def paged_position_biases(self, batch: PagedAttentionBatch, dtype: torch.dtype) -> PagedPositionBiases | None:
        """T5's self-attention biases of a serving step (None without relative positions)."""
        if self.relative_bias is None:
            return None
        lowest = torch.finfo(dtype).min
        decodes = []
        for group in batch.decode_groups:  # each row's query sits at its sequence's last position
            keys = group.slots.shape[1]
            bias = self.relative_bias(group.lengths - 1, keys).to(dtype).permute(2, 1, 0, 3)  # (d, heads, 1, keys)
            decodes.append(bias.masked_fill(~group.mask, lowest))
        prefills = []
        for chunk in batch.prefills:
            keys = chunk.end - chunk.start + chunk.first
            queries = torch.arange(chunk.first, keys, device=batch.positions.device)
            bias = self.relative_bias(queries, keys).to(dtype)  # (1, heads, n, keys)
            future = torch.arange(keys, device=queries.device)[None, :] > queries[:, None]
            prefills.append(bias.masked_fill(future, lowest))
        return PagedPositionBiases(decodes, prefills)

    def forward_paged(self, tokens: torch.Tensor, cache: PagedDecoderCache, batch: PagedAttentionBatch):
        """tokens (T,): a serving step's decoder tokens, flattened as `batch` says -> (T, d_model)."""
        x = self.embed(tokens[None], positions=batch.positions)  # (1, T, d_model)
        biases = self.paged_position_biases(batch, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer.forward_paged(x, cache, i, batch, biases)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x[0]


class Seq2SeqModel(nn.Module):
    """The encoder, the decoder and the LM head.

    >>> enc = model.encode(input_ids, attention_mask)
    >>> cache = model.new_cache(enc, capacity=64)
    >>> logits = model.decode(decoder_input_ids, cache).logits   # (batch, seq, vocab), appends to cache
    """

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.lm_head = nn.Linear(config.d_model, config.decoder_vocab_size, bias=False)
        if config.logits_bias:
            self.register_buffer("final_logits_bias", torch.zeros(config.decoder_vocab_size))
        else:
            self.final_logits_bias = None
        self.output_scale = config.d_model ** -0.5 if config.scale_decoder_output else 1.0

    # The token embeddings stay float in every form of the model (the linear layers may be quantized).
    @property
    def device(self) -> torch.device:
        return self.decoder.embed.tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed.tokens.weight.dtype

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               return_attention: bool = False) -> EncoderOutput:
        """input_ids, attention_mask (1 token, 0 padding): (batch, src), padded on the right."""
        return self.encoder(input_ids, attention_mask, return_attention)

    def new_cache(self, encoded: EncoderOutput, capacity: int, beams: int = 1) -> DecoderCache:
        """A decoder cache for these sources, room for `capacity` decoder tokens, each source's row
        repeated `beams` times (rows source0-beam0, source0-beam1, ...). Cross-attention keys and
        values are projected here, once per request."""
        keys, values = [], []
        for layer in self.decoder.layers:
            k, v = layer.cross_attn.project_memory(encoded.hidden)
            if beams > 1:
                k, v = k.repeat_interleave(beams, dim=0), v.repeat_interleave(beams, dim=0)
            keys.append(k)
            values.append(v)
        bias = padding_bias(encoded.attention_mask, encoded.hidden.dtype)
        if beams > 1:
            bias = bias.repeat_interleave(beams, dim=0)
        return DecoderCache(keys, values, bias, capacity)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.output_scale != 1.0:
            hidden = hidden * self.output_scale
        logits = self.lm_head(hidden)
        if self.final_logits_bias is not None:
            logits = logits + self.final_logits_bias
        return logits

    def decode(self, decoder_input_ids: torch.Tensor, cache: DecoderCache,
               return_attention: bool = False, last_only: bool = False) -> DecoderOutput:
        """Run the decoder on the tokens after the cache's and append them to it. last_only: the
        logits of the last position alone (batch, 1, vocab), what a generation step needs."""
        hidden, self_attn, cross_attn = self.decoder(decoder_input_ids, cache, return_attention)
        if last_only:
            hidden = hidden[:, -1:]
        return DecoderOutput(self.logits(hidden), self_attn, cross_attn)

    # -- the serving engine's paged path -------------------------------------------------------
    def new_paged_cache(self, num_blocks: int, num_source_blocks: int, block_size: int,
                        kv_dtype: str = "auto") -> PagedDecoderCache:
        return PagedDecoderCache(self.config, num_blocks, num_source_blocks, block_size, self.dtype, self.device,
                                 kv_dtype)

    def encode_paged(self, sources: list[list[int]], source_slots: list[torch.Tensor],
                     cache: PagedDecoderCache) -> None:
        """Encode these sources (token ids, special tokens included) as one padded batch and write
        each decoder layer's cross-attention keys and values of source i into the pool rows
        source_slots[i] (len(sources[i]),)."""
        width = max(len(ids) for ids in sources)
        pad = self.config.pad_token_id
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in sources], device=self.device)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in sources], device=self.device)
        hidden = self.encode(input_ids, mask).hidden  # (batch, width, d_model)
        real = mask.bool()
        slots = torch.cat(source_slots)
        for i, layer in enumerate(self.decoder.layers):
            k, v = layer.cross_attn.project_memory(hidden)  # (batch, heads, width, head_dim)
            cache.cross_kv.store(i, slots, k.transpose(1, 2)[real], v.transpose(1, 2)[real])  # (tokens, heads, hd)

    def forward_paged(self, tokens: torch.Tensor, cache: PagedDecoderCache, batch: PagedAttentionBatch,
                      logits_indices: torch.Tensor) -> torch.Tensor:
        """One serving step of the decoder (the encoder ran in encode_paged): float32 logits
        (len(logits_indices), vocab) of the rows asked for."""
        hidden = self.decoder.forward_paged(tokens, cache, batch)[logits_indices]  # (rows, d_model)
        return self.logits(hidden).float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                decoder_input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits of every decoder position: (batch, tgt, vocab)."""
        encoded = self.encode(input_ids, attention_mask)
        cache = self.new_cache(encoded, capacity=decoder_input_ids.shape[1])
        return self.decode(decoder_input_ids, cache).logits

    @torch.inference_mode()
    def attention_maps(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None = None) -> dict[str, list[torch.Tensor]]:
        """Every layer's attention probabilities for a source and a (teacher-forced) target:
        {"encoder": [(batch, heads, src, src)], "decoder": [(batch, heads, tgt, tgt)],
        "cross": [(batch, heads, tgt, src)]}, one tensor per layer, in float32 on the CPU."""
        encoded = self.encode(input_ids, attention_mask, return_attention=True)
        cache = self.new_cache(encoded, capacity=decoder_input_ids.shape[1])
        out = self.decode(decoder_input_ids, cache, return_attention=True)

        def host(maps):
            return [m.float().cpu() for m in maps]

        return {"encoder": host(encoded.attentions), "decoder": host(out.self_attentions),
                "cross": host(out.cross_attentions)}
