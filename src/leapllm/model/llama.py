"""The decoder of every supported family (Llama, SmolLM2, Mistral, Qwen2/3, Gemma 2/3, Phi-3,
OLMo 2) in plain PyTorch.

Read top to bottom: RMSNorm, rotary embeddings, grouped-query attention, the gated MLP (or a
mixture of experts), the block, and the whole model. Llama's block is the default; the config's
family fields (model/config.py, set per family in loading/families.py) switch on what later
families change: q/k norms, norms after attention and MLP, GeGLU, scaled embeddings, soft caps,
sliding windows, partial and local rotary. Each stage of the compute (projections, rotary,
attention core, activation, ...) is its own small module, so a profiler can time stages with module hooks alone. Q/K/V and gate/up are each one fused matmul: one weight read instead of
three (or two), which matters when decoding is bound by memory bandwidth.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from leapllm.kernels import cpu_kernels
from leapllm.model.attention import AttentionParams, attention, attention_probabilities, visible_keys
from leapllm.model.config import ModelConfig
from leapllm.model.fused_decode import MAX_TOKENS, FusedDecode
from leapllm.model.kv_cache import KVCache, kv_storage_dtype
from leapllm.model.paged_kv_cache import PagedAttentionBatch, PagedKVCache


def row_kernels(*tensors: torch.Tensor):
    """leapllm's CPU kernels when the per-row ops (RMSNorm, SiLU * up, rotary) can run there: float32
    on the CPU, no gradient wanted (distillation trains through the PyTorch ops), kernels built."""
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    return cpu_kernels()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (kernels := row_kernels(x, self.weight)) is not None:
            return kernels.rms_norm_rows(x, self.weight, self.eps)  # one call for every row
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # PyTorch's one op, the same arithmetic as below: 1 dispatch instead of 5 in a decode step.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalize in float32 whatever the model dtype, as the reference implementations do.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_length_threshold(config: ModelConfig) -> int | None:
    """The pass length beyond which the frequencies change, for the ropes whose frequencies follow
    the length of the forward pass (LongRoPE's long factors, dynamic NTK); None for every other."""
    scaling = config.rope_scaling or {}
    original = int(scaling.get("original_context_length") or 0)
    if original > 0 and (scaling.get("type") == "dynamic" or (scaling.get("type") == "longrope"
                                                              and scaling.get("long_factor"))):
        return original
    return None


def rotary_inv_freq(config: ModelConfig, local: bool = False, length: int | None = None) -> torch.Tensor:
    """Inverse frequencies (rotary_dim/2,) with the model's rope scaling applied, on the CPU (also
    inside a meta-device context, where PyTorch would import its compiler stack for these ops).

    local: those of the windowed layers of a model with their own rope base (Gemma 3), unscaled.
    length: the length of the forward pass (its last position + 1), for the ropes whose frequencies
    follow it (rope_length_threshold); None: the ones of a pass within the original context.
    """
    dim = config.rotary_dim
    theta = config.rope_local_theta if local else config.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim  # (rotary_dim/2,)
    pos_freqs = theta ** exponents
    inv_freq = 1.0 / pos_freqs
    if local:
        return inv_freq
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
    elif kind == "yarn":
        # YaRN: high frequencies kept, low ones divided by `factor`, a linear ramp between the
        # dimensions that turn beta_fast and beta_slow times over the original context.
        factor, original = float(scaling["factor"]), float(scaling["original_context_length"])

        def correction_dim(rotations: float) -> float:
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(scaling.get("beta_fast", 32.0)), correction_dim(scaling.get("beta_slow", 1.0))
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low if high > low else 0.001))
        keep = 1 - ramp.clamp(0, 1)  # 1: the original frequency, 0: divided by factor
        # 1 / (factor * pos_freqs), not inv_freq / factor: transformers' rounding, to the bit.
        inv_freq = 1.0 / (factor * pos_freqs) * (1 - keep) + inv_freq * keep
    elif kind == "longrope":
        # Phi-3's LongRoPE: a divisor per frequency, the short factors for a pass within the original
        # context, the long ones beyond it (transformers' rule; llama.cpp picks by its context size).
        long = length is not None and length > scaling["original_context_length"] and scaling.get("long_factor")
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32, device="cpu")
        inv_freq = 1.0 / (factors * pos_freqs)
    elif kind == "dynamic" and length is not None and length > scaling["original_context_length"]:
        # Dynamic NTK: a pass longer than the original context stretches the base with its length,
        # in float32 tensors as transformers computes it (its length is a tensor there).
        factor, original = float(scaling["factor"]), scaling["original_context_length"]
        stretch = factor * torch.tensor(length, device="cpu") / original - (factor - 1)
        base = theta * stretch ** (dim / (dim - 2))
        inv_freq = 1.0 / (base ** exponents)
    return inv_freq


