"""`leapllm quantize`: a decoder's Linear layers to int8 or int4, saved as a folder `--model` loads.

    leapllm quantize --method int4 --group-size 32 -o smollm2-int4      # round to nearest
    leapllm generate "Hello" --model smollm2-int4

Every projection (fused Q/K/V, output, fused gate/up, down), the output head and the embedding
table are quantized; the norms stay in the compute dtype. A model that ties its embedding table to
its head looks tokens up in the quantized head, as llama.cpp's files do, and the folder holds the
table once; where activation-aware scaling multiplied the head's input columns, a looked-up row is
divided by the same factors (`embed_tokens.column_scales` holds their inverses). An untied table is
quantized on its own like the head, by rounding to nearest. A lookup dequantizes only its rows.

The output is the folder of loading/model_folder.py: per quantized layer `<name>.qweight`
and its scales, `leapllm.json` naming the method and its parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from leapllm.compression.awq import apply_awq
from leapllm.errors import InvalidRequestError
from leapllm.loading.model_folder import float_tensors
from leapllm.model.llama import Transformer
from leapllm.model.quantized.int4 import (
    check_group_size,
    pack_nibbles,
    quantize_int4_groupwise,
)
from leapllm.model.quantized.int8 import quantize_per_channel_int8
from leapllm.model.quantized.layers import (
    layer_method,
    quantized_embedding,
    quantized_linears,
    quantized_module,
)

METHODS = ("int8", "int4")


def quantize_tensors(weight: torch.Tensor, method: str, group_size: int,
                     clip: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    if method == "int4":
        # Saved as two values per byte, scales and minimums in float16: ~0.56 bytes per weight at group 32.
        q, scale, minimum = quantize_int4_groupwise(weight, group_size, clip)
        return {"qweight": pack_nibbles(q), "scales": scale.half(), "mins": minimum.half()}
    q, scale = quantize_per_channel_int8(weight)
    return {"qweight": q, "scales": scale}


def check_settings(method: str, group_size: int, model: Transformer, head_method: str | None = None) -> None:
    for m in (method, head_method or method):
        if m not in METHODS:
            raise InvalidRequestError(f"unknown method {m!r}; choose one of {', '.join(METHODS)}")
    for name, parent, attr in quantized_linears(model):
        linear = getattr(parent, attr)
        if not isinstance(linear, nn.Linear):
            raise InvalidRequestError(f"{name} is already quantized; quantize a float model")
        if layer_method(name, method, head_method) == "int4":
            check_group_size(linear.in_features, group_size, name)


def quantize_model(model: Transformer, method: str, group_size: int = 32,
                   calibration_ids: torch.Tensor | None = None, head_method: str | None = None
                   ) -> dict[str, torch.Tensor]:
    """Replace the model's Linear layers in place; returns the tensors to save (quantized and float).

    With calibration token ids, int4 is activation-aware (awq.py): weights are rescaled against the
    calibration activations and each group's range is searched, instead of plain round to nearest.
    head_method quantizes the output head differently (int8 keeps it near-exact: on the default
    model the int4 head is where almost all of int4's perplexity loss comes from)."""
    check_settings(method, group_size, model, head_method)
    device = model.device
    clips: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    if calibration_ids is not None:
        if method != "int4":
            raise InvalidRequestError("a calibration text is used by int4 (activation-aware); int8 needs none")
        clips, scales = apply_awq(model, calibration_ids, group_size)
    quantized: dict[str, torch.Tensor] = {}
    for name, parent, attr in quantized_linears(model):
        linear = getattr(parent, attr)
        layer = layer_method(name, method, head_method)
        parts = quantize_tensors(linear.weight, layer, group_size, clips.get(name))
        quantized |= {f"{name}.{k}": v for k, v in parts.items()}
        if linear.bias is not None:
            quantized[f"{name}.bias"] = linear.bias.detach()
        setattr(parent, attr, quantized_module(parts, linear.bias, layer, device))
        if name == "lm_head":
            head_parts, head_layer = parts, layer
    # What is left as parameters (the norms) is saved as it is; the embedding table is quantized.
    tensors = float_tensors(model) | quantized
    dtype = model.embed_tokens.weight.dtype
    column_scales = None
    if model.config.tie_word_embeddings:
        table, table_parts = model.lm_head, head_parts  # the head's rows: saved once, as the head
        if "lm_head" in scales:  # a row of the scaled head, times these, is the table's row
            column_scales = tensors["embed_tokens.column_scales"] = (1 / scales["lm_head"]).float()
    else:
        table_parts = quantize_tensors(model.embed_tokens.weight, head_layer, group_size)
        table = quantized_module(table_parts, None, head_layer, device)
        tensors |= {f"embed_tokens.{k}": v for k, v in table_parts.items()}
    del tensors["embed_tokens.weight"]
    model.embed_tokens = quantized_embedding(table, table_parts, head_layer, dtype, device, column_scales)
    model.reset_fused_decode()  # batch-1 decode can now run fused on the packed weights
    return tensors
