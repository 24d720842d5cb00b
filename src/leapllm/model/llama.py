"""A Llama-family decoder (Llama, SmolLM2, Mistral, Qwen2) in plain PyTorch.

Read top to bottom: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP, the block,
and the whole model. Each stage of the compute (projections, rotary, attention core, activation,
...) is its own small module, so a profiler can time stages with module hooks alone. Q/K/V and gate/up are each one fused matmul: one weight read instead of
three (or two), which matters when decoding is bound by memory bandwidth.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from leapllm.model.config import ModelConfig
from leapllm.model.fused_decode import MAX_TOKENS, FusedDecode
from leapllm.model.kv_cache import KVCache
from leapllm.model.paged_kv_cache import PagedAttentionBatch, PagedKVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in float32 whatever the model dtype, as the reference implementations do.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotary_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) with the model's rope scaling applied, on the CPU (also
    inside a meta-device context, where PyTorch would import its compiler stack for these ops)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("type")
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        # Llama 3.1: leave high frequencies alone, divide low ones by `factor`, blend in between.
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_context_length"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        middle = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv_freq = torch.where(middle, blended, inv_freq)
    elif kind == "freq_factors":
        # GGUF files of Llama 3.1 store the per-frequency divisors as a tensor instead.
        inv_freq = inv_freq / scaling["factors"].float()
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotates each query and key head by its position (rotate-half convention, as in HF Llama)."""

    def forward(self, q, k, cos, sin):
        # q: (batch, heads, seq, head_dim), k: (batch, kv_heads, seq, head_dim); cos, sin: (seq, head_dim)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class AttentionCore(nn.Module):
    """Stores the new keys/values in the cache and attends over everything cached (softmax(QK^T)V)."""

    def __init__(self, layer_idx: int, grouped: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.grouped = grouped  # grouped-query attention: several query heads share a kv head

    def forward(self, q, k, v, start_pos: int, kv_cache: KVCache | PagedKVCache | None, mask,
                paged_batch: PagedAttentionBatch | None = None):
        if paged_batch is not None:
            # The serving engine's step: many sequences flattened into one row of tokens.
            return kv_cache.attend(self.layer_idx, q, k, v, self.grouped, paged_batch)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, start_pos, k, v)
        # is_causal only lines up when queries and keys start together; otherwise `mask` says it.
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1, enable_gqa=self.grouped
        )


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        # A pruned model's layers may keep fewer query heads (config.layer_num_heads); kv heads never change.
        self.num_heads, self.num_kv_heads = config.heads_in_layer(layer_idx), config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.layer_q_size(layer_idx), config.kv_size
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.rotary = RotaryEmbedding()
        self.core = AttentionCore(layer_idx, grouped=self.num_heads != self.num_kv_heads)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, start_pos: int, kv_cache: KVCache | None, mask, paged_batch=None):
        batch, seq, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)  # (batch, heads, seq, head_dim)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (batch, kv_heads, seq, hd)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rotary(q, k, cos, sin)
        out = self.core(q, k, v, start_pos, kv_cache, mask, paged_batch)  # (batch, heads, seq, head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.q_size))


