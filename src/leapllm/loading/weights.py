"""Turning a format-neutral set of tensors into a ready `Transformer`.

Both loaders (GGUF, safetensors) produce tensors under one naming scheme, the "canonical" names
below, in PyTorch's (out_features, in_features) layout. Here the shapes are checked against the
config, Q/K/V and gate/up are fused, and the model is built without a throw-away random init --
with the weights a GGUF file stores in a block type the CPU kernels run kept as they are stored.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType
from torch import nn

from leapllm.errors import ModelLoadError
from leapllm.kernels import cpu_kernels
from leapllm.kernels.packing import (
    STORED_ROW_FORMS,
    kernels_can_run,
    pack_int8_sub_blocks,
    pack_stored_rows,
    packed_outputs,
    packed_weights_block,
    release_freed_heap,
)
from leapllm.loading.families import FUSED_TENSORS
from leapllm.loading.gguf_tensors import (
    KERNEL_DESCRIPTIONS,
    GGUFTensor,
    as_float,
    super_block_target,
)
from leapllm.model.config import ModelConfig
from leapllm.model.llama import Transformer
from leapllm.model.quantized.embedding import (
    BlockQuantizedEmbedding,
    PackedRowsEmbedding,
)
from leapllm.model.quantized.int4 import Int4Linear
from leapllm.model.quantized.int5 import Int5BlockLinear
from leapllm.model.quantized.int8 import Int8Linear
from leapllm.model.quantized.super_block import SuperBlockLinear

FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


def expected_shapes(config: ModelConfig, fused: set[str] = frozenset()) -> dict[str, tuple[int, ...]]:
    """Canonical tensor name -> shape, for every tensor the model needs (lm_head only if untied).

    fused: the names of fused tensors the file holds (Phi-3's `layers.N.attn.qkv_proj.weight`,
    `layers.N.mlp.gate_up_proj.weight`), expected instead of their parts.
    """
    h, inter = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "embed_tokens.weight": (config.vocab_size, h),
        "norm.weight": (h,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for i in range(config.num_layers):
        p = f"layers.{i}."
        shapes[p + "attn.o_proj.weight"] = (h, config.q_size)
        if config.is_moe_layer(i):
            shapes |= moe_shapes(config, p + "mlp.")
        elif p + "mlp.gate_up_proj.weight" in fused:
            shapes |= {p + "mlp.gate_up_proj.weight": (2 * inter, h), p + "mlp.down_proj.weight": (h, inter)}
        else:
            shapes |= {p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                       p + "mlp.down_proj.weight": (h, inter)}
        if p + "attn.qkv_proj.weight" in fused:
            shapes[p + "attn.qkv_proj.weight"] = (config.q_size + 2 * config.kv_size, h)
        else:
            shapes |= {p + "attn.q_proj.weight": (config.q_size, h), p + "attn.k_proj.weight": (config.kv_size, h),
                       p + "attn.v_proj.weight": (config.kv_size, h)}
        if config.norm_placement != "post":
            shapes |= {p + "attn_norm.weight": (h,), p + "mlp_norm.weight": (h,)}
        if config.norm_placement != "pre":
            shapes |= {p + "post_attn_norm.weight": (h,), p + "post_mlp_norm.weight": (h,)}
        if config.qk_norm is not None:
            per_head = config.qk_norm == "head"
            shapes |= {p + "attn.q_norm.weight": (config.head_dim if per_head else config.q_size,),
                       p + "attn.k_norm.weight": (config.head_dim if per_head else config.kv_size,)}
        if config.attention_bias:
            shapes |= {
                p + "attn.q_proj.bias": (config.q_size,),
                p + "attn.k_proj.bias": (config.kv_size,),
                p + "attn.v_proj.bias": (config.kv_size,),
            }
    return shapes


def moe_shapes(config: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
    """The tensors of one MoE layer's MLP under prefix p ("layers.N.mlp."): router, experts, shared expert."""
    h, inter = config.hidden_size, config.expert_intermediate_size
    shapes: dict[str, tuple[int, ...]] = {p + "router.weight": (config.num_experts, h)}
    for e in range(config.num_experts):
        q = f"{p}experts.{e}."
        shapes |= {q + "gate_proj.weight": (inter, h), q + "up_proj.weight": (inter, h),
                   q + "down_proj.weight": (h, inter)}
    shared = config.shared_expert_intermediate_size
    if shared:
        q = p + "shared_expert."
        shapes |= {q + "gate_proj.weight": (shared, h), q + "up_proj.weight": (shared, h),
                   q + "down_proj.weight": (h, shared), p + "shared_expert_gate.weight": (1, h)}
    return shapes


