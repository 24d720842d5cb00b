"""Reading a Llama-family model from a GGUF file (llama.cpp's format).

Metadata becomes a `ModelConfig`; every tensor becomes a `GGUFTensor` (gguf_tensors.py) under
leapllm's canonical name: still the file's bytes, memory-mapped, read when the model is built --
repacked as they are for the types the kernels run, dequantized by the `gguf` package otherwise.
llama.cpp's converter permutes the rows of the Q and K projections of llama/mistral so that its
rotary kernel can rotate adjacent pairs; we undo that (on whole rows, so quantized rows too),
exactly as the Hugging Face GGUF loader does, so the weights match the original checkpoint and its
rotate-half rotary embedding.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType

from leapllm.errors import ModelLoadError
from leapllm.loading.families import (
    GGUF_LAYER_NAMES,
    GGUF_STACKED_EXPERTS,
    family_fields_from_gguf,
    yarn_scaling,
)
from leapllm.loading.gguf_file import open_gguf
from leapllm.loading.gguf_tensors import GGUFTensor
from leapllm.model.config import SUPPORTED_ARCHITECTURES, ModelConfig, check_model_sizes

# Architectures whose GGUF converter permutes Q/K rows (qwen2 is stored unpermuted).
PERMUTED_QK_ARCHITECTURES = ("llama", "mistral")

_LAYER_TENSOR_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "attn_q.weight": "attn.q_proj.weight",
    "attn_k.weight": "attn.k_proj.weight",
    "attn_v.weight": "attn.v_proj.weight",
    "attn_q.bias": "attn.q_proj.bias",
    "attn_k.bias": "attn.k_proj.bias",
    "attn_v.bias": "attn.v_proj.bias",
    "attn_output.weight": "attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSOR_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")


def canonical_name(gguf_name: str, arch: str = "llama") -> str | None:
    """GGUF tensor name -> canonical name, or None for tensors the model does not use."""
    if gguf_name in _GLOBAL_TENSOR_NAMES:
        return _GLOBAL_TENSOR_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m is None:
        return None
    name = GGUF_LAYER_NAMES.get(arch, {}).get(m.group(2)) or _LAYER_TENSOR_NAMES.get(m.group(2))
    return f"layers.{m.group(1)}.{name}" if name else None


def _meta_int(metadata: dict[str, Any], key: str, default: int | None = None) -> int:
    if key in metadata:
        value = metadata[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise ModelLoadError(f"GGUF metadata {key!r} must be an integer, got {value!r}")
        return int(value)
    if default is None:
        raise ModelLoadError(f"GGUF metadata lacks {key!r}")
    return default


def config_from_gguf_metadata(metadata: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    """The model's config from its GGUF metadata; any value that is missing, of the wrong type or out
    of range is a ModelLoadError, found before anything is built from it."""
    try:
        config = _config_from_gguf_metadata(metadata, tensor_names)
        config.validate()
        return config
    except (TypeError, ValueError, ZeroDivisionError, AttributeError, OverflowError, KeyError) as exc:
        raise ModelLoadError(f"GGUF metadata: a missing or invalid hyperparameter ({type(exc).__name__}: {exc})") from None


def _config_from_gguf_metadata(metadata: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    a = arch + "."
    hidden = _meta_int(metadata, a + "embedding_length")
    heads = _meta_int(metadata, a + "attention.head_count")
    layers = _meta_int(metadata, a + "block_count")
    check_model_sizes(hidden_size=hidden, num_heads=heads, num_layers=layers)  # before dividing or per-layer lists
    # Old files lack key_length; their rope dimension is the head's, except where rotary is partial (Phi).
    rope_dims = hidden // heads if arch == "phi3" else _meta_int(metadata, a + "rope.dimension_count", hidden // heads)
    head_dim = _meta_int(metadata, a + "attention.key_length", rope_dims)
    vocab = metadata.get(a + "vocab_size") or len(metadata.get("tokenizer.ggml.tokens") or [])
    rope_scaling = None
    scaling_type = metadata.get(a + "rope.scaling.type")
    if scaling_type == "linear":
        rope_scaling = {"type": "linear", "factor": float(metadata[a + "rope.scaling.factor"])}
    elif scaling_type == "yarn":
        rope_scaling = yarn_scaling(float(metadata[a + "rope.scaling.factor"]),
                                    _meta_int(metadata, a + "rope.scaling.original_context_length"),
                                    metadata.get(a + "rope.scaling.yarn_beta_fast"),
                                    metadata.get(a + "rope.scaling.yarn_beta_slow"))
        # llama.cpp multiplies YaRN's own 0.1 ln(factor) + 1 by this key, where a converter wrote it.
        rope_scaling["attention_factor"] *= float(metadata.get(a + "rope.scaling.yarn_attn_factor", 1.0))
    elif scaling_type not in (None, "none"):
        raise ModelLoadError(f"unsupported rope scaling {scaling_type!r} in GGUF metadata")
    fields = family_fields_from_gguf(arch, metadata, layers, head_dim, hidden, heads)
    if fields.get("num_experts"):  # a layer without a router keeps its dense MLP
        moe = tuple(f"blk.{i}.ffn_gate_inp.weight" in tensor_names for i in range(layers))
        fields["moe_layers"] = None if all(moe) else moe
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=_meta_int(metadata, a + "feed_forward_length"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=_meta_int(metadata, a + "attention.head_count_kv", heads),
        head_dim=head_dim,
        context_length=_meta_int(metadata, a + "context_length"),
        rms_norm_eps=float(metadata.get(a + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(metadata.get(a + "rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        name=str(metadata.get("general.name", "")),
        extra={"format": "gguf", "file_type": metadata.get("general.file_type")},
        **fields,
    )


def stored_dtype_summary(entries) -> dict[str, dict[str, int]]:
    """(dtype name, elements, bytes) per tensor -> {dtype: {"tensors", "params", "bytes"}}."""
    summary: dict[str, dict[str, int]] = {}
    for dtype, n, nbytes in entries:
        row = summary.setdefault(dtype, {"tensors": 0, "params": 0, "bytes": 0})
        row["tensors"] += 1
        row["params"] += n
        row["bytes"] += nbytes
    return summary


def load_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, GGUFTensor], dict[str, Any]]:
    """Read a GGUF file: (config, canonical tensors, not yet read from the memory map, metadata)."""
    path = Path(path)
    reader, metadata = open_gguf(path)
    names = {t.name for t in reader.tensors}
    config = config_from_gguf_metadata(metadata, names)
    config.extra["stored_dtypes"] = stored_dtype_summary(
        (GGMLQuantizationType(t.tensor_type).name, int(t.n_elements), int(t.n_bytes)) for t in reader.tensors
    )
    tensors: dict[str, GGUFTensor] = {}
    arch = config.architecture
    for t in reader.tensors:
        # GGUF lists dimensions fastest first: (in_features, out_features) is PyTorch's (out, in).
        tensor = GGUFTensor(t.name, GGMLQuantizationType(t.tensor_type), tuple(int(d) for d in reversed(t.shape)),
                            t.data, path, release_pages=t.release_pages)
        layer = _LAYER_RE.fullmatch(t.name)
        if layer and layer.group(2) in GGUF_STACKED_EXPERTS:  # (experts, out, in): one matrix per expert
            part = GGUF_STACKED_EXPERTS[layer.group(2)]
            for e in range(tensor.shape[0]):
                tensors[f"layers.{layer.group(1)}.mlp.experts.{e}.{part}.weight"] = tensor.expert(e)
            # The experts are built in order: once the last is read, the whole stack's pages may go.
            tensors[f"layers.{layer.group(1)}.mlp.experts.{e}.{part}.weight"].release_pages = t.release_pages
            continue
        name = canonical_name(t.name, arch)
        if name is not None and name.endswith("shared_expert_gate.weight") and len(tensor.shape) == 1:
            tensor = GGUFTensor(t.name, tensor.ggml_type, (1, tensor.shape[0]), t.data.reshape(1, -1), path)
        if name is None:
            if t.name == "rope_freqs.weight":  # Llama 3.1 frequency divisors
                factors = tensor.dequantize().reshape(-1)
                config = replace(config, rope_scaling={"type": "freq_factors", "factors": factors})
            elif t.name == "rope_factors_short.weight":  # Phi-3's LongRoPE, short factors (the ones used)
                long = next((x for x in reader.tensors if x.name == "rope_factors_long.weight"), None)
                scaling = {"type": "longrope", "short_factor": tensor.dequantize().reshape(-1).tolist(),
                           "long_factor": [] if long is None else [float(f) for f in long.data.reshape(-1)],
                           "original_context_length": int(metadata.get(f"{arch}.rope.scaling.original_context_length", 0)),
                           "attention_factor": float(metadata.get(f"{arch}.rope.scaling.attn_factor", 1.0))}
                config = replace(config, rope_scaling=scaling)
            continue
        if arch in PERMUTED_QK_ARCHITECTURES:
            if name.endswith("q_proj.weight"):
                tensor.unpermute_heads = config.num_heads
            elif name.endswith("k_proj.weight"):
                tensor.unpermute_heads = config.num_kv_heads
        tensors[name] = tensor
    return config, tensors, metadata
