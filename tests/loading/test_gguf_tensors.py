"""GGUF block formats kept as stored: Q4_0 / Q4_1 / Q8_0 and the K-quants repacked for leapllm's
kernels bit for bit (against the gguf package's own dequantization), quantized embedding tables,
and the default quantized path of a GGUF model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as Q
from torch import nn

from leapllm.errors import ModelLoadError
from leapllm.kernels import cpu_kernels
from leapllm.kernels.packing import PACKED_BUFFERS
from leapllm.loading.gguf_loader import load_gguf
from leapllm.loading.gguf_tensors import GGUFTensor, SuperBlockParts, unpermute_qk
from leapllm.loading.loader import load_model
from leapllm.model.quantized.embedding import (
    F16_SCALE_OFFSETS,
    BlockQuantizedEmbedding,
    PackedRowsEmbedding,
)
from leapllm.model.quantized.int4 import Int4Linear
from leapllm.model.quantized.int5 import Int5BlockLinear
from leapllm.model.quantized.int8 import Int8Linear
from leapllm.model.quantized.super_block import SuperBlockLinear
from tests.tiny_models import TINY_VOCAB, tiny_hf_state, write_tiny_gguf

needs_kernels = pytest.mark.skipif(cpu_kernels() is None, reason="leapllm CPU kernels unavailable here")

KERNEL_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q5_0]


def weights_with_outliers(n: int, k: int, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    w = g.standard_normal((n, k)).astype(np.float32) * 0.05
    w[g.random((n, k)) < 0.01] *= 40  # a few large weights, as real checkpoints have
    w[0, :32] = 0  # an all-zero block: scale 0
    return w


def gguf_tensor(w: np.ndarray, qtype: Q, unpermute_heads: int | None = None) -> GGUFTensor:
    data = quants.quantize(w, qtype)
    return GGUFTensor("synthetic", qtype, w.shape, data, "synthetic.gguf", unpermute_heads)


def reference(t: GGUFTensor) -> torch.Tensor:
    """What the gguf package itself dequantizes the stored bytes to (rows in PyTorch's order)."""
    values = quants.dequantize(t.data, t.ggml_type)
    if t.unpermute_heads:
        values = unpermute_qk(values, t.unpermute_heads)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def packed_in_python(parts: list[GGUFTensor], fmt: str) -> nn.Module:
    """The parts (concatenated by rows) decoded into values and factors by numpy and packed by PyTorch
    (kernels/packing.py): the reference for the loader's C++ packing."""
    if fmt == "super-blocks":
        p = SuperBlockParts.joined([t.super_block_parts() for t in parts])
        return SuperBlockLinear(p.values, p.sub_scales, p.sub_mins, p.super_scales, p.super_mins, p.high_bits, p.group)
    getter = {"int4": "int4_parts", "int5": "int5_parts", "int8": "int8_parts"}[fmt]
    joined = [torch.cat(x) for x in zip(*(getattr(t, getter)() for t in parts))]
    if fmt == "int4":
        return Int4Linear(*joined, None)
    if fmt == "int5":
        return Int5BlockLinear(*joined)
    return Int8Linear(*joined)


def packed_module(t: GGUFTensor) -> nn.Module:
    """The tensor decoded by numpy and packed by PyTorch in its kernel format (packed_in_python)."""
    if t.kernel_format == "int8-16":
        u, scale, minimum = t.sub_block_parts()
        return Int8Linear(u, scale, minimum=minimum)
    return packed_in_python([t], t.kernel_format)


@needs_kernels
@pytest.mark.parametrize("qtype", KERNEL_TYPES)
@pytest.mark.parametrize("unpermute_heads", [None, 4])
def test_block_types_repack_into_the_kernels_layout_bit_for_bit(qtype, unpermute_heads):
    t = gguf_tensor(weights_with_outliers(64, 320, seed=int(qtype)), qtype, unpermute_heads)
    module = packed_module(t)
    assert module.packed_linear is not None
    assert torch.equal(module.packed_linear.dequantize(torch.float32), reference(t))


@needs_kernels
@pytest.mark.parametrize("qtype", KERNEL_TYPES)
def test_repacked_block_types_multiply_like_their_dequantized_weights(qtype):
    t = gguf_tensor(weights_with_outliers(48, 256, seed=3), qtype)
    x = torch.randn(5, 256)
    ref = x @ reference(t).T
    y = packed_module(t)(x)
    assert float((y - ref).norm() / ref.norm()) < 0.01  # activations rounded to int8 per block of 32


def random_blocks(qtype: Q, rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Random bytes in qtype's block layout with sane float16 scales: any bytes are valid blocks
    once the scale fields hold finite numbers (how K-quants are tested without llama-quantize)."""
    block, size = GGML_QUANT_SIZES[qtype]
    g = np.random.default_rng(seed)
    data = g.integers(0, 256, (rows, k // block, size), dtype=np.uint8)
    for off in F16_SCALE_OFFSETS.get(qtype, (0,)):
        data[..., off:off + 2] = np.ascontiguousarray(
            (g.random((rows, k // block)) * 0.01 + 1e-4).astype(np.float16)[..., None]).view(np.uint8)
    return data.reshape(rows, -1)


K_QUANTS = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


# Bits a weight each K-quant runs at (its file's in comments): values, int8 sub-block factors, float32 super-block ones.
SUPER_BLOCK_BITS = {Q.Q2_K: 5.25, Q.Q3_K: 4.75, Q.Q4_K: 4.75, Q.Q5_K: 5.75, Q.Q6_K: 6.75}  # 2.63 3.44 4.5 5.5 6.56


@needs_kernels
@pytest.mark.parametrize("qtype", K_QUANTS)
@pytest.mark.parametrize("unpermute_heads", [None, 2])
def test_k_quants_run_as_super_blocks_near_the_file_size_bit_for_bit(qtype, unpermute_heads):
    t = GGUFTensor("synthetic", qtype, (48, 512), random_blocks(qtype, 48, 512, seed=int(qtype)), "synthetic.gguf",
                   unpermute_heads)
    module = packed_module(t)
    assert t.kernel_format == "super-blocks" and module.packed_linear.super_blocks
    assert module.bytes_per_weight * 8 == SUPER_BLOCK_BITS[qtype]
    packed_bytes = sum(b.nbytes for n, b in module.named_buffers() if n.startswith("packed_"))
    assert packed_bytes * 8 == SUPER_BLOCK_BITS[qtype] * 48 * 512
    expected = reference(t)
    assert torch.equal(module.packed_linear.dequantize(torch.float32), expected)
    assert torch.equal(module.packed_linear.dequantize_rows(torch.tensor([5, 47])), expected[[5, 47]])
    x = torch.randn(3, 512)
    ref = x @ expected.T
    assert float((module(x) - ref).norm() / ref.norm()) < 0.02  # activations rounded to int8 per block of 32


@needs_kernels
@pytest.mark.parametrize("qtype", K_QUANTS)
def test_super_blocks_give_the_bits_of_the_expanded_forms_they_stand_for(qtype):
    """A super-block tile is expanded to int8 sub-blocks (Q4_K: int4 with float32 scales) and run on
    their tiles, so a layer's outputs are those forms' outputs, bit for bit, at every row count."""
    from leapllm.kernels.packing import pack_int4, packed_linear

    t = GGUFTensor("synthetic", qtype, (48, 512), random_blocks(qtype, 48, 512, seed=5), "synthetic.gguf")
    module = packed_module(t)
    u, scale, minimum = t.sub_block_parts()
    if qtype == Q.Q4_K:
        expanded = packed_linear(*pack_int4(u, scale[:, ::2], minimum[:, ::2], torch.float32), None, bits=4)
    else:
        expanded = Int8Linear(u, scale, minimum=minimum).packed_linear
    for rows in (1, 3, 8, 11):
        x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows))
        assert torch.equal(module.packed_linear.forward(x), expanded.forward(x))


@needs_kernels
def test_q5_0_runs_at_its_file_size_with_the_bits_of_the_int8_blocks_it_stands_for():
    """Q5_0 keeps its 5-bit values (5.5 bits a weight, where int8 blocks took 8.5), and a layer's
    outputs are those of the int8-block layer of the same values, on the SIMD tiles and the
    portable loops, at every row count."""
    from leapllm.kernels.packing import pack_int8_blocks, pack_super_blocks, packed_linear

    t = gguf_tensor(weights_with_outliers(48, 320, seed=11), Q.Q5_0)
    module = packed_module(t)
    assert isinstance(module, Int5BlockLinear) and module.packed_linear.five_bit
    packed_bytes = sum(b.nbytes for n, b in module.named_buffers() if n.startswith("packed_"))
    assert packed_bytes * 8 == 5.5 * 48 * 320 == module.bytes_per_weight * 8 * 48 * 320
    expected = reference(t)
    assert torch.equal(module.packed_linear.dequantize(torch.float32), expected)
    assert torch.equal(module.packed_linear.dequantize_rows(torch.tensor([0, 47])), expected[[0, 47]])
    blocks = pack_int8_blocks(*t.int8_parts())
    weight, high, (scales,) = pack_super_blocks(*t.int5_parts()[:1], 1, t.int5_parts()[1])
    portable = cpu_kernels().PackedLinear.from_five_bit_blocks(weight, high, scales, None, False)
    for rows in (1, 3, 8, 11, 40):
        x = torch.randn(rows, 320, generator=torch.Generator().manual_seed(rows))
        assert torch.equal(module.packed_linear.forward(x), packed_linear(*blocks, None, None, bits=8).forward(x))
        assert torch.equal(portable.forward(x), packed_linear(*blocks, None, None, bits=8, simd=False).forward(x))


@needs_kernels
def test_q5_0_and_q8_0_parts_fuse_into_one_exact_int8_block_projection():
    from leapllm.loading.weights import _quantized_projection, projection_format

    parts = [gguf_tensor(weights_with_outliers(32, 256, seed=i), qtype) for i, qtype in enumerate([Q.Q5_0, Q.Q8_0])]
    assert projection_format(parts) == "int8"
    module = _quantized_projection(parts, "int8", None, torch.device("cpu"))
    assert isinstance(module, Int8Linear) and module.packed_linear.block_scales
    assert torch.equal(module.packed_linear.dequantize(torch.float32), torch.cat([reference(t) for t in parts]))


@needs_kernels
def test_a_q4_k_m_layers_q4_k_and_q6_k_parts_fuse_into_one_exact_super_block_projection():
    from leapllm.loading.weights import _quantized_projection, projection_format

    parts = [GGUFTensor(name, qtype, (64, 256), random_blocks(qtype, 64, 256, seed=i), "synthetic.gguf")
             for i, (name, qtype) in enumerate([("q", Q.Q4_K), ("k", Q.Q4_K), ("v", Q.Q6_K)])]
    assert projection_format(parts) == "super-blocks"
    module = _quantized_projection(parts, "super-blocks", None, torch.device("cpu"))
    assert isinstance(module, SuperBlockLinear)
    # Q6_K's two high bits and sub-blocks of 16 for all, Q4_K's minimums kept (Q6_K's are its scales)
    assert (module.high_bits, module.group, module.packed_mins is not None) == (2, 16, True)
    assert torch.equal(module.packed_linear.dequantize(torch.float32), torch.cat([reference(t) for t in parts]))


@needs_kernels
def test_a_k_quant_fused_with_another_type_runs_as_one_exact_int8_sub_block_projection():
    from leapllm.loading.weights import _quantized_projection, projection_format

    parts = [GGUFTensor("gate", Q.Q4_K, (32, 256), random_blocks(Q.Q4_K, 32, 256, seed=1), "synthetic.gguf"),
             gguf_tensor(weights_with_outliers(32, 256, seed=2), Q.Q8_0)]
    assert projection_format(parts) == "int8-16"
    module = _quantized_projection(parts, "int8-16", None, torch.device("cpu"))
    assert isinstance(module, Int8Linear) and module.packed_linear.sub_blocks
    assert torch.equal(module.packed_linear.dequantize(torch.float32), torch.cat([reference(t) for t in parts]))


def stored_parts(types: list[Q], rows: list[int]) -> list[GGUFTensor]:
    """Parts of one projection, the first with llama.cpp's Q/K row order (2 heads) to undo."""
    parts = []
    for i, (qtype, n) in enumerate(zip(types, rows)):
        data = random_blocks(qtype, n, 512, seed=i) if qtype in K_QUANTS else \
            quants.quantize(weights_with_outliers(n, 512, seed=i), qtype)
        parts.append(GGUFTensor(f"part{i}", qtype, (n, 512), data, "synthetic.gguf", 2 if i == 0 else None))
    return parts


@needs_kernels
@pytest.mark.parametrize("types", [[Q.Q4_K], [Q.Q4_K, Q.Q6_K], [Q.Q2_K, Q.Q5_K, Q.Q3_K], [Q.Q6_K, Q.Q4_K, Q.Q2_K],
                                   [Q.Q4_0, Q.Q4_1], [Q.Q8_0], [Q.Q8_0, Q.Q5_0], [Q.Q5_0], [Q.Q5_0, Q.Q5_0, Q.Q5_0]])
def test_projections_packed_from_the_files_rows_are_the_bytes_of_the_decoded_packing(types):
    """The loader packs a projection's parts in C++ straight from the file's block rows (cpu/gguf_blocks.h):
    the very bytes of decoding them in numpy and packing the values, parts that start inside a tile of
    16 rows, unpermuted Q/K rows and K-quants held in a more general form included."""
    from leapllm.loading.weights import _quantized_projection, projection_format

    parts = stored_parts(types, {1: [48], 2: [24, 40], 3: [24, 8, 32]}[len(types)])
    fmt = projection_format(parts)
    module = _quantized_projection(parts, fmt, None, torch.device("cpu"))
    expected = packed_in_python(parts, fmt)
    assert type(module) is type(expected)
    for name in PACKED_BUFFERS:
        a, b = getattr(expected, name, None), getattr(module, name, None)
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), name
    assert torch.equal(module.packed_linear.dequantize(torch.float32), torch.cat([reference(t) for t in parts]))


@needs_kernels
def test_a_q4_0_scale_whose_minimum_overflows_float16_is_a_load_error_naming_the_tensor():
    from leapllm.loading.weights import _quantized_projection

    data = quants.quantize(weights_with_outliers(16, 64), Q.Q4_0)
    data[3, 18:20] = np.array([60000.0], dtype=np.float16).view(np.uint8)  # -8 d overflows float16
    t = GGUFTensor("blk.0.ffn_down.weight", Q.Q4_0, (16, 64), data, "synthetic.gguf")
    with pytest.raises(ModelLoadError, match="blk.0.ffn_down.weight.*Q4_0 scale too large"):
        _quantized_projection([t], "int4", None, torch.device("cpu"))


@needs_kernels
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_K])
def test_every_kernel_type_also_takes_the_int8_sub_block_form_bit_for_bit(qtype):
    t = (GGUFTensor("synthetic", qtype, (32, 256), random_blocks(qtype, 32, 256), "synthetic.gguf")
         if qtype == Q.Q4_K else gguf_tensor(weights_with_outliers(32, 256, seed=7), qtype))
    u, scale, minimum = t.sub_block_parts()
    module = Int8Linear(u, scale, minimum=minimum)
    assert torch.equal(module.packed_linear.dequantize(torch.float32), reference(t))


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q5_1, *K_QUANTS])
def test_the_float_path_dequantizes_every_type_as_the_gguf_package_does(qtype):
    t = GGUFTensor("synthetic", qtype, (32, 512), random_blocks(qtype, 32, 512), "synthetic.gguf")
    assert torch.equal(t.dequantize(), reference(t))


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1, Q.Q6_K, Q.Q4_K])
def test_a_block_quantized_embedding_looks_up_exactly_the_stored_rows(qtype, monkeypatch):
    from leapllm.loading import gguf_tensors

    monkeypatch.setattr(gguf_tensors, "RAW_ROWS_AT_ONCE", 16)  # the table copied in 3 slices
    t = GGUFTensor("token_embd.weight", qtype, (40, 256), random_blocks(qtype, 40, 256, seed=1)
                   if qtype in (Q.Q6_K, Q.Q4_K) else quants.quantize(weights_with_outliers(40, 256), qtype),
                   "synthetic.gguf")
    embedding = BlockQuantizedEmbedding(t.raw_rows(), qtype, 256)
    tokens = torch.tensor([[3, 39, 3], [0, 7, 20]])
    assert torch.equal(embedding(tokens), reference(t)[tokens])


