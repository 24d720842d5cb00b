"""`leapllm quantize`: a decoder's Linear layers to int8 or int4, saved as a folder `--model` loads.

    leapllm quantize --method int4 --group-size 32 -o smollm2-int4      # round to nearest
    leapllm generate "Hello" --model smollm2-int4

Every projection (fused Q/K/V, output, fused gate/up, down) and the output head are quantized; the
embedding table and the norms stay in the compute dtype. A tied output head gets its own quantized
copy, since the embedding lookup still needs the float table.

The folder holds config.json (the model's shape), model.safetensors (float tensors plus, per
quantized layer, `<name>.qweight` and its scales), quantization.json (method and parameters),
and the tokenizer files. It is written to a temporary folder and renamed into place, so an
interrupted run never leaves a folder that loads half a model.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from leapllm.compression.int4 import (
    Int4Linear,
    check_group_size,
    pack_nibbles,
    quantize_int4_groupwise,
    unpack_nibbles,
)
from leapllm.compression.int8 import Int8Linear, quantize_per_channel_int8
from leapllm.errors import InvalidRequestError, ModelLoadError
from leapllm.model.config import ModelConfig
from leapllm.model.llama import Transformer, rotary_inv_freq
from leapllm.output_files import write_folder_atomically

METHODS = ("int8", "int4")
QUANT_FILE = "quantization.json"


def quantized_linears(model: Transformer) -> list[tuple[str, nn.Module, str]]:
    """(name, parent module, attribute) of every Linear that quantization replaces."""
    out = []
    for i, layer in enumerate(model.layers):
        out += [(f"layers.{i}.attn.qkv_proj", layer.attn, "qkv_proj"), (f"layers.{i}.attn.o_proj", layer.attn, "o_proj"),
                (f"layers.{i}.mlp.gate_up_proj", layer.mlp, "gate_up_proj"),
                (f"layers.{i}.mlp.down_proj", layer.mlp, "down_proj")]
    return out + [("lm_head", model, "lm_head")]


def quantize_tensors(weight: torch.Tensor, method: str, group_size: int) -> dict[str, torch.Tensor]:
    if method == "int4":
        # Saved as two values per byte, scales and minimums in float16: ~0.56 bytes per weight at group 32.
        q, scale, minimum = quantize_int4_groupwise(weight, group_size)
        return {"qweight": pack_nibbles(q), "scales": scale.half(), "mins": minimum.half()}
    q, scale = quantize_per_channel_int8(weight)
    return {"qweight": q, "scales": scale}


def quantized_module(parts: dict[str, torch.Tensor], bias: torch.Tensor | None, method: str, device) -> nn.Module:
    if method == "int4":
        return Int4Linear(unpack_nibbles(parts["qweight"]), parts["scales"].float(), parts["mins"].float(), bias, device)
    return Int8Linear(parts["qweight"].to(device), parts["scales"].to(device), None if bias is None else bias.to(device))


def check_settings(method: str, group_size: int, config: ModelConfig) -> None:
    if method not in METHODS:
        raise InvalidRequestError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "int4":
        for name, k in (("hidden", config.hidden_size), ("intermediate", config.intermediate_size),
                        ("attention output", config.q_size)):
            check_group_size(k, group_size, f"the {name} projection")


def quantize_model(model: Transformer, method: str, group_size: int = 32) -> dict[str, torch.Tensor]:
    """Replace the model's Linear layers in place; returns the tensors to save (quantized and float)."""
    check_settings(method, group_size, model.config)
    saved: dict[str, torch.Tensor] = {
        "embed_tokens.weight": model.embed_tokens.weight.detach(), "norm.weight": model.norm.weight.detach()}
    for i, layer in enumerate(model.layers):
        saved[f"layers.{i}.attn_norm.weight"] = layer.attn_norm.weight.detach()
        saved[f"layers.{i}.mlp_norm.weight"] = layer.mlp_norm.weight.detach()
    device = model.device
    for name, parent, attr in quantized_linears(model):
        linear = getattr(parent, attr)
        parts = quantize_tensors(linear.weight, method, group_size)
        saved |= {f"{name}.{k}": v for k, v in parts.items()}
        if linear.bias is not None:
            saved[f"{name}.bias"] = linear.bias.detach()
        setattr(parent, attr, quantized_module(parts, linear.bias, method, device))
    return saved


