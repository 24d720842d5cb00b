"""Which of a decoder's Linear layers quantization replaces, and how a quantized layer's saved
tensors (`<name>.qweight`, `<name>.scales`, ...) become the runtime module again."""

from __future__ import annotations

import torch
from torch import nn

from leapllm.model.quantized.int4 import Int4Linear, dequantize_int4_groupwise, unpack_nibbles
from leapllm.model.quantized.int5 import Int5BlockLinear
from leapllm.model.quantized.int8 import Int8Linear
from leapllm.model.quantized.super_block import SuperBlockLinear

# The layers that hold quantized weights (packed for leapllm's kernels, or on PyTorch's).
QUANTIZED_LAYERS = (Int4Linear, Int8Linear, Int5BlockLinear, SuperBlockLinear)

# The tensors a quantized layer `<name>` is saved as: `<name>.qweight`, `<name>.scales`, ...
QUANTIZED_PARTS = {"int4": ("qweight", "scales", "mins"), "int8": ("qweight", "scales")}


def quantized_linears(model) -> list[tuple[str, nn.Module, str]]:
    """(name, parent module, attribute) of every Linear of a Transformer that quantization replaces,
    in the order a batch-1 decode step reads them (each block's Q/K/V, output, gate/up, down, then the
    head): the order their packed weights are laid out in on 2 MiB pages (move_to_huge_pages)."""
    out = []
    for i, layer in enumerate(model.layers):
        out += [(f"layers.{i}.attn.qkv_proj", layer.attn, "qkv_proj"), (f"layers.{i}.attn.o_proj", layer.attn, "o_proj")]
        # A mixture of experts: every expert's (and the shared expert's) MLP; the router stays float.
        mlps = [(f"layers.{i}.mlp", layer.mlp)]
        if hasattr(layer.mlp, "experts"):
            mlps = [(f"layers.{i}.mlp.experts.{e}", expert) for e, expert in enumerate(layer.mlp.experts)]
            if layer.mlp.shared_expert is not None:
                mlps.append((f"layers.{i}.mlp.shared_expert", layer.mlp.shared_expert))
        for name, mlp in mlps:
            out += [(f"{name}.gate_up_proj", mlp, "gate_up_proj"), (f"{name}.down_proj", mlp, "down_proj")]
    return out + [("lm_head", model, "lm_head")]


def quantized_module(parts: dict[str, torch.Tensor], bias: torch.Tensor | None, method: str, device) -> nn.Module:
    if method == "int4":
        return Int4Linear(unpack_nibbles(parts["qweight"]), parts["scales"].float(), parts["mins"].float(), bias, device)
    return Int8Linear(parts["qweight"].to(device), parts["scales"].to(device), None if bias is None else bias.to(device),
                      activation_digits=2)  # weight-only accuracy for decoders, see int8.py


def quantized_embedding(table: nn.Module, parts: dict[str, torch.Tensor], method: str, dtype: torch.dtype,
                        device, column_scales: torch.Tensor | None = None) -> nn.Module:
    """The token embedding looked up in a quantized table (`table`, built from `parts` by
    quantized_module; a tied model's output head itself), each row times column_scales (hidden,)
    where given (a head whose input columns activation-aware scaling multiplied): the table's packed
    rows where leapllm's kernels run it, so that a tied table is held once for both uses, as a
    GGUF's is; else the table dequantized to floats."""
    from leapllm.model.quantized.embedding import PackedRowsEmbedding

    if packed_linear_of(table) is not None:
        return PackedRowsEmbedding(table, column_scales)
    if method == "int4":
        weights = dequantize_int4_groupwise(unpack_nibbles(parts["qweight"]), parts["scales"].float(),
                                            parts["mins"].float())
    else:
        weights = parts["qweight"].float() * parts["scales"].float()[:, None]
    if column_scales is not None:
        weights = weights * column_scales.float()
    return nn.Embedding.from_pretrained(weights.to(device=device, dtype=dtype), freeze=True)


def packed_linear_of(module: nn.Module):
    """The C++ PackedLinear a quantized layer runs on (leapllm's CPU kernels), or None: a float layer,
    or a quantized one on PyTorch's kernels."""
    return module.packed_linear if isinstance(module, QUANTIZED_LAYERS) else None


def layer_method(name: str, method: str, head_method: str | None) -> str:
    """The method of layer `name`: the output head may be quantized differently (head_method)."""
    return head_method if name == "lm_head" and head_method else method


def parameter_count(model: nn.Module) -> int:
    """The number of weights the model stands for, whatever form they are held in: a quantized layer
    counts its in x out weights (not its packed bytes), a table shared by the embedding and the head once."""
    from leapllm.model.quantized.embedding import BlockQuantizedEmbedding

    total, seen = 0, set()
    for module in model.modules():
        if isinstance(module, QUANTIZED_LAYERS):
            total += module.in_features * module.out_features + (0 if module.bias is None else module.bias.numel())
        elif isinstance(module, BlockQuantizedEmbedding):
            total += module.num_embeddings * module.embedding_dim
        else:
            for p in module.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
    return total
