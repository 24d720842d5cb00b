"""Turning a format-neutral set of tensors into a ready `Transformer`.

Both loaders (GGUF, safetensors) produce tensors under one naming scheme, the "canonical" names
below, in PyTorch's (out_features, in_features) layout. Here the shapes are checked against the
config, Q/K/V and gate/up are fused, and the model is built without a throw-away random init.
"""

from __future__ import annotations

import torch

from leapllm.errors import ModelLoadError
from leapllm.model.config import ModelConfig
from leapllm.model.llama import Transformer, rotary_inv_freq


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical tensor name -> shape, for every tensor the model needs (lm_head only if untied)."""
    h, inter = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "embed_tokens.weight": (config.vocab_size, h),
        "norm.weight": (h,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for i in range(config.num_layers):
        p = f"layers.{i}."
        shapes |= {
            p + "attn_norm.weight": (h,),
            p + "mlp_norm.weight": (h,),
            p + "attn.q_proj.weight": (config.q_size, h),
            p + "attn.k_proj.weight": (config.kv_size, h),
            p + "attn.v_proj.weight": (config.kv_size, h),
            p + "attn.o_proj.weight": (h, config.q_size),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
        if config.attention_bias:
            shapes |= {
                p + "attn.q_proj.bias": (config.q_size,),
                p + "attn.k_proj.bias": (config.kv_size,),
                p + "attn.v_proj.bias": (config.kv_size,),
            }
    return shapes


def check_tensors(config: ModelConfig, tensors: dict[str, torch.Tensor], source: str) -> None:
    for name, shape in expected_shapes(config).items():
        if name not in tensors:
            raise ModelLoadError(f"{source}: missing tensor {name!r}")
        if tuple(tensors[name].shape) != shape:
            raise ModelLoadError(
                f"{source}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}"
            )


def build_model(config: ModelConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                device: torch.device | str, source: str) -> Transformer:
    """Check, fuse and load canonical tensors into a Transformer on `device` in `dtype`."""
    check_tensors(config, tensors, source)

    def get(name: str) -> torch.Tensor:
        return tensors[name].to(device=device, dtype=dtype)

    state = {
        "embed_tokens.weight": get("embed_tokens.weight"),
        "norm.weight": get("norm.weight"),
    }
    state["lm_head.weight"] = state["embed_tokens.weight"] if config.tie_word_embeddings else get("lm_head.weight")
    for i in range(config.num_layers):
        p = f"layers.{i}."
        state[p + "attn_norm.weight"] = get(p + "attn_norm.weight")
        state[p + "mlp_norm.weight"] = get(p + "mlp_norm.weight")
        state[p + "attn.qkv_proj.weight"] = torch.cat([get(p + f"attn.{x}_proj.weight") for x in "qkv"])
        if config.attention_bias:
            state[p + "attn.qkv_proj.bias"] = torch.cat([get(p + f"attn.{x}_proj.bias") for x in "qkv"])
        state[p + "attn.o_proj.weight"] = get(p + "attn.o_proj.weight")
        state[p + "mlp.gate_up_proj.weight"] = torch.cat(
            [get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]
        )
        state[p + "mlp.down_proj.weight"] = get(p + "mlp.down_proj.weight")

    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(state, assign=True, strict=True)
    if config.tie_word_embeddings:  # assign=True replaced the shared Parameter: tie them again
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rotary_inv_freq(config).to(device)
    return model.eval().requires_grad_(False)