def with_half_at(rows: torch.Tensor, byte: int, bits: int) -> torch.Tensor:
    bad = rows.clone()
    bad.view(-1)[byte:byte + 2] = torch.tensor([bits], dtype=torch.int16).view(torch.uint8)
    return bad


# IQ4_NL is not in F16_SCALE_OFFSETS: its rows are checked by dequantizing them.
@pytest.mark.parametrize("qtype", [*F16_SCALE_OFFSETS, Q.IQ4_NL])
def test_a_nan_or_inf_scale_in_any_block_of_a_quantized_embedding_is_found(qtype):
    rows = torch.from_numpy(random_blocks(qtype, 8, 512, seed=2))
    assert BlockQuantizedEmbedding(rows, qtype, 512).all_finite()
    block_bytes = GGML_QUANT_SIZES[qtype][1]
    for off in F16_SCALE_OFFSETS.get(qtype, (0,)):
        for bits in (0x7E00, -0x400):  # NaN, -Inf (0xFC00)
            bad = BlockQuantizedEmbedding(with_half_at(rows, 11 * block_bytes + off, bits), qtype, 512)
            assert not bad.all_finite(), (qtype.name, off, bits)
            with np.errstate(invalid="ignore"):
                assert not torch.isfinite(bad(torch.arange(8))).all()  # what it would have looked up


