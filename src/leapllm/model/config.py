"""The shape of a decoder model, independent of the file format it came from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Architectures that run through `leapllm.model.llama.Transformer`; what each changes from Llama
# is read from its files in loading/families.py.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2",
                           "mixtral", "qwen2moe", "qwen3moe", "olmoe")
NORM_PLACEMENTS = ("pre", "pre_post", "post")
ACTIVATIONS = ("silu", "gelu_tanh")


# The largest sizes a model file may declare: beyond any model leapllm runs, and small enough that
# nothing built from them (per-layer lists, rotary tables) exhausts memory before a check fails.
SIZE_LIMITS = {
    "vocab_size": 1 << 22, "hidden_size": 1 << 17, "intermediate_size": 1 << 20, "num_layers": 4096,
    "num_heads": 4096, "num_kv_heads": 4096, "head_dim": 4096, "context_length": 1 << 21,
}


def check_model_sizes(**sizes) -> None:
    """Each size an integer from 1 to its SIZE_LIMITS entry; raises ModelLoadError naming the first that is not."""
    from leapllm.errors import ModelLoadError

    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= SIZE_LIMITS[name]:
            raise ModelLoadError(f"model config: {name} must be an integer from 1 to {SIZE_LIMITS[name]}, "
                                 f"got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # one of SUPPORTED_ARCHITECTURES ("llama" covers SmolLM2)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    context_length: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or {"type": "linear", "factor": f} / {"type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_context_length"}.
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # qwen2 has biases on the q, k and v projections
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # informational facts (file type, ...)
    # Per-layer sizes of a structurally pruned model (None: every layer has num_heads query heads and
    # intermediate_size MLP channels). num_kv_heads stays the same in every layer, so the KV caches
    # keep one shape; a layer's query head count is a multiple of it.
    layer_num_heads: tuple[int, ...] | None = None
    layer_intermediate_sizes: tuple[int, ...] | None = None
    # What the families after Llama change (loading/families.py says which family sets what); the
    # defaults are Llama's.
    qk_norm: str | None = None  # RMSNorm on q and k before rotary: "head" (per head) or "full" (whole projection)
    norm_placement: str = "pre"  # "pre": x + f(norm(x)); "pre_post": x + norm2(f(norm(x))); "post": x + norm(f(x))
    hidden_act: str = "silu"  # the gated MLP's activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    embedding_multiplier: float = 1.0  # Gemma scales the embedded tokens by sqrt(hidden_size)
    attention_scale: float | None = None  # softmax scale of q.k; None: 1 / sqrt(head_dim)
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap) before the softmax
    final_logit_softcap: float | None = None  # the same on the output logits
    sliding_window: int | None = None  # a windowed layer's query sees this many keys: its own and the ones before
    # Per layer, whether it attends through the window (None: every layer when sliding_window is set).
    sliding_layers: tuple[bool, ...] | None = None
    rope_local_theta: float | None = None  # the windowed layers' rope base, unscaled (Gemma 3); None: rope_theta
    partial_rotary_factor: float = 1.0  # rotary covers the first head_dim * factor dims of each head
    # Mixture of experts (Mixtral, Qwen2/3-MoE, OLMoE): a router picks num_experts_per_token of
    # num_experts gated MLPs per token; 0 experts: every MLP is dense.
    num_experts: int = 0
    num_experts_per_token: int = 0
    expert_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on expert (0: none), gated by a sigmoid
    norm_topk_prob: bool = False  # renormalize the chosen experts' router probabilities to sum to 1
    moe_layers: tuple[bool, ...] | None = None  # per layer, whether its MLP is the MoE (None: all, with experts)

    def __post_init__(self):
        # JSON gives lists; a frozen dataclass must hold hashable, immutable tuples.
        for name, kind in (("layer_num_heads", int), ("layer_intermediate_sizes", int), ("sliding_layers", bool),
                           ("moe_layers", bool)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(kind(v) for v in value))

    @property
    def q_size(self) -> int:
        """Query width of an unpruned layer; a pruned model's layers may differ: see layer_q_size."""
        return self.num_heads * self.head_dim

    def heads_in_layer(self, layer: int) -> int:
        return self.num_heads if self.layer_num_heads is None else self.layer_num_heads[layer]

    def layer_q_size(self, layer: int) -> int:
        return self.heads_in_layer(layer) * self.head_dim

    def intermediate_size_of_layer(self, layer: int) -> int:
        return self.intermediate_size if self.layer_intermediate_sizes is None else self.layer_intermediate_sizes[layer]

    @property
    def is_uniform(self) -> bool:
        return self.layer_num_heads is None and self.layer_intermediate_sizes is None

    def window_of_layer(self, layer: int) -> int | None:
        """How many keys a query of this layer sees (None: all before it)."""
        if self.sliding_window is None or (self.sliding_layers is not None and not self.sliding_layers[layer]):
            return None
        return self.sliding_window

    def family_switches(self) -> dict[str, str]:
        """What this model's blocks do that Llama's do not, in words ({} for a Llama)."""
        out: dict[str, str] = {}
        if self.qk_norm:
            out["q/k norm"] = "per head" if self.qk_norm == "head" else "over the whole projection"
        if self.norm_placement != "pre":
            out["norms"] = "before and after attention and MLP" if self.norm_placement == "pre_post" else \
                "after attention and MLP"
        if self.hidden_act != "silu":
            out["activation"] = self.hidden_act
        if self.embedding_multiplier != 1.0:
            out["embedding multiplier"] = f"{self.embedding_multiplier:g}"
        if self.attention_scale is not None:
            out["attention scale"] = f"{self.attention_scale:g}"
        for name in ("attn_logit_softcap", "final_logit_softcap"):
            if getattr(self, name) is not None:
                out[name.replace("_", " ")] = f"{getattr(self, name):g}"
        if self.sliding_window is not None:
            windowed = self.num_layers if self.sliding_layers is None else sum(self.sliding_layers)
            out["sliding window"] = f"{self.sliding_window} keys in {windowed} of {self.num_layers} layers"
        if self.rope_local_theta is not None:
            out["local rope base"] = f"{self.rope_local_theta:g}"
        if self.rotary_dim != self.head_dim:
            out["rotary dims"] = f"{self.rotary_dim} of {self.head_dim}"
        if self.num_experts:
            moe = self.num_layers if self.moe_layers is None else sum(self.moe_layers)
            out["experts"] = (f"{self.num_experts}, {self.num_experts_per_token} per token, in {moe} of "
                              f"{self.num_layers} layers" + (", a shared expert" if self.shared_expert_intermediate_size
                                                              else ""))
        return out

    @property
    def windowed_layers(self) -> tuple[int, ...]:
        """The layers whose queries see only the last sliding_window keys."""
        return tuple(i for i in range(self.num_layers) if self.window_of_layer(i) is not None)

    @property
    def kv_window(self) -> int | None:
        """The keys every layer's queries reach back, when all layers are windowed (Mistral, Phi-3):
        a KV cache need keep only those; None when some layer sees everything."""
        if any(self.window_of_layer(i) is None for i in range(self.num_layers)):
            return None
        return self.sliding_window

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and (self.moe_layers is None or self.moe_layers[layer])

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        from leapllm.errors import ModelLoadError

        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        check_model_sizes(**{name: getattr(self, name) for name in SIZE_LIMITS})
        if not 0.0 < self.rms_norm_eps < 1.0:  # also refuses NaN
            raise ModelLoadError(f"model config: rms_norm_eps must be between 0 and 1, got {self.rms_norm_eps}")
        for name in ("rope_theta", "rope_local_theta"):
            value = getattr(self, name, None)
            if value is not None and not 1.0 <= value < float("inf"):
                raise ModelLoadError(f"model config: {name} must be a finite number of at least 1, got {value}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"model config: {self.num_heads} attention heads are not a multiple of {self.num_kv_heads} kv heads"
            )
        if self.head_dim % 2:
            raise ModelLoadError(f"model config: head_dim {self.head_dim} must be even for rotary embeddings")
        if self.qk_norm not in (None, "head", "full"):
            raise ModelLoadError(f"model config: qk_norm must be 'head' or 'full', got {self.qk_norm!r}")
        if self.norm_placement not in NORM_PLACEMENTS:
            raise ModelLoadError(f"model config: norm_placement must be one of {NORM_PLACEMENTS}, got {self.norm_placement!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ModelLoadError(f"model config: unsupported activation {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ModelLoadError(f"model config: sliding_window must be positive, got {self.sliding_window}")
        if self.sliding_layers is not None and len(self.sliding_layers) != self.num_layers:
            raise ModelLoadError(f"model config: sliding_layers has {len(self.sliding_layers)} entries for "
                                 f"{self.num_layers} layers")
        for name in ("attn_logit_softcap", "final_logit_softcap", "attention_scale"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ModelLoadError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_experts:
            if not 0 < self.num_experts_per_token <= self.num_experts:
                raise ModelLoadError(f"model config: {self.num_experts_per_token} experts per token out of "
                                     f"{self.num_experts}")
            if self.expert_intermediate_size <= 0:
                raise ModelLoadError(f"model config: expert_intermediate_size must be positive, got "
                                     f"{self.expert_intermediate_size}")
            if self.moe_layers is not None and len(self.moe_layers) != self.num_layers:
                raise ModelLoadError(f"model config: moe_layers has {len(self.moe_layers)} entries for "
                                     f"{self.num_layers} layers")
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2:
            raise ModelLoadError(f"model config: partial_rotary_factor {self.partial_rotary_factor} must give an "
                                 f"even number of rotary dims out of {self.head_dim}")
        for name in ("layer_num_heads", "layer_intermediate_sizes"):
            sizes = getattr(self, name)
            if sizes is None:
                continue
            if len(sizes) != self.num_layers:
                raise ModelLoadError(f"model config: {name} has {len(sizes)} entries for {self.num_layers} layers")
            if any(v <= 0 for v in sizes):
                raise ModelLoadError(f"model config: {name} must all be positive, got {list(sizes)}")
        if self.layer_num_heads is not None and any(h % self.num_kv_heads for h in self.layer_num_heads):
            raise ModelLoadError(f"model config: layer_num_heads {list(self.layer_num_heads)} must be multiples of "
                                 f"{self.num_kv_heads} kv heads")