def check_output_folder(folder: str | Path) -> Path:
    """A quantized model goes into a new (or empty) folder whose parent exists."""
    out = Path(folder)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidRequestError(f"{out} already exists and is not an empty folder")
    if not out.parent.is_dir():
        raise InvalidRequestError(f"cannot write {out}: folder {out.parent} does not exist")
    return out


def save_quantized(folder: str | Path, config: ModelConfig, tokenizer, tensors: dict[str, torch.Tensor],
                   meta: dict) -> Path:
    """Write the folder atomically (output_files.write_folder_atomically): a temporary sibling, renamed
    into place at the end."""
    out = check_output_folder(folder)

    def write_files(staging: Path) -> None:
        cfg = asdict(config)
        cfg["extra"] = {}
        if config.rope_scaling and config.rope_scaling.get("type") == "freq_factors":
            cfg["rope_scaling"] = {"type": "freq_factors", "factors": config.rope_scaling["factors"].tolist()}
        (staging / "config.json").write_text(json.dumps({"leapllm_config": cfg}, indent=2), encoding="utf-8")
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(staging / "model.safetensors"))
        (staging / QUANT_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        tokenizer.save_pretrained(staging)

    write_folder_atomically(out, write_files)
    return out


def is_quantized_folder(path: Path) -> bool:
    return path.is_dir() and (path / QUANT_FILE).is_file()


def load_quantized(folder: Path, dtype: torch.dtype, device: torch.device) -> tuple[Transformer, dict]:
    """Build the Transformer of a `leapllm quantize` folder: float tensors as saved, quantized layers rebuilt."""
    try:
        meta = json.loads((folder / QUANT_FILE).read_text(encoding="utf-8"))
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))["leapllm_config"]
        config = ModelConfig(**raw)
        tensors = load_file(str(folder / "model.safetensors"))
    except (OSError, KeyError, TypeError, ValueError, SafetensorError) as exc:
        raise ModelLoadError(f"{folder}: not a readable quantized model folder ({exc})") from None
    if config.rope_scaling and config.rope_scaling.get("type") == "freq_factors":
        config = ModelConfig(**{**raw, "rope_scaling": {"type": "freq_factors",
                                                         "factors": torch.tensor(config.rope_scaling["factors"])}})
    method = meta.get("method")
    if method not in METHODS:
        raise ModelLoadError(f"{folder}: unknown quantization method {method!r}")
    with torch.device("meta"):
        model = Transformer(config)
    float_names = ["embed_tokens.weight", "norm.weight"] + [f"layers.{i}.{n}.weight" for i in range(config.num_layers)
                                                            for n in ("attn_norm", "mlp_norm")]
    missing = [n for n in float_names if n not in tensors]
    if missing:
        raise ModelLoadError(f"{folder}: missing tensor {missing[0]}")
    for name, parent, attr in quantized_linears(model):
        keys = ("qweight", "scales", "mins") if method == "int4" else ("qweight", "scales")
        if any(f"{name}.{k}" not in tensors for k in keys):
            raise ModelLoadError(f"{folder}: missing quantized tensors of {name}")
        parts = {k: tensors[f"{name}.{k}"] for k in keys}
        setattr(parent, attr, quantized_module(parts, tensors.get(f"{name}.bias"), method, device))
    state = {n: tensors[n].to(device=device, dtype=dtype) for n in float_names}
    model.load_state_dict(state, assign=True, strict=False)
    model.inv_freq = rotary_inv_freq(config).to(device)
    return model.eval().requires_grad_(False), meta