@needs_kernels
def test_a_gguf_whose_stored_embedding_has_a_nan_scale_is_refused_at_load(tmp_path, default_gguf_path, tiny_state):
    from gguf import GGUFReader

    path = write_tiny_gguf(tmp_path / "tiny.gguf", default_gguf_path, tiny_state, qtype=Q.Q8_0)
    offset = next(int(t.data_offset) for t in GGUFReader(path).tensors if t.name == "token_embd.weight")
    data = bytearray(path.read_bytes())
    data[offset + 34 * 7:offset + 34 * 7 + 2] = b"\x00\x7e"  # block 7's float16 scale: NaN
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="embed_tokens.rows holds NaN or infinite"):
        load_model(path, device="cpu")


@pytest.fixture(scope="module")
def tiny_state():
    return tiny_hf_state(TINY_VOCAB, bias=False)


def stored_reference(path, name: str) -> torch.Tensor:
    _, tensors, _ = load_gguf(path)
    return tensors[name].dequantize()


@needs_kernels
@pytest.mark.parametrize("qtype", KERNEL_TYPES)
def test_a_quantized_gguf_runs_as_stored_by_default_and_as_floats_on_request(tmp_path, default_gguf_path,
                                                                            tiny_state, qtype):
    path = write_tiny_gguf(tmp_path / f"tiny-{qtype.name}.gguf", default_gguf_path, tiny_state, qtype=qtype)
    quantized, floats = load_model(path, device="cpu"), load_model(path, dtype="float32", device="cpu")
    qmodel, fmodel = quantized.model, floats.model
    layer = qmodel.layers[1]
    assert isinstance(layer.attn.qkv_proj, {Q.Q8_0: Int8Linear, Q.Q5_0: Int5BlockLinear}.get(qtype, Int4Linear))
    assert isinstance(fmodel.layers[1].attn.qkv_proj, nn.Linear)
    # every stored weight is what the gguf package reads from the file, bit for bit (Q/K unpermuted too)
    for module, names in [("layers.1.attn.qkv_proj", [f"layers.1.attn.{x}_proj.weight" for x in "qkv"]),
                          ("layers.1.mlp.down_proj", ["layers.1.mlp.down_proj.weight"]),
                          ("lm_head", ["lm_head.weight"])]:
        expected = torch.cat([stored_reference(path, n) for n in names])
        assert torch.equal(qmodel.get_submodule(module).packed_linear.dequantize(torch.float32), expected)
        assert torch.equal(fmodel.get_submodule(module).weight, expected)  # the float path reads the same values
    assert isinstance(qmodel.embed_tokens, BlockQuantizedEmbedding)  # untied: the file's rows
    tokens = torch.tensor([quantized.tokenizer.encode("Hello world, this is a test.")])
    assert torch.equal(qmodel.embed_tokens(tokens), fmodel.embed_tokens(tokens))
    a, b = qmodel(tokens), fmodel(tokens)
    assert float((a - b).norm() / b.norm()) < 0.05  # only the int8 rounding of activations differs
    kernels = quantized.config.extra["kernels_by_type"]
    kernel = {Q.Q8_0: "leapllm int8 kernels", Q.Q5_0: "leapllm 5-bit kernels, the file's layout"}.get(
        qtype, "leapllm int4 kernels")
    assert kernels[qtype.name] == [kernel, "rows dequantized at lookup"]
    assert floats.config.extra["kernels_by_type"][qtype.name] == ["dequantized to float32"]


