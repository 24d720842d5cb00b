"""Analytic cost model: the FLOPs each stage must do and the bytes it must move.

Every function takes the shape of one forward step and returns a `Cost`. Notation, used in every
docstring below:

    B  batch (sequences)              T  new tokens per sequence in this step (prompt length in
    C  tokens already cached             prefill, 1 in decode)
    S  C + T, keys after this step    N  B * T, rows through the projections
    h  hidden size                    I  MLP intermediate size
    H  query heads, K kv heads,       q  H * d, kv = K * d
    d  head dim                       V  vocabulary size
    e  bytes per element of the model dtype (4 for float32, 2 for bfloat16/float16)

H and I are per layer: a structurally pruned model (ModelConfig.layer_num_heads,
layer_intermediate_sizes) has layers of different widths, and its step costs sum them layer by layer.

A multiply-add counts as 2 FLOPs. Bytes are the minimum a stage must read and write once: its
weights, its input and output activations, and the KV cache it reads and writes; they ignore what
caches save or what temporaries an implementation adds. So `flops / bytes` is the stage's
arithmetic intensity, which the roofline compares with the machine's FLOP/s per byte/s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from leapllm.model.config import ModelConfig

NORM_FLOPS_PER_ELEMENT = 4  # square, add to the sum, scale by the rsqrt, multiply by the weight
ROTARY_FLOPS_PER_ELEMENT = 3  # x * cos + rotate_half(x) * sin: two multiplies and an add
SOFTMAX_FLOPS_PER_SCORE = 5  # scale, max, subtract + exp, sum, divide
SILU_MUL_FLOPS_PER_ELEMENT = 5  # silu(g) = g / (1 + exp(-g)): negate, exp, add, divide; then * up
SAMPLING_FLOPS_PER_ENTRY = 1  # greedy sampling is an argmax: one comparison per vocabulary entry
LOGITS_BYTES = 4  # the logits are float32 whatever the model dtype


@dataclass(frozen=True)
class Cost:
    flops: float = 0.0
    weight_bytes: float = 0.0
    activation_bytes: float = 0.0
    kv_bytes: float = 0.0

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.activation_bytes + self.kv_bytes

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved (0 when nothing is moved)."""
        return self.flops / self.bytes if self.bytes else 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.weight_bytes + other.weight_bytes,
                    self.activation_bytes + other.activation_bytes, self.kv_bytes + other.kv_bytes)

    def __mul__(self, n: float) -> Cost:
        return Cost(self.flops * n, self.weight_bytes * n, self.activation_bytes * n, self.kv_bytes * n)

    __rmul__ = __mul__

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "bytes": self.bytes}


def linear_cost(rows: int, d_in: int, d_out: int, e: int, bias: bool = False, weight_e: float | None = None) -> Cost:
    """y = x W^T (+ b) on `rows` rows: FLOPs 2 * rows * d_in * d_out (+ rows * d_out for the bias);
    bytes: the weight d_in * d_out * e (+ d_out * e), the input rows * d_in * e, the output rows * d_out * e.
    weight_e: bytes per weight when the weights are quantized (scales included), else e."""
    return Cost(
        flops=2 * rows * d_in * d_out + (rows * d_out if bias else 0),
        weight_bytes=d_in * d_out * (e if weight_e is None else weight_e) + (d_out * e if bias else 0),
        activation_bytes=(rows * d_in + rows * d_out) * e,
    )


def embedding_cost(tokens: int, h: int, e: int) -> Cost:
    """A table lookup: 0 FLOPs; reads one weight row per token (tokens * h * e) and writes as much.
    (The token ids themselves, 8 bytes each, are left out.)"""
    return Cost(weight_bytes=tokens * h * e, activation_bytes=tokens * h * e)


def norm_cost(rows: int, h: int, e: int) -> Cost:
    """RMSNorm over `rows` vectors of h: 4 FLOPs per element; reads the weight (h * e) and the input,
    writes the output (rows * h * e each)."""
    return Cost(flops=NORM_FLOPS_PER_ELEMENT * rows * h, weight_bytes=h * e, activation_bytes=2 * rows * h * e)