def fused_names(tensors: dict) -> set[str]:
    """The fused tensors (families.FUSED_TENSORS) among canonical `tensors`."""
    return {n for n in tensors if n.split(".", 2)[-1] in FUSED_TENSORS}


def check_tensors(config: ModelConfig, tensors: dict[str, torch.Tensor], source: str) -> None:
    for name, shape in expected_shapes(config, fused_names(tensors)).items():
        if name not in tensors:
            raise ModelLoadError(f"{source}: missing tensor {name!r}")
        if tuple(tensors[name].shape) != shape:
            raise ModelLoadError(
                f"{source}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}"
            )


def _note(kernels_by_type: dict[str, set[str]], tensor, how: str) -> None:
    """Record what runs a stored tensor (of a GGUF file; other sources have no stored type)."""
    if isinstance(tensor, GGUFTensor):
        kernels_by_type.setdefault(tensor.type_name, set()).add(how)


def _release(read: list) -> None:
    """These stored tensors have been read: their file pages need not stay beside what was built."""
    for t in read:
        if getattr(t, "release_pages", None) is not None:
            t.release_pages()


def projection_format(parts: list) -> str | None:
    """The packed format the stored tensors `parts` run in as one layer: their kernel format when
    they share one (K-quants of different types share "super-blocks", Q5_0 and Q8_0 "int8"), int8-16
    when they differ otherwise, None when one of them has no kernel format."""
    formats = {getattr(t, "kernel_format", None) for t in parts}
    if None in formats:
        return None
    if formats == {"int5", "int8"}:  # Q5_0 and Q8_0 parts: both are int8 blocks
        return "int8"
    return formats.pop() if len(formats) == 1 else "int8-16"


def _quantized_projection(parts: list, fmt: str, bias: torch.Tensor | None, device: torch.device,
                          block=None) -> nn.Module | None:
    """The stored tensors `parts` (concatenated by rows) as one Int4Linear / Int8Linear / Int5BlockLinear /
    SuperBlockLinear in packed format `fmt` (projection_format's) on leapllm's kernels, exactly as
    stored, packed into `block` (packed_weights_block's) where the form is packed from stored rows;
    None where the kernels do not run this shape here."""
    out_features, in_features = sum(t.shape[0] for t in parts), parts[0].shape[1]
    if not kernels_can_run(in_features, out_features, device):
        return None
    if fmt in STORED_ROW_FORMS:
        return _packed_from_stored_rows(parts, fmt, bias, block)
    # int8-16 (parts of different block types): decoded into values and factors here, then packed
    if len(parts) == 1 and out_features >= 2 * PACK_ROWS_AT_ONCE and parts[0].unpermute_heads is None:
        return _sub_blocks_by_row_slices(parts[0], bias)
    per_part = [t.sub_block_parts() for t in parts]
    u, scale, minimum = [x[0] if len(x) == 1 else torch.cat(x) for x in zip(*per_part)]
    _release(parts)
    return Int8Linear(u, scale, bias, minimum=minimum)


# Rows of one stored tensor packed at a time, its file pages dropped after each slice: an output head
# of 150k tokens would otherwise be resident twice (the file's pages and the packed copy) at the
# load's peak, and the int8-16 form's decoded values and factors are several times its packed size.
PACK_ROWS_AT_ONCE = 4096