@needs_kernels
def test_projections_of_mixed_types_run_as_int8_sub_blocks_and_types_without_kernels_as_floats(
        tmp_path, default_gguf_path, tiny_state):
    path = write_tiny_gguf(tmp_path / "mixed.gguf", default_gguf_path, tiny_state, qtype=Q.Q4_1,
                           qtypes={"blk.0.attn_v.weight": Q.Q8_0, "blk.1.ffn_down.weight": Q.Q5_0,
                                   "blk.1.ffn_up.weight": Q.F16})
    loaded = load_model(path, device="cpu")
    model = loaded.model
    mixed = model.layers[0].attn.qkv_proj  # Q4_1 q/k with a Q8_0 v: one int8 layer, still exact
    assert isinstance(mixed, Int8Linear) and mixed.packed_linear.sub_blocks
    expected = torch.cat([stored_reference(path, f"layers.0.attn.{x}_proj.weight") for x in "qkv"])
    assert torch.equal(mixed.packed_linear.dequantize(torch.float32), expected)
    assert isinstance(model.layers[1].attn.qkv_proj, Int4Linear)
    assert isinstance(model.layers[1].mlp.down_proj, Int5BlockLinear)  # Q5_0
    assert model.layers[1].mlp.down_proj.packed_linear.five_bit
    assert isinstance(model.layers[1].mlp.gate_up_proj, nn.Linear)  # an F16 part: floats
    kernels = loaded.config.extra["kernels_by_type"]
    assert kernels["Q5_0"] == ["leapllm 5-bit kernels, the file's layout"]
    assert kernels["Q8_0"] == ["leapllm int8 kernels, a scale and minimum per 16 weights"]
    assert kernels["F16"] == ["float32"]
    assert "leapllm int4 kernels" in kernels["Q4_1"] and "dequantized to float32" in kernels["Q4_1"]
    tokens = torch.tensor([loaded.tokenizer.encode("Mixed types still run.")])
    assert torch.isfinite(model(tokens)).all()