def rotary_cost(c: ModelConfig, batch: int, new: int, e: int, layer: int = 0) -> Cost:
    """Rotates q and k: 3 FLOPs per element of q and k (N * (q + kv) elements); reads and writes
    q and k (2 * N * (q + kv) * e) and reads the cos and sin tables (2 * T * d * e)."""
    elements = batch * new * (c.layer_q_size(layer) + c.kv_size)
    return Cost(flops=ROTARY_FLOPS_PER_ELEMENT * elements,
                activation_bytes=2 * elements * e + 2 * new * c.head_dim * e)


def mean_keys_per_query(new: int, cached: int) -> float:
    """S_eff: under the causal mask, new query i (0-based) sees cached + i + 1 keys; the mean is
    cached + (T + 1) / 2. (In decode, T = 1, it is simply S = cached + 1.)"""
    return cached + (new + 1) / 2


def attention_cost(c: ModelConfig, batch: int, new: int, cached: int, e: int, layer: int = 0) -> Cost:
    """Cache write + softmax(q k^T / sqrt(d)) v for the new queries.

    FLOPs: q k^T and (scores) v are each 2 * B * H * T * S_eff * d, the softmax 5 per score
    (B * H * T * S_eff scores), with S_eff = mean_keys_per_query(T, C).
    Bytes: activations read q and the new k, v and write the output (2 * N * q + 2 * N * kv) * e;
    the KV cache is written for the new tokens (2 * N * kv * e) and read in full (2 * B * S * kv * e).
    """
    s_eff = mean_keys_per_query(new, cached)
    scores = batch * c.heads_in_layer(layer) * new * s_eff
    n = batch * new
    keys = cached + new
    return Cost(
        flops=2 * (2 * scores * c.head_dim) + SOFTMAX_FLOPS_PER_SCORE * scores,
        activation_bytes=(2 * n * c.layer_q_size(layer) + 2 * n * c.kv_size) * e,
        kv_bytes=(2 * n * c.kv_size + 2 * batch * keys * c.kv_size) * e,
    )


def activation_cost(rows: int, intermediate: int, e: int) -> Cost:
    """silu(gate) * up: 5 FLOPs per output element (rows * I); reads gate and up (rows * 2I * e),
    writes rows * I * e."""
    return Cost(flops=SILU_MUL_FLOPS_PER_ELEMENT * rows * intermediate,
                activation_bytes=(rows * 2 * intermediate + rows * intermediate) * e)


def sampling_cost(batch: int, vocab: int) -> Cost:
    """Greedy sampling of one token per sequence: 1 FLOP (a comparison) per logit; reads the
    float32 logits (B * V * 4 bytes)."""
    return Cost(flops=SAMPLING_FLOPS_PER_ENTRY * batch * vocab, activation_bytes=batch * vocab * LOGITS_BYTES)


def layer_costs(c: ModelConfig, batch: int, new: int, cached: int, e: int,
                weight_e: float | None = None, layer: int = 0) -> dict[str, Cost]:
    """The stages of transformer block `layer` for one step (both of its RMSNorms under "norm");
    weight_e: bytes per projection weight of a quantized model."""
    n = batch * new
    q, inter = c.layer_q_size(layer), c.intermediate_size_of_layer(layer)
    costs = {
        "norm": 2 * norm_cost(n, c.hidden_size, e),
        "qkv_proj": linear_cost(n, c.hidden_size, q + 2 * c.kv_size, e, bias=c.attention_bias, weight_e=weight_e),
        "rotary": rotary_cost(c, batch, new, e, layer),
        "attention": attention_cost(c, batch, new, cached, e, layer),
        "o_proj": linear_cost(n, q, c.hidden_size, e, weight_e=weight_e),
    }
    if c.is_moe_layer(layer):
        return costs | moe_costs(c, n, e, weight_e)
    return costs | {
        "gate_up_proj": linear_cost(n, c.hidden_size, 2 * inter, e, weight_e=weight_e),
        "activation": activation_cost(n, inter, e),
        "down_proj": linear_cost(n, inter, c.hidden_size, e, weight_e=weight_e),
    }


