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

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

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