@needs_kernels
def test_the_default_model_keeps_its_q4_1_weights_and_q8_0_table_once(default_gguf_path):
    loaded = load_model(device="cpu")
    model = loaded.model
    assert all(isinstance(m, Int4Linear) for layer in model.layers
               for m in (layer.attn.qkv_proj, layer.attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj))
    assert isinstance(model.lm_head, Int8Linear) and model.lm_head.packed_linear.block_scales
    assert isinstance(model.embed_tokens, PackedRowsEmbedding) and model.embed_tokens.table is model.lm_head
    stored = {id(t): t.numel() * t.element_size() for t in [*model.buffers(), *model.parameters()]}
    file_bytes = sum(row["bytes"] for row in loaded.config.extra["stored_dtypes"].values())
    assert sum(stored.values()) <= 1.01 * file_bytes  # the file's size: nothing held as float32 but the norms
    table = stored_reference(default_gguf_path, "embed_tokens.weight")
    tokens = torch.tensor([[1, 200, 49151]])
    assert torch.equal(model.embed_tokens(tokens), table[tokens])


@needs_kernels
def test_the_default_models_weights_are_packed_on_one_block_in_the_order_a_step_reads_them(default_gguf_path):
    """So the first fused decode step has nothing to move onto 2 MiB pages (it moved every weight)."""
    from leapllm.kernels.packing import move_to_huge_pages
    from leapllm.model.fused_decode import layer_modules

    model = load_model(device="cpu").model
    modules = [m for layer in model.layers for m in layer_modules(layer)] + [model.lm_head]
    buffers = [getattr(m, n) for m in modules for n in PACKED_BUFFERS if getattr(m, n, None) is not None]
    assert all(cpu_kernels().HugePageBlock.holds(b) for b in buffers)
    pointers = [b.data_ptr() for b in buffers]
    assert pointers == sorted(pointers) and pointers[0] % (2 << 20) == 0
    linears = [m.packed_linear for m in modules]
    move_to_huge_pages(modules)
    assert [b.data_ptr() for b in buffers] == pointers and [m.packed_linear for m in modules] == linears


