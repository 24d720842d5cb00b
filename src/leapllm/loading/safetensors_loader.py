"""Reading a Hugging Face model folder: config.json + *.safetensors (+ tokenizer.json).

`safetensors` memory-maps each file and holds no code, unlike pickled checkpoints, which we
never load.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from leapllm.errors import ModelLoadError
from leapllm.loading.families import (
    HF_EXPERT_PARTS,
    HF_EXPERT_RE,
    HF_LAYER_NAMES,
    HF_MODEL_TYPES,
    HF_NORM_OFFSET,
    family_fields_from_hf,
)
from leapllm.loading.gguf_loader import stored_dtype_summary
from leapllm.model.config import SUPPORTED_ARCHITECTURES, ModelConfig, check_model_sizes

_HF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.q_proj.bias": "attn.q_proj.bias",
    "self_attn.k_proj.bias": "attn.k_proj.bias",
    "self_attn.v_proj.bias": "attn.v_proj.bias",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_HF_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_HF_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def canonical_name(hf_name: str, arch: str = "llama") -> str | None:
    if hf_name in _HF_GLOBAL_NAMES:
        return _HF_GLOBAL_NAMES[hf_name]
    m = _HF_LAYER_RE.fullmatch(hf_name)
    if m is None:
        return None
    name = HF_LAYER_NAMES.get(arch, {}).get(m.group(2)) or _HF_LAYER_NAMES.get(m.group(2))
    expert = HF_EXPERT_RE.fullmatch(m.group(2))
    if expert:
        name = f"mlp.experts.{expert.group(1)}.{HF_EXPERT_PARTS[expert.group(2)]}.weight"
    return f"layers.{m.group(1)}.{name}" if name else None


def config_from_hf(cfg: dict[str, Any], folder: Path) -> ModelConfig:
    arch = HF_MODEL_TYPES.get(cfg.get("model_type"))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{folder}: unsupported architecture {cfg.get('model_type')!r}; supported: {', '.join(HF_MODEL_TYPES)}"
        )
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        layers = int(cfg["num_hidden_layers"])
        check_model_sizes(hidden_size=hidden, num_heads=heads, num_layers=layers)  # before dividing or per-layer lists
        fields = family_fields_from_hf(arch, cfg, layers)
        config = ModelConfig(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            context_length=fields.pop("context_length", int(cfg.get("max_position_embeddings", 2048))),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", arch in ("gemma2", "gemma3"))),
            attention_bias=bool(cfg.get("attention_bias", cfg.get("qkv_bias", arch in ("qwen2", "qwen2moe")))),
            name=str(cfg.get("_name_or_path", folder.name)),
            extra={"format": "safetensors", "torch_dtype": cfg.get("torch_dtype", cfg.get("dtype"))},
            **fields,
        )
        config.validate()  # before any tensor is read or shape computed from it
        return config
    except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError, OverflowError) as exc:
        raise ModelLoadError(f"{folder}/config.json: missing or invalid field ({type(exc).__name__}: {exc})") from None


def load_safetensors_folder(folder: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a Hugging Face folder: (config, canonical tensors in their stored dtype)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    try:
        cfg = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{config_path}: must hold a JSON object, not a {type(cfg).__name__}")
    config = config_from_hf(cfg, folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for file in tqdm(files, desc=f"loading {folder.name}", unit="file", delay=1.0, leave=False):
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    name = canonical_name(key, config.architecture)
                    if name is not None:
                        tensors[name] = f.get_tensor(key)
                        if name.endswith("norm.weight") and config.architecture in HF_NORM_OFFSET:
                            tensors[name] = tensors[name].float() + HF_NORM_OFFSET[config.architecture]
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ModelLoadError(f"{file}: truncated or corrupt safetensors file ({exc})") from None
    config.extra["stored_dtypes"] = stored_dtype_summary(
        (str(t.dtype).removeprefix("torch."), t.numel(), t.numel() * t.element_size()) for t in tensors.values()
    )
    return config, tensors