def _packed_from_stored_rows(parts: list[GGUFTensor], fmt: str, bias: torch.Tensor | None, block=None) -> nn.Module:
    """_quantized_projection for the forms packed in C++ straight from the file's block rows."""
    high_bits, group, with_mins = super_block_target([t.ggml_type for t in parts]) if fmt == "super-blocks" \
        else (0, 32, True)
    outputs = packed_outputs(fmt, sum(t.shape[0] for t in parts), parts[0].shape[1], group, high_bits, with_mins,
                             block)
    row0 = 0
    for t in parts:
        data, order = t.stored_rows()
        for r0 in range(0, t.shape[0], PACK_ROWS_AT_ONCE):
            try:
                pack_stored_rows(outputs, data, order[r0:r0 + PACK_ROWS_AT_ONCE], row0 + r0, t.ggml_type, fmt, group,
                                 high_bits)
            except ValueError as e:  # a block the packed form cannot hold (a Q4_0 scale past float16)
                raise ModelLoadError(f"{t.source}: tensor {t.name!r}: {e}") from None
            _release([t])  # the slice's file pages (the rest page in again from the page cache)
        row0 += t.shape[0]
    weight, high, scales, mins, super_scales, super_mins = outputs
    if fmt == "super-blocks":
        return SuperBlockLinear.from_packed(tuple(outputs), high_bits, group, bias)
    if fmt == "int5":
        return Int5BlockLinear.from_packed(weight, high, scales, bias)
    if fmt == "int4":
        return Int4Linear.from_packed(weight, scales, mins, bias)
    return Int8Linear.from_packed(weight, scales, None, bias)


def _sub_blocks_by_row_slices(part: GGUFTensor, bias: torch.Tensor | None) -> nn.Module:
    """An int8-16 layer of one big tensor: each slice of rows (whole tiles of 16) decoded and packed on
    its own into its rows of the packed tensors, which the kernels' layout keeps tile after tile."""
    n, _ = part.shape
    packed: list[torch.Tensor] = []
    for r0 in range(0, n, PACK_ROWS_AT_ONCE):
        rows = part.row_slice(r0, min(n, r0 + PACK_ROWS_AT_ONCE))
        slice_packed = pack_int8_sub_blocks(*rows.sub_block_parts())
        if not packed:
            packed = [t.new_empty((n, *t.shape[1:])) for t in slice_packed]
        for whole, piece in zip(packed, slice_packed):
            whole[r0:r0 + piece.shape[0]] = piece
        _release([part])
    return Int8Linear.from_packed(*packed, bias)