def test_quantized_linears_lists_a_steps_projections_in_the_order_it_reads_them(default_gguf_path):
    """The one statement of that order: the folder loader and the fused step lay weights out by it."""
    from leapllm.model.fused_decode import layer_modules
    from leapllm.model.quantized.layers import quantized_linears

    model = load_model(device="cpu").model
    step = [m for layer in model.layers for m in layer_modules(layer)] + [model.lm_head]
    assert [getattr(parent, attr) for _, parent, attr in quantized_linears(model)] == step


@needs_kernels
@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q4_K, Q.Q8_0, Q.Q5_0, Q.Q6_K, Q.Q5_K, Q.Q5_1])
def test_a_big_tensor_packed_a_slice_of_rows_at_a_time_is_the_tensor_packed_whole(qtype, monkeypatch):
    """An output head of 150k rows is decoded and packed in slices (bounding the load's peak memory):
    the packed buffers and the layer's outputs are those of packing it whole."""
    from leapllm.loading import weights

    k = 256
    data = random_blocks(qtype, 96, k, seed=3) if qtype in K_QUANTS else \
        quants.quantize(weights_with_outliers(96, k, seed=3), qtype)
    t = GGUFTensor("head", qtype, (96, k), data, "synthetic.gguf")
    whole = packed_module(t)
    monkeypatch.setattr(weights, "PACK_ROWS_AT_ONCE", 32)  # 3 slices of 2 tiles
    sliced = weights._quantized_projection([t], t.kernel_format, None, torch.device("cpu"))
    assert type(sliced) is type(whole)
    for name in PACKED_BUFFERS:
        a, b = getattr(whole, name, None), getattr(sliced, name, None)
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b))
    x = torch.randn(3, k)
    assert torch.equal(sliced(x), whole(x))
    assert torch.equal(sliced.packed_linear.dequantize_rows(torch.arange(96)), reference(t))