class SiluAndMul(nn.Module):
    """SwiGLU's activation: silu(gate) * up, on the fused gate/up projection's output."""

    def forward(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        intermediate = config.intermediate_size_of_layer(layer_idx)  # fewer channels in a pruned layer
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * intermediate, bias=False)
        self.act = SiluAndMul()
        self.down_proj = nn.Linear(intermediate, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, layer_idx)

    def forward(self, x, cos, sin, start_pos, kv_cache, mask, paged_batch=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, start_pos, kv_cache, mask, paged_batch)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        # nn.Embedding's own init.normal_ on a meta tensor (loaders build the model on the meta device,
        # then assign the real weights) imports ~800 modules of PyTorch's compiler stack, 74 MB.
        table = torch.empty(config.vocab_size, config.hidden_size)
        if table.device.type != "meta":
            nn.init.normal_(table)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=table)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Kept in float32 and out of the state dict: it is derived from the config.
        self.register_buffer("inv_freq", rotary_inv_freq(config), persistent=False)
        # One C++ call per block for batch-1 decode, when the weights run on leapllm's packed kernels
        # (model/fused_decode.py); built at the first such step. The profiler turns it off to time stages.
        self.use_fused_decode = True
        self.fused_decode: FusedDecode | None = None

    # The final norm's weight is float in every form of the model (the embedding may be quantized).
    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def num_cached_kv_heads(self) -> int:
        """The kv heads a KV cache holds for this model (a tensor-parallel rank holds only its own)."""
        return self.config.num_kv_heads

    def new_kv_cache(self, batch_size: int, max_seq_len: int) -> KVCache:
        c = self.config
        return KVCache(c.num_layers, batch_size, c.num_kv_heads, max_seq_len, c.head_dim, self.dtype, self.device)

    def rotary_cos_sin(self, start_pos: int, seq: int, positions: torch.Tensor | None = None):
        if positions is None:
            positions = torch.arange(start_pos, start_pos + seq, device=self.device)
        freqs = torch.outer(positions.float(), self.inv_freq)  # (seq, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (seq, head_dim)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, kv_cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """tokens (batch, seq) at positions start_pos.. -> logits (batch, seq or 1, vocab), float32.

        With a kv_cache, keys and values of positions < start_pos come from the cache.
        last_only computes the output head for the last position only (what generation needs).
        """
        batch, seq = tokens.shape
        if batch == 1 and 1 <= seq <= MAX_TOKENS and isinstance(kv_cache, KVCache) and self.fused_decode_ready():
            # A decode step or a few tokens to verify: one C++ call for every block (model/fused_decode.py),
            # and for the final norm and the output head too when the head is packed.
            x = self.embed_tokens(tokens)[0]  # (seq, hidden)
            if self.fused_decode.computes_logits:
                return self.fused_decode.logits(x, start_pos, kv_cache, last_only)[None]
            x = self.fused_decode.hidden_states(x, start_pos, kv_cache)
            if last_only:
                x = x[-1:]
            return self.lm_head(self.norm(x)).float()[None]
        x = self.embed_tokens(tokens)  # (batch, seq, hidden)
        cos, sin = self.rotary_cos_sin(start_pos, seq)
        mask = None
        if start_pos > 0 and seq > 1:
            # A chunk after cached tokens: query i sees keys 0 .. start_pos + i.
            keys = torch.arange(start_pos + seq, device=self.device)
            queries = torch.arange(start_pos, start_pos + seq, device=self.device)
            mask = keys[None, :] <= queries[:, None]  # (seq, start_pos + seq)
        for layer in self.layers:
            x = layer(x, cos, sin, start_pos, kv_cache, mask)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x)).float()

    def fused_decode_ready(self) -> bool:
        if self.fused_decode is None and self.use_fused_decode:
            self.fused_decode = FusedDecode(self) if FusedDecode.supports(self) else None
            self.use_fused_decode = self.fused_decode is not None  # not this model: do not look again every step
        return self.fused_decode is not None

    def reset_fused_decode(self) -> None:
        """Forget the fused decode layers (they hold the old weights): call after replacing projections,
        as quantize_model does."""
        self.fused_decode = None
        self.use_fused_decode = True

    def forward_paged(self, tokens: torch.Tensor, kv_cache: PagedKVCache, batch: PagedAttentionBatch,
                      logits_indices: torch.Tensor) -> torch.Tensor:
        """One serving step: tokens (T,) of many sequences, flattened as `batch` describes.

        Returns float32 logits (len(logits_indices), vocab) for the rows asked for (typically the
        last token of each sequence that samples this step).
        """
        x = self.embed_tokens(tokens)[None]  # (1, T, hidden)
        cos, sin = self.rotary_cos_sin(0, tokens.shape[0], batch.positions)
        for layer in self.layers:
            x = layer(x, cos, sin, 0, kv_cache, None, batch)
        x = x[0, logits_indices]  # (rows, hidden)
        return self.lm_head(self.norm(x)).float()