def build_model(config: ModelConfig, tensors: dict, dtype: torch.dtype, device: torch.device | str, source: str,
                keep_quantized: bool = False) -> Transformer:
    """Check, fuse and load canonical tensors (torch tensors or a file's GGUFTensors) into a
    Transformer on `device` in `dtype`.

    keep_quantized: projections stored in a block type that leapllm's CPU kernels run
    (gguf_tensors.KERNEL_FORMATS: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants) become Int4Linear /
    Int8Linear / Int5BlockLinear / SuperBlockLinear modules holding the stored values exactly, and a
    quantized embedding table stays quantized; every other tensor is dequantized to `dtype`, one at a time.
    config.extra["kernels_by_type"] records, per stored type, what runs it.
    """
    check_tensors(config, tensors, source)
    device = torch.device(device)
    kernels_by_type: dict[str, set[str]] = {}
    dtype_name = str(dtype).removeprefix("torch.")

    def get(name: str) -> torch.Tensor:
        stored = tensors[name]
        value = as_float(stored).to(device=device, dtype=dtype)
        is_float = getattr(stored, "ggml_type", None) in FLOAT_TYPES
        _note(kernels_by_type, stored, dtype_name if is_float else f"dequantized to {dtype_name}")
        _release([stored])
        return value

    with torch.device("meta"):
        model = Transformer(config)
    modules: dict[str, nn.Module] = {}  # module path -> its quantized replacement
    # The packed weights go into one block on 2 MiB pages in the order a decode step reads them
    # (layer by layer, the head last), where the fused step would otherwise move them at its first step.
    stored = [t for t in tensors.values() if getattr(t, "kernel_format", None) is not None] if keep_quantized else []
    block = packed_weights_block(sum(t.data.nbytes for t in stored), len(stored)) \
        if stored and device.type == "cpu" and cpu_kernels() is not None else None
    state: dict[str, torch.Tensor] = {"norm.weight": get("norm.weight")}

    def projection(path: str, names: list[str], bias_names: list[str] | None = None) -> None:
        bias = torch.cat([get(n) for n in bias_names]).float() if bias_names else None
        parts = [tensors[n] for n in names]
        fmt = projection_format(parts) if keep_quantized else None
        module = _quantized_projection(parts, fmt, bias, device, block) if fmt is not None else None
        if module is None:
            state[path + ".weight"] = torch.cat([get(n) for n in names])
            if bias is not None:
                state[path + ".bias"] = bias.to(dtype)
            return
        for t in parts:
            _note(kernels_by_type, t, KERNEL_DESCRIPTIONS[fmt])
        modules[path] = module

    fused = fused_names(tensors)

    def stored(p: str, name: str) -> list[str]:  # layer p's fused tensor where the file holds it so, else its parts
        return [p + name] if p + name in fused else [p + part for part in FUSED_TENSORS[name]]

    for i in range(config.num_layers):
        p = f"layers.{i}."
        for norm in ("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm", "attn.q_norm", "attn.k_norm"):
            if p + norm + ".weight" in tensors:
                state[p + norm + ".weight"] = get(p + norm + ".weight")
        projection(p + "attn.qkv_proj", stored(p, "attn.qkv_proj.weight"),
                   [p + f"attn.{x}_proj.bias" for x in "qkv"] if config.attention_bias else None)
        projection(p + "attn.o_proj", [p + "attn.o_proj.weight"])
        if not config.is_moe_layer(i):
            projection(p + "mlp.gate_up_proj", stored(p, "mlp.gate_up_proj.weight"))
            projection(p + "mlp.down_proj", [p + "mlp.down_proj.weight"])
            continue
        state[p + "mlp.router.weight"] = get(p + "mlp.router.weight")  # small: kept float
        experts = [f"{p}mlp.experts.{e}." for e in range(config.num_experts)]
        if config.shared_expert_intermediate_size:
            experts.append(p + "mlp.shared_expert.")
            state[p + "mlp.shared_expert_gate.weight"] = get(p + "mlp.shared_expert_gate.weight")
        for q in experts:
            projection(q + "gate_up_proj", [q + "gate_proj.weight", q + "up_proj.weight"])
            projection(q + "down_proj", [q + "down_proj.weight"])
    head_name = "embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    release_freed_heap(collect=False)  # the layers' small temporaries, before the head's big ones
    projection("lm_head", [head_name])

    embedding = tensors["embed_tokens.weight"]
    if "lm_head" in modules and config.tie_word_embeddings:
        modules["embed_tokens"] = PackedRowsEmbedding(modules["lm_head"])  # one table for both uses
    elif keep_quantized and isinstance(embedding, GGUFTensor) and embedding.ggml_type not in FLOAT_TYPES:
        modules["embed_tokens"] = BlockQuantizedEmbedding(embedding.raw_rows(), embedding.ggml_type, config.hidden_size)
        _note(kernels_by_type, embedding, "rows dequantized at lookup")
        _release([embedding])
    elif config.tie_word_embeddings:
        state["embed_tokens.weight"] = state.pop("lm_head.weight")
    else:
        state["embed_tokens.weight"] = get("embed_tokens.weight")

    if block is not None:
        block.release_unused()
    for path, module in modules.items():
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, module)
    model.load_state_dict(state, assign=True, strict=False)
    if config.tie_word_embeddings and "lm_head.weight" not in state and "embed_tokens.weight" in state:
        model.lm_head.weight = model.embed_tokens.weight  # assign=True replaced the shared Parameter: tie again
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta and n != "inv_freq"]
    if left:
        raise ModelLoadError(f"{source}: no weights for {left[0]}")
    model.init_rotary()
    config.extra["kernels_by_type"] = {k: sorted(v) for k, v in sorted(kernels_by_type.items())}
    return model.eval().requires_grad_(False)
