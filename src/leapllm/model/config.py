"""The shape of a decoder model, independent of the file format it came from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Architectures that run through `leapllm.model.llama.Transformer`.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama" (covers SmolLM2), "mistral" or "qwen2"
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

    def __post_init__(self):
        # JSON gives lists; a frozen dataclass must hold hashable, immutable tuples.
        for name in ("layer_num_heads", "layer_intermediate_sizes"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(int(v) for v in value))

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
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "context_length"):
            if getattr(self, name) <= 0:
                raise ModelLoadError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"model config: {self.num_heads} attention heads are not a multiple of {self.num_kv_heads} kv heads"
            )
        if self.head_dim % 2:
            raise ModelLoadError(f"model config: head_dim {self.head_dim} must be even for rotary embeddings")
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
