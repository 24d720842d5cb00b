"""The folder every compression tool writes (quantize, prune, distill) and `--model` loads.

    config.json        {"leapllm_config": ModelConfig as JSON}: the shape, per-layer sizes included
    model.safetensors  the Transformer's tensors under its own parameter names; a quantized layer
                       `<name>` is stored as `<name>.qweight` plus its scales instead of `<name>.weight`
    leapllm.json       {"quantization": {"method": "int4", "group_size": 32, "head_method": "int8", ...} or null,
                        "history": [{"method": "ffn", "sparsity": 0.5, ...}, ...]}: what was done, in order
    tokenizer files    as Tokenizer.save_pretrained writes them

Compression steps chain: a pruned folder can be distilled, then quantized, and each step appends
to the history. The folder is written to a temporary sibling and renamed into place, so an
interrupted run never leaves a folder that loads half a model.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from leapllm.errors import InvalidRequestError, ModelLoadError
from leapllm.kernels.packing import move_to_huge_pages
from leapllm.model.config import ModelConfig
from leapllm.model.llama import Transformer
from leapllm.model.quantized.layers import (
    QUANTIZED_PARTS,
    layer_method,
    packed_linear_of,
    quantized_embedding,
    quantized_linears,
    quantized_module,
)
from leapllm.output_files import write_folder_atomically

MODEL_FOLDER_FILE = "leapllm.json"


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / MODEL_FOLDER_FILE).is_file()


def check_output_folder(folder: str | Path) -> Path:
    """A compressed model goes into a new (or empty) folder whose parent exists."""
    out = Path(folder)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidRequestError(f"{out} already exists and is not an empty folder")
    if not out.parent.is_dir():
        raise InvalidRequestError(f"cannot write {out}: folder {out.parent} does not exist")
    return out


def float_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors to save as they are: every parameter, once (a tied head is not repeated)."""
    return {name: p.detach() for name, p in model.named_parameters()}  # named_parameters skips tied duplicates


def config_to_json(config: ModelConfig) -> dict:
    cfg = asdict(config)
    cfg["extra"] = {}
    if config.rope_scaling and config.rope_scaling.get("type") == "freq_factors":
        cfg["rope_scaling"] = {"type": "freq_factors", "factors": config.rope_scaling["factors"].tolist()}
    return cfg


def config_from_json(raw: dict) -> ModelConfig:
    if raw.get("rope_scaling") and raw["rope_scaling"].get("type") == "freq_factors":
        raw = {**raw, "rope_scaling": {"type": "freq_factors", "factors": torch.tensor(raw["rope_scaling"]["factors"])}}
    return ModelConfig(**raw)


def save_model_folder(folder: str | Path, config: ModelConfig, tokenizer, tensors: dict[str, torch.Tensor],
                      quantization: dict | None, history: list[dict]) -> Path:
    out = check_output_folder(folder)

    def write_files(staging: Path) -> None:
        (staging / "config.json").write_text(json.dumps({"leapllm_config": config_to_json(config)}, indent=2),
                                             encoding="utf-8")
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(staging / "model.safetensors"))
        meta = {"quantization": quantization, "history": history}
        (staging / MODEL_FOLDER_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        tokenizer.save_pretrained(staging)

    write_folder_atomically(out, write_files)
    return out


def read_model_folder(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    try:
        meta = json.loads((folder / MODEL_FOLDER_FILE).read_text(encoding="utf-8"))
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))["leapllm_config"]
        config = config_from_json(raw)
        tensors = load_file(str(folder / "model.safetensors"))
        meta.setdefault("quantization", None)
        meta.setdefault("history", [])
    except (OSError, KeyError, TypeError, ValueError, AttributeError, SafetensorError) as exc:
        raise ModelLoadError(f"{folder}: not a readable leapllm model folder ({exc})") from None
    return config, tensors, meta


def load_model_folder(folder: Path, dtype: torch.dtype, device: torch.device) -> tuple[Transformer, dict]:
    """Build the Transformer of a folder written by a compression tool; returns (model, leapllm.json)."""
    config, tensors, meta = read_model_folder(folder)
    quant = meta["quantization"]
    with torch.device("meta"):
        model = Transformer(config)
    table = None  # the quantized table the embedding looks tokens up in; None: a float one
    column_scales = None  # a tied table's row factors, where the head was scaled (compression/quantize.py)
    if quant is not None:
        methods = {quant.get("method"), quant.get("head_method") or quant.get("method")}
        unknown = sorted(str(m) for m in methods if m not in QUANTIZED_PARTS)
        if unknown:
            raise ModelLoadError(f"{folder}: unknown quantization method {unknown[0]!r}")
        for name, parent, attr in quantized_linears(model):
            method = layer_method(name, quant["method"], quant.get("head_method"))
            keys = QUANTIZED_PARTS[method]
            if any(f"{name}.{k}" not in tensors for k in keys):
                raise ModelLoadError(f"{folder}: missing quantized tensors of {name}")
            parts = {k: tensors.pop(f"{name}.{k}") for k in keys}
            setattr(parent, attr, quantized_module(parts, tensors.pop(f"{name}.bias", None), method, device))
            if name == "lm_head":
                head_parts, head_method = parts, method
        if "embed_tokens.qweight" in tensors:  # the table quantized on its own, like the head
            if any(f"embed_tokens.{k}" not in tensors for k in QUANTIZED_PARTS[head_method]):
                raise ModelLoadError(f"{folder}: missing quantized tensors of embed_tokens")
            table_parts = {k: tensors.pop(f"embed_tokens.{k}") for k in QUANTIZED_PARTS[head_method]}
            table = quantized_module(table_parts, None, head_method, device)
        elif config.tie_word_embeddings and "embed_tokens.weight" not in tensors:  # the head's rows
            table, table_parts = model.lm_head, head_parts
            column_scales = tensors.pop("embed_tokens.column_scales", None)
            if column_scales is not None and tuple(column_scales.shape) != (config.hidden_size,):
                raise ModelLoadError(f"{folder}: tensor embed_tokens.column_scales has shape "
                                     f"{tuple(column_scales.shape)}, expected ({config.hidden_size},)")
        # (folders written before tables were quantized hold a float `embed_tokens.weight`)
    expected = {n: p for n, p in model.named_parameters() if not (table is not None and n == "embed_tokens.weight")}
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise ModelLoadError(f"{folder}: missing tensor {missing[0]}")
    unexpected = [n for n in tensors if n not in expected]
    if unexpected:
        raise ModelLoadError(f"{folder}: unexpected tensor {unexpected[0]}")
    for name, p in expected.items():
        if tensors[name].shape != p.shape:
            raise ModelLoadError(f"{folder}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                                 f"the config says {tuple(p.shape)}")
    state = {n: t.to(device=device, dtype=dtype) for n, t in tensors.items()}
    model.load_state_dict(state, assign=True, strict=False)
    if config.tie_word_embeddings and not quant:
        model.lm_head.weight = model.embed_tokens.weight  # assign=True replaced the tied parameter
    if table is not None:
        model.embed_tokens = quantized_embedding(table, table_parts, head_method, dtype, device, column_scales)
    # The packed weights onto 2 MiB pages now, in the order a step reads them (quantized_linears'), as
    # a GGUF's are packed there at load: otherwise the first decode step moves them.
    packed = [m for _, parent, attr in quantized_linears(model) if packed_linear_of(m := getattr(parent, attr))]
    if packed:
        move_to_huge_pages(packed)
    model.init_rotary()
    return model.eval().requires_grad_(False), meta
