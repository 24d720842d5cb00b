"""What each model family changes from Llama, read from its files: the one place to add a family.

A family is Llama's decoder with a few switches (ModelConfig's family fields, which model/llama.py
implements) and a few tensor names of its own. For each family this file says:

- how its Hugging Face config.json sets those switches (`family_fields_from_hf`),
- how its GGUF metadata sets them, as llama.cpp's converter writes it (`family_fields_from_gguf`),
- its tensor names in both formats that differ from Llama's (`HF_LAYER_NAMES`, `GGUF_LAYER_NAMES`),
- what its checkpoint stores differently (Gemma's norm weights w, applied as 1 + w: `HF_NORM_OFFSET`).

Adding a family: a name in model/config.py's SUPPORTED_ARCHITECTURES, its entries here, and, only if
it brings a computation Llama's block lacks, a switch in ModelConfig and model/llama.py.
Every family is checked against transformers' own modeling code in tests/model/test_families.py.
"""

from __future__ import annotations

import math
import re
from typing import Any

from leapllm.errors import ModelLoadError

# Hugging Face config.json model_type -> leapllm architecture (= GGUF general.architecture).
HF_MODEL_TYPES = {
    "llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
    "gemma3_text": "gemma3", "phi3": "phi3", "olmo2": "olmo2",
    "mixtral": "mixtral", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe",
}

# Gemma's checkpoints store RMSNorm weights w and apply 1 + w; llama.cpp's converter adds the 1
# when it writes the GGUF. Loading a Hugging Face folder adds it too, so the model has one RMSNorm.
HF_NORM_OFFSET = {"gemma2": 1.0, "gemma3": 1.0}

# Canonical names of a layer's tensors (model/llama.py's module paths) by Hugging Face name, where a
# family differs from Llama's mapping (loading/safetensors_loader.py holds Llama's).
_GEMMA_HF = {
    "post_attention_layernorm.weight": "post_attn_norm.weight",
    "pre_feedforward_layernorm.weight": "mlp_norm.weight",
    "post_feedforward_layernorm.weight": "post_mlp_norm.weight",
}
_QK_NORM_HF = {"self_attn.q_norm.weight": "attn.q_norm.weight", "self_attn.k_norm.weight": "attn.k_norm.weight"}
_MOE_HF = {
    "mlp.gate.weight": "mlp.router.weight",
    "mlp.shared_expert.gate_proj.weight": "mlp.shared_expert.gate_proj.weight",
    "mlp.shared_expert.up_proj.weight": "mlp.shared_expert.up_proj.weight",
    "mlp.shared_expert.down_proj.weight": "mlp.shared_expert.down_proj.weight",
    "mlp.shared_expert_gate.weight": "mlp.shared_expert_gate.weight",
}
HF_LAYER_NAMES: dict[str, dict[str, str]] = {
    "qwen3": _QK_NORM_HF,
    "mixtral": {"block_sparse_moe.gate.weight": "mlp.router.weight"},
    "qwen2moe": _MOE_HF,
    "qwen3moe": _MOE_HF | _QK_NORM_HF,
    "olmoe": _MOE_HF | _QK_NORM_HF,
    "gemma2": _GEMMA_HF,
    "gemma3": _GEMMA_HF | _QK_NORM_HF,
    # Phi-3 stores q, k, v as one matrix and gate, up as another, as leapllm runs them.
    "phi3": {"self_attn.qkv_proj.weight": "attn.qkv_proj.weight", "mlp.gate_up_proj.weight": "mlp.gate_up_proj.weight"},
    "olmo2": _QK_NORM_HF | {"post_attention_layernorm.weight": "post_attn_norm.weight",
                            "post_feedforward_layernorm.weight": "post_mlp_norm.weight"},
}

# One expert's matrices, by Hugging Face name: Mixtral's w1/w3/w2, the others' gate/up/down.
HF_EXPERT_RE = re.compile(r"(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight")
HF_EXPERT_PARTS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj",
                   "gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}