def rotary_attention_factor(config: ModelConfig) -> float:
    """LongRoPE's and YaRN's multiplier on cos and sin (1 for every other rope)."""
    scaling = config.rope_scaling or {}
    return float(scaling.get("attention_factor", 1.0)) if scaling.get("type") in ("longrope", "yarn") else 1.0


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotates each query and key head by its position (rotate-half convention, as in HF Llama);
    with partial rotary (Phi), only the first rotary_dim dims of each head."""

    def forward(self, q, k, cos, sin):
        # q: (batch, heads, seq, head_dim), k: (batch, kv_heads, seq, head_dim); cos, sin: (seq, rotary_dim)
        rot = cos.shape[-1]
        if rot == q.shape[-1]:
            if (kernels := row_kernels(q, k, cos, sin)) is not None:
                return kernels.rotary_rows(q, cos, sin), kernels.rotary_rows(k, cos, sin)
            return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        q_rot, q_pass = q[..., :rot], q[..., rot:]
        k_rot, k_pass = k[..., :rot], k[..., rot:]
        return (torch.cat((q_rot * cos + rotate_half(q_rot) * sin, q_pass), dim=-1),
                torch.cat((k_rot * cos + rotate_half(k_rot) * sin, k_pass), dim=-1))


class AttentionCore(nn.Module):
    """Stores the new keys/values in the cache and attends over the cached keys the query sees
    (softmax(QK^T * scale)V, model/attention.py)."""

    def __init__(self, layer_idx: int, grouped: bool, scale: float | None = None, softcap: float | None = None,
                 window: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.grouped = grouped  # grouped-query attention: several query heads share a kv head
        self.scale, self.softcap, self.window = scale, softcap, window

    @property
    def params(self) -> AttentionParams:
        return AttentionParams(self.grouped, self.scale, self.softcap, self.window)

    def forward(self, q, k, v, start_pos: int, kv_cache: KVCache | PagedKVCache | None, mask,
                paged_batch: PagedAttentionBatch | None = None):
        if paged_batch is not None:
            # The serving engine's step: many sequences flattened into one row of tokens.
            return kv_cache.attend(self.layer_idx, q, k, v, self.params, paged_batch)
        # `mask` is visible_keys' for this layer's window: None means plain causal (or all keys, for one query).
        if kv_cache is not None:
            return kv_cache.attend(self.layer_idx, start_pos, q, k, v, self.params, mask)
        return attention(q, k, v, self.params, mask, is_causal=mask is None and q.shape[2] > 1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        # A pruned model's layers may keep fewer query heads (config.layer_num_heads); kv heads never change.
        self.num_heads, self.num_kv_heads = config.heads_in_layer(layer_idx), config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.layer_q_size(layer_idx), config.kv_size
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        # Qwen3 and Gemma 3 normalize each head of q and k; OLMo 2 the whole q and k projections.
        self.qk_norm = config.qk_norm
        if self.qk_norm is not None:
            per_head = self.qk_norm == "head"
            self.q_norm = RMSNorm(self.head_dim if per_head else self.q_size, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim if per_head else self.kv_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding()
        self.core = AttentionCore(layer_idx, grouped=self.num_heads != self.num_kv_heads, scale=config.attention_scale,
                                  softcap=config.attn_logit_softcap, window=config.window_of_layer(layer_idx))
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, start_pos: int, kv_cache: KVCache | None, mask, paged_batch=None):
        batch, seq, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        elif self.qk_norm == "head":
            q = self.q_norm(q.view(batch, seq, self.num_heads, self.head_dim))
            k = self.k_norm(k.view(batch, seq, self.num_kv_heads, self.head_dim))
        q = q.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)  # (batch, heads, seq, head_dim)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (batch, kv_heads, seq, hd)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rotary(q, k, cos, sin)
        out = self.core(q, k, v, start_pos, kv_cache, mask, paged_batch)  # (batch, heads, seq, head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.q_size))


class SiluAndMul(nn.Module):
    """The gated MLP's activation on the fused gate/up projection's output: silu(gate) * up (SwiGLU),
    or with kind "gelu_tanh", gelu(gate) * up with tanh's approximation (Gemma's GeGLU)."""

    def __init__(self, kind: str = "silu"):
        super().__init__()
        self.kind = kind

    def forward(self, gate_up):
        if self.kind == "silu" and (kernels := row_kernels(gate_up)) is not None:
            return kernels.silu_and_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        if self.kind == "gelu_tanh":
            return F.gelu(gate, approximate="tanh") * up
        return F.silu(gate) * up


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, intermediate: int | None = None):
        super().__init__()
        if intermediate is None:  # an expert passes its own width
            intermediate = config.intermediate_size_of_layer(layer_idx)  # fewer channels in a pruned layer
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * intermediate, bias=False)
        self.act = SiluAndMul(config.hidden_act)
        self.down_proj = nn.Linear(intermediate, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_up_proj(x)))


class SparseMoE(nn.Module):
    """A mixture of experts in place of the MLP: per token, the router's softmax picks the top-k
    expert MLPs, whose outputs are summed weighted by their (optionally renormalized) probabilities;
    Qwen2-MoE adds an always-on shared expert scaled by a sigmoid gate.

    Tokens are grouped by expert, so each chosen expert's weights are read once per step for all its
    tokens and the experts nobody chose are not read at all: a decode token reads k experts, not all.
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.top_k, self.normalize = config.num_experts_per_token, config.norm_topk_prob
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(config, layer_idx, config.expert_intermediate_size)
                                     for _ in range(config.num_experts))
        self.shared_expert = self.shared_expert_gate = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = MLP(config, layer_idx, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (tokens, hidden) -> (weights (tokens, k) in x's dtype, chosen experts (tokens, k))."""
        probs = torch.softmax(self.router(x).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), chosen

    def forward(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (tokens, hidden)
        weights, chosen = self.route(flat)
        out = torch.zeros_like(flat)
        for e in chosen.unique().tolist():
            token, slot = (chosen == e).nonzero(as_tuple=True)
            out.index_add_(0, token, self.experts[e](flat[token]) * weights[token, slot, None])
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.view(shape)


class Block(nn.Module):
    """Attention then MLP, each added to the residual stream; config.norm_placement says where the
    RMSNorms sit: before each ("pre", Llama), before and after each ("pre_post", Gemma 2/3), or
    after each only ("post", OLMo 2)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.norm_placement = placement = config.norm_placement
        # Registered in the order a step runs them (the profiler lists stages so).
        if placement != "post":
            self.attn_norm = RMSNorm(h, eps)
        self.attn = Attention(config, layer_idx)
        if placement != "pre":
            self.post_attn_norm = RMSNorm(h, eps)
        if placement != "post":
            self.mlp_norm = RMSNorm(h, eps)
        self.mlp = SparseMoE(config, layer_idx) if config.is_moe_layer(layer_idx) else MLP(config, layer_idx)
        if placement != "pre":
            self.post_mlp_norm = RMSNorm(h, eps)
        # Gemma 3's windowed layers rotate with their own (local) frequencies.
        self.local_rope = config.rope_local_theta is not None and config.window_of_layer(layer_idx) is not None

    def forward(self, x, cos, sin, start_pos, kv_cache, mask, paged_batch=None):
        if self.norm_placement == "pre":
            x = x + self.attn(self.attn_norm(x), cos, sin, start_pos, kv_cache, mask, paged_batch)
            return x + self.mlp(self.mlp_norm(x))
        if self.norm_placement == "pre_post":
            x = x + self.post_attn_norm(self.attn(self.attn_norm(x), cos, sin, start_pos, kv_cache, mask, paged_batch))
            return x + self.post_mlp_norm(self.mlp(self.mlp_norm(x)))
        x = x + self.post_attn_norm(self.attn(x, cos, sin, start_pos, kv_cache, mask, paged_batch))
        return x + self.post_mlp_norm(self.mlp(x))


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
        # Kept in float32 and out of the state dict: derived from the config (init_rotary).
        self.register_buffer("inv_freq", rotary_inv_freq(config), persistent=False)
        self.register_buffer("inv_freq_local", rotary_inv_freq(config, local=True) if config.rope_local_theta else None,
                             persistent=False)
        self.rotary_factor = rotary_attention_factor(config)
        self.rope_threshold = rope_length_threshold(config)
        self._inv_freq_of_length: dict[int, torch.Tensor] = {}  # for ropes that follow the pass length
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

    def new_kv_cache(self, batch_size: int, max_seq_len: int, kv_cache_dtype: str = "auto") -> KVCache:
        """A contiguous cache for batch_size rows of max_seq_len positions, stored as kv_cache_dtype says
        (config.KV_DTYPES; "int8" is the paged pool's format, and a contiguous cache keeps floats)."""
        c = self.config
        dtype = kv_storage_dtype(kv_cache_dtype, self.dtype, self.device)
        return KVCache(c.num_layers, batch_size, c.num_kv_heads, max_seq_len, c.head_dim, dtype, self.device)

    def init_rotary(self) -> None:
        """(Re)compute the rotary frequencies from the config, on the model's device (loaders build
        the model on the meta device)."""
        self.inv_freq = rotary_inv_freq(self.config).to(self.device)
        if self.inv_freq_local is not None:
            self.inv_freq_local = rotary_inv_freq(self.config, local=True).to(self.device)
        self._inv_freq_of_length = {}

    def _inv_freq_by_length(self, lengths: torch.Tensor) -> torch.Tensor:
        """(T, rotary_dim/2): the frequencies of each token's pass length (rope_threshold's ropes)."""
        rows = torch.empty((lengths.shape[0], self.inv_freq.shape[0]), device=self.device)
        longrope = self.config.rope_scaling["type"] == "longrope"
        for length in lengths.unique().tolist():
            # One set for every length within the original context, and LongRoPE's one beyond it.
            key = self.rope_threshold if length <= self.rope_threshold else \
                self.rope_threshold + 1 if longrope else length
            if key not in self._inv_freq_of_length:
                if len(self._inv_freq_of_length) > 64:
                    self._inv_freq_of_length.clear()
                self._inv_freq_of_length[key] = rotary_inv_freq(self.config, length=key).to(self.device)
            rows[lengths == length] = self._inv_freq_of_length[key]
        return rows

    def rotary_cos_sin(self, start_pos: int, seq: int, positions: torch.Tensor | None = None, local: bool = False,
                       lengths: torch.Tensor | None = None):
        """cos, sin (seq, rotary_dim) of positions start_pos .. start_pos + seq - 1 (or `positions`).

        lengths (seq,): the length of the pass each token belongs to (its sequence's last position in
        this step + 1; by default start_pos + seq), which LongRoPE and dynamic NTK choose by."""
        if positions is None:
            positions = torch.arange(start_pos, start_pos + seq, device=self.device)
        if not local and self.rope_threshold is not None:
            if lengths is None:
                lengths = torch.full_like(positions, start_pos + seq)
            freqs = positions.float()[:, None] * self._inv_freq_by_length(lengths)  # (seq, rotary_dim/2)
        else:
            inv_freq = self.inv_freq_local if local else self.inv_freq
            freqs = torch.outer(positions.float(), inv_freq)  # (seq, rotary_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (seq, rotary_dim)
        factor = 1.0 if local else self.rotary_factor
        return (emb.cos() * factor).to(self.dtype), (emb.sin() * factor).to(self.dtype)

    def rotary_tables(self, start_pos: int, seq: int, positions: torch.Tensor | None = None,
                      lengths: torch.Tensor | None = None) -> dict:
        """{local: (cos, sin)} for the rotary kinds the layers use."""
        tables = {False: self.rotary_cos_sin(start_pos, seq, positions, lengths=lengths)}
        if self.inv_freq_local is not None:
            tables[True] = self.rotary_cos_sin(start_pos, seq, positions, local=True)
        return tables

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        if self.config.embedding_multiplier != 1.0:
            # In the compute dtype, as the reference does (in bfloat16 sqrt(3072) becomes 55.5).
            x = x * torch.tensor(self.config.embedding_multiplier, dtype=x.dtype)
        return x

    def output_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm and the output head -> float32 logits (soft-capped where the family does)."""
        logits = self.lm_head(self.norm(x))
        cap = self.config.final_logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, kv_cache: KVCache | None = None,
                last_only: bool = False, verify: bool = False) -> torch.Tensor:
        """tokens (batch, seq) at positions start_pos.. -> logits (batch, seq or 1, vocab), float32.

        With a kv_cache, keys and values of positions < start_pos come from the cache.
        last_only computes the output head for the last position only (what generation needs).
        verify: the tokens are a speculative verification chunk, each rotated as if it were decoded
        alone (it matters for the ropes that follow the pass length), so speculation changes nothing.
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
            return self.output_logits(x)[None]
        x = self.embed(tokens)  # (batch, seq, hidden)
        lengths = None
        if verify and self.rope_threshold is not None:
            lengths = torch.arange(start_pos + 1, start_pos + seq + 1, device=self.device)
        tables = self.rotary_tables(start_pos, seq, lengths=lengths)
        masks = {}  # per window size: which of the keys 0 .. start_pos + seq - 1 each query sees
        for layer in self.layers:
            cos, sin = tables[layer.local_rope]
            window = layer.attn.core.window
            if window not in masks:
                masks[window] = visible_keys(start_pos, seq, window, self.device)[0]
            x = layer(x, cos, sin, start_pos, kv_cache, masks[window])
        if last_only:
            x = x[:, -1:]
        return self.output_logits(x)

    def attention_maps(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """tokens (batch, seq) -> each layer's attention probabilities, (batch, heads, seq, seq) float32.

        The usual forward pass (no cache, so no fused step) runs, and a hook on each layer's
        attention core reads the queries, keys and mask it is given and materializes the softmax
        it computes (model/attention.py): the paths that generate never see a hook.
        """
        maps: list[torch.Tensor | None] = [None] * len(self.layers)

        def capture(index: int):
            def hook(core: AttentionCore, args):
                q, k, _v, _start_pos, _kv_cache, mask = args[:6]
                maps[index] = attention_probabilities(q, k, core.params, mask,
                                                      is_causal=mask is None and q.shape[2] > 1)
            return hook

        handles = [layer.attn.core.register_forward_pre_hook(capture(i)) for i, layer in enumerate(self.layers)]
        try:
            with torch.inference_mode():
                self.forward(tokens, last_only=True)
        finally:
            for handle in handles:
                handle.remove()
        return maps

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
        x = self.embed(tokens)[None]  # (1, T, hidden)
        lengths = batch.pass_lengths() if self.rope_threshold is not None else None
        tables = self.rotary_tables(0, tokens.shape[0], batch.positions, lengths)
        for layer in self.layers:
            cos, sin = tables[layer.local_rope]
            x = layer(x, cos, sin, 0, kv_cache, None, batch)
        x = x[0, logits_indices]  # (rows, hidden)
        return self.output_logits(x)