def moe_costs(c: ModelConfig, n: int, e: int, weight_e: float | None = None) -> dict[str, Cost]:
    """A mixture-of-experts MLP on N rows: each row runs k experts of width I_e (and the shared expert
    of width I_s, if any). FLOPs count every (row, expert) pair; weight bytes count each expert once,
    for at most min(E, N * k) distinct experts (exactly k for one decode token: the bandwidth MoE
    saves), plus the shared expert and the router (h * E float weights, under gate_up_proj)."""
    k, h, width = c.num_experts_per_token, c.hidden_size, c.expert_intermediate_size
    read = min(c.num_experts, n * k)

    def experts(d_in: int, d_out: int) -> Cost:
        pairs = linear_cost(n * k, d_in, d_out, e, weight_e=weight_e)
        return Cost(pairs.flops, pairs.weight_bytes * read, pairs.activation_bytes)

    costs = {
        "gate_up_proj": experts(h, 2 * width) + linear_cost(n, h, c.num_experts, e),
        "activation": activation_cost(n * k, width, e),
        "down_proj": experts(width, h),
    }
    shared = c.shared_expert_intermediate_size
    if shared:
        costs["gate_up_proj"] += linear_cost(n, h, 2 * shared, e, weight_e=weight_e) + linear_cost(n, h, 1, e)
        costs["activation"] += activation_cost(n, shared, e)
        costs["down_proj"] += linear_cost(n, shared, h, e, weight_e=weight_e)
    return costs


def step_costs(c: ModelConfig, batch: int, new: int, cached: int, e: int,
               weight_e: float | None = None, head_weight_e: float | None = None) -> dict[str, Cost]:
    """Every measured stage of one step `model(tokens (B, T), start_pos=C, cache, last_only=True)`
    followed by sampling: all blocks, plus the embedding, the final norm and the output head on the
    last position of each sequence only (B rows), and greedy sampling. head_weight_e: bytes per
    output-head weight where it differs from weight_e (`leapllm quantize --head int8`)."""
    if c.is_uniform and c.moe_layers is None:  # every block costs the same
        costs = {stage: cost * c.num_layers for stage, cost in layer_costs(c, batch, new, cached, e, weight_e).items()}
    else:
        costs = sum_costs([layer_costs(c, batch, new, cached, e, weight_e, layer) for layer in range(c.num_layers)])
    costs["norm"] = costs["norm"] + norm_cost(batch, c.hidden_size, e)  # the final norm, last position
    costs["embedding"] = embedding_cost(batch * new, c.hidden_size, e)
    costs["lm_head"] = linear_cost(batch, c.hidden_size, c.vocab_size, e,
                                   weight_e=weight_e if head_weight_e is None else head_weight_e)
    costs["sampling"] = sampling_cost(batch, c.vocab_size)
    return costs


def sum_costs(steps: list[dict[str, Cost]]) -> dict[str, Cost]:
    total: dict[str, Cost] = {}
    for step in steps:
        for stage, cost in step.items():
            total[stage] = total.get(stage, Cost()) + cost
    return total


def phase_costs(c: ModelConfig, batch: int, prompt_len: int, gen_len: int, e: int,
                weight_e: float | None = None, head_weight_e: float | None = None) -> dict[str, dict[str, Cost]]:
    """{"prefill": one step of T = prompt_len on an empty cache, "decode": gen_len steps of T = 1,
    summed, the j-th (0-based) with C = prompt_len + j cached tokens}."""
    return {
        "prefill": step_costs(c, batch, prompt_len, 0, e, weight_e, head_weight_e),
        "decode": sum_costs([step_costs(c, batch, 1, prompt_len + j, e, weight_e, head_weight_e)
                             for j in range(gen_len)]),
    }