# The same for GGUF names (llama.cpp's, without the "blk.N." prefix).
_POST_NORMS_GGUF = {"post_attention_norm.weight": "post_attn_norm.weight", "post_ffw_norm.weight": "post_mlp_norm.weight"}
_QK_NORM_GGUF = {"attn_q_norm.weight": "attn.q_norm.weight", "attn_k_norm.weight": "attn.k_norm.weight"}
_MOE_GGUF = {
    "ffn_gate_inp.weight": "mlp.router.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}
GGUF_LAYER_NAMES: dict[str, dict[str, str]] = {
    "llama": _MOE_GGUF,  # Mixtral's GGUF is "llama" with experts
    "qwen2moe": _MOE_GGUF,
    "qwen3moe": _MOE_GGUF | _QK_NORM_GGUF,
    "olmoe": _MOE_GGUF | _QK_NORM_GGUF,
    "qwen3": _QK_NORM_GGUF,
    "gemma2": _POST_NORMS_GGUF,
    "gemma3": _POST_NORMS_GGUF | _QK_NORM_GGUF,
    # llama.cpp keeps Phi-3's fused matrices: ffn_up holds gate and up.
    "phi3": {"attn_qkv.weight": "attn.qkv_proj.weight", "ffn_up.weight": "mlp.gate_up_proj.weight"},
    "olmo2": _POST_NORMS_GGUF | _QK_NORM_GGUF,
}

# Stacked (experts, out, in) GGUF tensors: each becomes the experts' own matrices.
GGUF_STACKED_EXPERTS = {"ffn_gate_exps.weight": "gate_proj", "ffn_up_exps.weight": "up_proj",
                        "ffn_down_exps.weight": "down_proj"}

# Tensors that hold two canonical tensors fused, by rows (Phi-3's), and the parts they stand for.
FUSED_TENSORS = {
    "attn.qkv_proj.weight": ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}

# The fields a family fixes whatever its files say.
_FIXED: dict[str, dict[str, Any]] = {
    "qwen3": {"qk_norm": "head"},
    "gemma2": {"norm_placement": "pre_post", "hidden_act": "gelu_tanh"},
    "gemma3": {"norm_placement": "pre_post", "hidden_act": "gelu_tanh", "qk_norm": "head"},
    "olmo2": {"norm_placement": "post", "qk_norm": "full"},
    "qwen3moe": {"qk_norm": "head"},
    "olmoe": {"qk_norm": "full"},
}
# Whether the chosen experts' probabilities are renormalized, where the files do not say (llama.cpp's
# choice per architecture; Mixtral's GGUF is "llama").
_NORM_TOPK = {"llama": True, "mixtral": True, "qwen3moe": True, "qwen2moe": False, "olmoe": False}


def _sliding_layers_hf(arch: str, cfg: dict[str, Any], num_layers: int) -> tuple[int | None, tuple[bool, ...] | None]:
    """(sliding_window, sliding_layers) from config.json."""
    window = cfg.get("sliding_window")
    if arch in ("qwen2", "qwen3", "qwen2moe", "qwen3moe") and not cfg.get("use_sliding_window", False):
        window = None
    if not window:
        return None, None
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        if len(layer_types) != num_layers:
            raise ModelLoadError(f"config.json: layer_types has {len(layer_types)} entries for {num_layers} layers")
        layers = tuple(t == "sliding_attention" for t in layer_types)
    elif arch == "gemma2":
        layers = tuple((i + 1) % 2 == 1 for i in range(num_layers))
    elif arch == "gemma3":
        pattern = int(cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6)))
        layers = tuple((i + 1) % pattern != 0 for i in range(num_layers))
    elif arch in ("qwen2", "qwen3", "qwen2moe", "qwen3moe"):
        first = int(cfg.get("max_window_layers", num_layers))
        layers = tuple(i >= first for i in range(num_layers))
    else:  # Mistral, Phi-3: every layer
        layers = None
    if layers is not None and not any(layers):
        return None, None
    return int(window), layers


def yarn_scaling(factor: float, original: int, beta_fast=None, beta_slow=None, attention_factor=None,
                 mscale=None, mscale_all_dim=None, truncate: bool = True) -> dict[str, Any]:
    """ModelConfig.rope_scaling for YaRN, its attention factor as transformers derives it."""
    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        attention_factor = (get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else get_mscale(factor))
    return {"type": "yarn", "factor": factor, "original_context_length": original,
            "beta_fast": float(beta_fast or 32), "beta_slow": float(beta_slow or 1),
            "attention_factor": float(attention_factor), "truncate": truncate}


def _rope_hf(rope: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any] | None:
    """A rope_scaling / rope_parameters dict of config.json -> ModelConfig.rope_scaling."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return {"type": "linear", "factor": float(rope["factor"])}
    if kind == "llama3":
        return {
            "type": "llama3",
            "factor": float(rope["factor"]),
            "low_freq_factor": float(rope["low_freq_factor"]),
            "high_freq_factor": float(rope["high_freq_factor"]),
            "original_context_length": int(rope["original_max_position_embeddings"]),
        }
    if kind == "yarn":
        original = int(rope.get("original_max_position_embeddings") or cfg["original_max_position_embeddings"])
        factor = float(rope.get("factor") or int(cfg["max_position_embeddings"]) / original)
        return yarn_scaling(factor, original, rope.get("beta_fast"), rope.get("beta_slow"), rope.get("attention_factor"),
                            rope.get("mscale"), rope.get("mscale_all_dim"), bool(rope.get("truncate", True)))
    if kind == "dynamic":  # dynamic NTK: the context it was trained for, stretched by up to `factor`
        if not float(rope["factor"]) >= 1:
            raise ValueError(f"dynamic rope factor must be at least 1, got {rope['factor']!r:.30}")
        return {"type": "dynamic", "factor": float(rope["factor"]),
                "original_context_length": int(cfg.get("max_position_embeddings", 2048))}
    if kind in ("longrope", "su"):
        original = int(rope.get("original_max_position_embeddings") or cfg["original_max_position_embeddings"])
        factor = rope.get("factor") or int(cfg.get("max_position_embeddings", original)) / original
        attention_factor = rope.get("attention_factor")
        if attention_factor is None:  # LongRoPE's paper, as transformers computes it
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        return {"type": "longrope", "short_factor": [float(f) for f in rope["short_factor"]],
                "long_factor": [float(f) for f in rope["long_factor"]],
                "original_context_length": original, "attention_factor": float(attention_factor)}
    raise ModelLoadError(f"unsupported rope scaling {kind!r} in config.json")


def _experts_hf(arch: str, cfg: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """The MoE fields of config.json (none for a dense family)."""
    if arch not in ("mixtral", "qwen2moe", "qwen3moe", "olmoe"):
        return {}
    if cfg.get("clip_qkv") is not None:
        raise ModelLoadError(f"config.json: clip_qkv is not supported ({arch})")
    experts = int(cfg.get("num_local_experts") or cfg["num_experts"])
    fields = {
        "num_experts": experts,
        "num_experts_per_token": int(cfg["num_experts_per_tok"]),
        "expert_intermediate_size": int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"]),
        "shared_expert_intermediate_size": int(cfg.get("shared_expert_intermediate_size") or 0),
        "norm_topk_prob": True if arch == "mixtral" else bool(cfg.get("norm_topk_prob", False)),
    }
    if arch in ("qwen2moe", "qwen3moe"):  # some layers may keep a dense MLP
        dense, step = set(cfg.get("mlp_only_layers") or []), int(cfg.get("decoder_sparse_step", 1) or 1)
        layers = tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))
        fields["moe_layers"] = None if all(layers) else layers
    return fields


def family_fields_from_hf(arch: str, cfg: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """ModelConfig keyword arguments that config.json sets: rope, windows and the family switches."""
    fields: dict[str, Any] = dict(_FIXED.get(arch, {}))
    # transformers 4.x writes rope_theta and rope_scaling; 5.x writes rope_parameters (with rope_theta),
    # per attention type for Gemma 3.
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"rope_scaling / rope_parameters must be an object, got {rope!r:.60}")
    if arch == "gemma3" and "full_attention" in rope:
        local, rope = rope.get("sliding_attention") or {}, rope["full_attention"]
        fields["rope_local_theta"] = float(local.get("rope_theta", 10000.0))
    elif arch == "gemma3":
        fields["rope_local_theta"] = float(cfg.get("rope_local_base_freq", 10000.0))
    fields["rope_theta"] = float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))
    fields["rope_scaling"] = _rope_hf(rope, cfg)
    scaling = fields["rope_scaling"]
    if scaling and scaling["type"] == "dynamic":
        # What dynamic NTK is for: contexts up to factor times the trained one (vLLM's max length too).
        fields["context_length"] = int(scaling["original_context_length"] * scaling["factor"])
    factor = cfg.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
    fields["partial_rotary_factor"] = float(factor)
    fields["sliding_window"], fields["sliding_layers"] = _sliding_layers_hf(arch, cfg, num_layers)
    fields |= _experts_hf(arch, cfg, num_layers)
    if arch in ("gemma2", "gemma3"):
        fields["embedding_multiplier"] = math.sqrt(int(cfg["hidden_size"]))
        fields["attention_scale"] = float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5
        fields["attn_logit_softcap"] = cfg.get("attn_logit_softcapping")
        fields["final_logit_softcap"] = cfg.get("final_logit_softcapping")
        act = cfg.get("hidden_activation") or cfg.get("hidden_act")
        if act not in (None, "gelu_pytorch_tanh", "gelu_tanh"):
            raise ModelLoadError(f"config.json: unsupported activation {act!r} for {arch}")
    elif cfg.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"config.json: unsupported activation {cfg['hidden_act']!r} for {arch}")
    return fields


def family_fields_from_gguf(arch: str, metadata: dict[str, Any], num_layers: int, head_dim: int,
                            hidden: int, heads: int) -> dict[str, Any]:
    """ModelConfig keyword arguments that a GGUF's metadata sets, as llama.cpp reads them."""
    a = arch + "."
    fields: dict[str, Any] = dict(_FIXED.get(arch, {}))
    window = metadata.get(a + "attention.sliding_window")
    if window:
        fields["sliding_window"] = int(window)
        if arch == "gemma2":
            fields["sliding_layers"] = tuple(i % 2 == 0 for i in range(num_layers))
        elif arch == "gemma3":  # llama.cpp: 5 local layers, then a global one
            fields["sliding_layers"] = tuple((i + 1) % 6 != 0 for i in range(num_layers))
        pattern = metadata.get(a + "attention.sliding_window_pattern")
        if isinstance(pattern, list):  # per layer, where the converter writes it
            fields["sliding_layers"] = tuple(bool(x) for x in pattern)
    if arch in ("gemma2", "gemma3"):
        fields["embedding_multiplier"] = math.sqrt(hidden)
        # llama.cpp: query_pre_attn_scalar is hidden / heads for the 27B models, head_dim otherwise.
        scale = metadata.get(a + "attention.scale")
        if scale is None:
            scale = (hidden // heads if num_layers in (46, 62) else head_dim) ** -0.5
        fields["attention_scale"] = float(scale)
        fields["attn_logit_softcap"] = metadata.get(a + "attn_logit_softcapping")
        fields["final_logit_softcap"] = metadata.get(a + "final_logit_softcapping")
    if arch == "gemma3":
        fields["rope_local_theta"] = float(metadata.get(a + "rope.freq_base_swa", 10000.0))
    experts = int(metadata.get(a + "expert_count", 0) or 0)
    if experts:
        fields |= {
            "num_experts": experts,
            "num_experts_per_token": int(metadata[a + "expert_used_count"]),
            "expert_intermediate_size": int(metadata.get(a + "expert_feed_forward_length")
                                            or metadata[a + "feed_forward_length"]),
            "shared_expert_intermediate_size": int(metadata.get(a + "expert_shared_feed_forward_length", 0)),
            "norm_topk_prob": bool(metadata.get(a + "expert_weights_norm", _NORM_TOPK.get(arch, False))),
        }
    rope_dims = metadata.get(a + "rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        fields["partial_rotary_factor"] = int(rope_dims) / head_dim
    return fields
