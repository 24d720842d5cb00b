"""leapllm's C++ CPU kernels: packed layouts, int4/int8 matmuls on int8 activations, the fused decoder layer."""

from __future__ import annotations

import pytest
import torch

from leapllm.compression.quantize import quantize_model
from leapllm.kernels import cpu_kernels, packing, source_hash, why_unavailable
from leapllm.kernels.packing import (
    move_to_huge_pages,
    pack_int4,
    pack_int8,
    pack_int8_blocks,
    pack_int8_sub_blocks,
    packed_linear,
    separate_large_blocks,
    tile_quads,
    unpack_int4,
    untile_quads,
)
from leapllm.model.config import ModelConfig
from leapllm.model.fused_decode import MAX_TOKENS
from leapllm.model.llama import Transformer
from leapllm.model.quantized.int4 import (
    Int4Linear,
    dequantize_int4_groupwise,
    quantize_int4_groupwise,
)
from leapllm.model.quantized.int5 import Int5BlockLinear
from leapllm.model.quantized.int8 import Int8Linear, quantize_per_channel_int8
from leapllm.model.quantized.super_block import SuperBlockLinear

pytestmark = pytest.mark.usefixtures("built_kernels")  # skips, or fails if a compiler is there (conftest.py)


def relative_error(y, ref):
    return float((y - ref).norm() / ref.norm())


def test_tiles_put_four_features_of_sixteen_rows_in_each_64_byte_vector():
    x = torch.arange(32 * 64).reshape(32, 64)  # value = 64 * row + feature
    quads = tile_quads(x)
    assert quads.shape == (2, 2, 8, 64)
    # tile 1, block 1, quad 2: rows 16..31, features 32 + 8 .. 32 + 11
    assert quads[1, 1, 2, :8].tolist() == [64 * 16 + 40, 64 * 16 + 41, 64 * 16 + 42, 64 * 16 + 43,
                                           64 * 17 + 40, 64 * 17 + 41, 64 * 17 + 42, 64 * 17 + 43]
    assert torch.equal(untile_quads(quads), x)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_packing_keeps_every_weight_scale_and_minimum(group_size):
    w = torch.randn(48, 256)
    q, scale, minimum = quantize_int4_groupwise(w, group_size)
    weight, scales, mins = pack_int4(q, scale, minimum)
    assert weight.shape == (48, 128) and scales.shape == mins.shape == (48, 8)
    assert scales.dtype == mins.dtype == torch.float16
    expected = dequantize_int4_groupwise(q, scale.half().float(), minimum.half().float())
    torch.testing.assert_close(unpack_int4(weight, scales, mins), expected)
    # and the C++ side reads the same numbers back
    dense = packed_linear(weight, scales, mins, None, bits=4).dequantize(torch.float32)
    torch.testing.assert_close(dense, expected)


def test_int8_packing_dequantizes_to_the_per_channel_weights():
    q, scale = quantize_per_channel_int8(torch.randn(32, 96))
    dense = packed_linear(*pack_int8(q, scale), None, None, bits=8).dequantize(torch.float32)
    torch.testing.assert_close(dense, q.float() * scale[:, None])


def int8_blocks_weights(n: int, k: int, seed: int = 0):
    """Random int8 weights with a float16 scale per block of 32 (GGUF's Q8_0 form): (q, scale, dense)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = (torch.rand(n, k // 32, generator=g) * 0.02 + 1e-3).half()
    dense = (q.float().reshape(n, k // 32, 32) * scale.float()[..., None]).reshape(n, k)
    return q, scale, dense


def test_int8_block_packing_dequantizes_every_weight_exactly():
    q, scale, dense = int8_blocks_weights(48, 160)
    weight, scales = pack_int8_blocks(q, scale)
    assert weight.shape == (48, 160) and scales.shape == (48, 5) and scales.dtype == torch.float16
    fast = packed_linear(weight, scales, None, None, bits=8)
    assert fast.block_scales
    assert torch.equal(fast.dequantize(torch.float32), dense)


@pytest.mark.parametrize("bits", [4, 8])
def test_rows_of_a_packed_layer_are_looked_up_exactly_and_out_of_range_rows_refused(bits):
    n, k = 64, 96
    if bits == 4:
        q, scale, minimum = quantize_int4_groupwise(torch.randn(n, k), 32)
        fast = packed_linear(*pack_int4(q, scale, minimum), None, bits=4)
    else:
        q, scale, _ = int8_blocks_weights(n, k)
        fast = packed_linear(*pack_int8_blocks(q, scale), None, None, bits=8)
    dense = fast.dequantize(torch.float32)
    rows = torch.tensor([[0, 63, 17], [17, 5, 40]])
    looked_up = fast.dequantize_rows(rows)
    assert looked_up.shape == (2, 3, k)
    assert torch.equal(looked_up, dense[rows])
    with pytest.raises(RuntimeError, match="out of range"):
        fast.dequantize_rows(torch.tensor([64]))
    with pytest.raises(RuntimeError, match="out of range"):
        fast.dequantize_rows(torch.tensor([-1]))


@pytest.mark.parametrize("rows", [1, 3, 8, 13])
def test_int8_block_matmul_matches_the_dequantized_weights_on_simd_and_portable_tiles(rows):
    torch.manual_seed(0)
    n, k = 80, 224
    q, scale, dense = int8_blocks_weights(n, k, seed=rows)
    x, bias = torch.randn(rows, k), torch.randn(n)
    ref = x @ dense.T + bias
    fast = packed_linear(*pack_int8_blocks(q, scale), None, bias, bits=8)
    y = fast.forward(x)
    assert relative_error(y, ref) < 0.01
    portable = packed_linear(*pack_int8_blocks(q, scale), None, bias, bits=8, simd=False)
    torch.testing.assert_close(portable.forward(x), y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 3, 8, 13])
def test_int4_with_float32_scales_dequantizes_exactly_and_matches_on_simd_and_portable_tiles(rows):
    """GGUF's Q4_K: a sub-block's scale (float16 super-scale x 6-bit scale) needs float32."""
    g = torch.Generator().manual_seed(rows)
    n, k = 48, 256
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scale = torch.rand(n, k // 32, generator=g) * 0.01 + 1e-5  # not float16 values
    minimum = -torch.rand(n, k // 32, generator=g) * 0.1
    dense = dequantize_int4_groupwise(q, scale, minimum)
    packed = pack_int4(q, scale, minimum, torch.float32)
    fast = packed_linear(*packed, None, bits=4)
    assert fast.float_scales and packed[1].dtype == torch.float32
    torch.testing.assert_close(fast.dequantize(torch.float32), dense, rtol=0, atol=1e-7)
    x = torch.randn(rows, k, generator=g)
    y = fast.forward(x)
    assert relative_error(y, x @ dense.T) < 0.01
    torch.testing.assert_close(packed_linear(*packed, None, bits=4, simd=False).forward(x), y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 3, 8, 13])
def test_int8_sub_block_matmul_matches_the_dequantized_weights_on_simd_and_portable_tiles(rows):
    """A float32 scale and minimum per 16 features (GGUF's K-quants): each half of a block of 32 is
    scaled on its own, and the minimum multiplies the half's activation sum."""
    g = torch.Generator().manual_seed(rows)
    n, k = 48, 224
    values = torch.randint(0, 64, (n, k), dtype=torch.uint8, generator=g)
    scale, minimum = torch.rand(n, k // 16, generator=g) * 0.01, -torch.rand(n, k // 16, generator=g) * 0.3
    dense = values.float() * scale.repeat_interleave(16, 1) + minimum.repeat_interleave(16, 1)
    packed = pack_int8_sub_blocks(values, scale, minimum)
    fast = packed_linear(*packed, None, bits=8)
    assert fast.sub_blocks
    torch.testing.assert_close(fast.dequantize(torch.float32), dense, rtol=0, atol=1e-6)
    x = torch.randn(rows, k, generator=g)
    y = fast.forward(x)
    assert relative_error(y, x @ dense.T) < 0.01
    portable = packed_linear(*packed, None, bits=8, simd=False)
    torch.testing.assert_close(portable.forward(x), y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 3, 8, 13])
def test_packed_matmul_matches_the_dequantized_weights_within_activation_rounding(bits, rows):
    """Up to 8 activation rows share one read of a weight tile (13: a full group and a remainder);
    activations are rounded to int8 per block of 32, so ~0.5% error on random data."""
    torch.manual_seed(0)
    n, k = 80, 224
    w, x, bias = torch.randn(n, k), torch.randn(rows, k), torch.randn(n)
    if bits == 4:
        q, scale, minimum = quantize_int4_groupwise(w, 32)
        weight, scales, mins = pack_int4(q, scale, minimum)
        dense = unpack_int4(weight, scales, mins)
    else:
        q, scale = quantize_per_channel_int8(w)
        (weight, scales), mins = pack_int8(q, scale), None
        dense = q.float() * scale[:, None]
    ref = x @ dense.T + bias
    fast = packed_linear(weight, scales, mins, bias, bits=bits)
    y = fast.forward(x)
    assert y.shape == (rows, n)
    assert relative_error(y, ref) < 0.01
    # the portable loops compute the same sums as the VNNI instructions
    portable = packed_linear(weight, scales, mins, bias, bits=bits, simd=False)
    assert not portable.simd
    torch.testing.assert_close(portable.forward(x), y, rtol=1e-4, atol=1e-4)


def test_packed_matmul_rejects_a_wrong_width_and_non_float32_input():
    q, scale = quantize_per_channel_int8(torch.randn(16, 64))
    fast = packed_linear(*pack_int8(q, scale), None, None, bits=8)
    with pytest.raises(RuntimeError, match="expected 64 input features"):
        fast.forward(torch.randn(1, 128))
    with pytest.raises(RuntimeError, match="float32"):
        fast.forward(torch.randn(1, 64, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="multiple of 32"):
        packed_linear(torch.zeros(16, 16, dtype=torch.uint8), torch.zeros(16), None, None, bits=8)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        packed_linear(torch.zeros(8, 32, dtype=torch.uint8), torch.zeros(8), None, None, bits=8)


@pytest.mark.parametrize("layer_type", ["int4", "int8"])
def test_quantized_linear_gives_the_same_result_on_the_dot_kernel_and_the_dequantized_gemm(layer_type, monkeypatch):
    """Where the CPU multiplies bfloat16 natively, many rows go through a GEMM on dequantized weights."""
    monkeypatch.setattr(packing, "tile_row_limit", lambda linear: 32)
    torch.manual_seed(1)
    linear = torch.nn.Linear(256, 96, bias=True)
    layer = Int4Linear.from_linear(linear, 32) if layer_type == "int4" else Int8Linear.from_linear(linear)
    assert layer.packed_linear is not None and "leapllm" in layer.extra_repr()
    x = torch.randn(40, 256)
    many = layer(x)
    few = torch.cat([layer(x[i:i + 2]) for i in range(0, 40, 2)])
    assert relative_error(few, many) < 0.02
    assert relative_error(many, linear(x).detach()) < 0.1


@pytest.mark.parametrize("layer_type", ["int4", "int8"])
def test_many_rows_on_the_tiles_give_the_bits_of_one_row_at_a_time(layer_type, monkeypatch):
    """Where the tiles take every row count, a prefill's rows (chunked by the kernel) are computed
    exactly as a decode step's one row."""
    monkeypatch.setattr(packing, "tile_row_limit", lambda linear: None)
    torch.manual_seed(2)
    linear = torch.nn.Linear(256, 96, bias=True)
    layer = Int4Linear.from_linear(linear, 32) if layer_type == "int4" else Int8Linear.from_linear(linear)
    x = torch.randn(150, 256)
    many = layer(x)
    assert torch.equal(many, torch.cat([layer(x[i:i + 1]) for i in range(150)]))


def test_many_rows_take_the_tiles_where_they_beat_the_cpus_gemm():
    """The tiles take every row count unless the CPU has AMX (or only the portable loops): there a GEMM
    on dequantized weights takes more than 32 rows."""
    int4 = Int4Linear.from_linear(torch.nn.Linear(64, 32), 32).packed_linear
    int8 = Int8Linear.from_linear(torch.nn.Linear(64, 32)).packed_linear
    if packing.gemm_beats_tiles():
        assert packing.tile_row_limit(int4) == packing.tile_row_limit(int8) == packing.DOT_KERNEL_MAX_ROWS
    elif int4.kernel != "portable":
        assert packing.tile_row_limit(int4) is None and packing.tile_row_limit(int8) is None
    assert "tiles" in packing.many_rows_kernel()


def test_the_loaded_kernels_were_built_from_the_sources_here():
    assert cpu_kernels().source_hash == source_hash()


def test_the_fused_steps_phases_are_named_as_the_profilers_stages():
    """The extension names the stages its clock marks separate; the profiler must know them."""
    from leapllm.profiling.stages import LAYER_STAGES, STAGES

    ext = cpu_kernels()
    assert ext.phase_names() == ("qkv_proj", "attention", "o_proj", "gate_up_proj", "down_proj")
    assert set(ext.phase_names()) <= set(LAYER_STAGES)
    assert ext.output_head_phase_name() == "lm_head" and "lm_head" in STAGES


def test_kernels_can_be_switched_off_for_pytorchs_own(monkeypatch):
    monkeypatch.setenv("LEAPLLM_CPU_KERNELS", "0")
    assert cpu_kernels() is None and "LEAPLLM_CPU_KERNELS=0" in why_unavailable()
    layer = Int4Linear.from_linear(torch.nn.Linear(128, 64), 32)
    assert layer.packed_linear is None and "PyTorch int4pack" in layer.extra_repr()
    assert layer(torch.randn(2, 128)).shape == (2, 64)


def small_decoder(seed: int = 0, bias: bool = False, **switches) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(architecture="qwen2" if bias else "llama", vocab_size=320, hidden_size=128,
                         intermediate_size=256, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32,
                         context_length=512, attention_bias=bias, **switches)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0).add_(torch.randn_like(p) * 0.1 if "q_norm" in name or "k_norm" in name else 0)
    return model.eval()


# The family switches the fused step computes itself: Qwen3's q/k norms, Gemma's softmax scale and
# soft cap, Mistral's window (shorter than the prompts below, so it binds).
FUSED_SWITCHES = {
    "qwen3": dict(qk_norm="head"),
    "window": dict(sliding_window=12, sliding_layers=(True, False, True)),
    "scale and soft cap": dict(attention_scale=0.1, attn_logit_softcap=5.0),
}


@pytest.mark.parametrize("switches", list(FUSED_SWITCHES))
@torch.inference_mode()
def test_fused_decode_step_computes_the_family_switches_as_the_module_step(switches):
    model = small_decoder(**FUSED_SWITCHES[switches])
    quantize_model(model, "int8", 32)
    prompt = torch.randint(0, 320, (1, 20))
    logits = {}
    for fused in (False, True):
        model.use_fused_decode, model.fused_decode = fused, None
        cache = model.new_kv_cache(1, 40)
        model(prompt, 0, cache, last_only=True)
        logits[fused] = torch.cat([model(torch.tensor([[t]]), 20 + i, cache) for i, t in enumerate(range(7, 17))])
        assert (model.fused_decode is not None) == fused
    assert relative_error(logits[True][0], logits[False][0]) < 1e-4
    for step in range(10):
        assert relative_error(logits[True][step], logits[False][step]) < 0.05
    # Several tokens in one fused call: the same bits as one at a time (speculative verification), on
    # a float16 cache (whose new keys and values a step reads rounded, as the later steps will) too.
    model.use_fused_decode, model.fused_decode = True, None
    for kv_cache_dtype in ("float32", "float16"):
        one, many = model.new_kv_cache(1, 40, kv_cache_dtype), model.new_kv_cache(1, 40, kv_cache_dtype)
        model(prompt, 0, one, last_only=True)
        model(prompt, 0, many, last_only=True)
        singles = torch.cat([model(torch.tensor([[t]]), 20 + i, one) for i, t in enumerate(range(7, 11))], dim=1)
        assert torch.equal(model(torch.tensor([list(range(7, 11))]), 20, many), singles)
        assert torch.equal(one.k[1], many.k[1]) and torch.equal(one.v[2], many.v[2])


@pytest.mark.parametrize("method,bias,prompt_len", [("int4", False, 20), ("int8", False, 20), ("int4", True, 20),
                                                    ("int4", False, 200)])
@torch.inference_mode()
def test_fused_decode_step_matches_the_module_by_module_step(method, bias, prompt_len):
    """Same kernels, same math; only float rounding differs (the norms sum in another order), which
    can move an activation across an int8 rounding boundary now and then: ~1% on this random model,
    against ~5-40% for the quantization itself."""
    model = small_decoder(bias=bias)
    quantize_model(model, method, 32)
    prompt = torch.randint(0, 320, (1, prompt_len))  # 200: attention split in spans of positions, merged
    caches = {}
    logits = {}
    for fused in (False, True):
        model.use_fused_decode, model.fused_decode = fused, None
        cache = caches[fused] = model.new_kv_cache(1, prompt_len + 20)
        model(prompt, 0, cache, last_only=True)
        steps = []
        for pos in range(prompt_len, prompt_len + 10):
            steps.append(model(torch.tensor([[pos % 320]]), pos, cache))
        logits[fused] = torch.cat(steps)
        assert (model.fused_decode is not None) == fused
    assert relative_error(logits[True][0], logits[False][0]) < 1e-4  # first step: no rounding flip yet
    for step in range(10):
        assert relative_error(logits[True][step], logits[False][step]) < 0.05
    # the fused step wrote the same keys and values into the cache
    for layer in range(3):
        for kv in ("k", "v"):
            fused, modules = (getattr(caches[f], kv)[layer][:, :, :prompt_len + 10] for f in (True, False))
            assert relative_error(fused, modules) < 0.05


@pytest.mark.slow
@torch.inference_mode()
def test_fused_int4_decode_of_the_default_model_is_as_close_to_float32_as_the_module_path(llm):
    """Teacher-forced on the float32 model's greedy tokens: the fused step's logits are as close to
    float32's as the module-by-module int4 step's (both quantize activations to int8 per block of
    32; they differ only where float rounding moves an activation across a rounding boundary)."""
    from leapllm import LLM

    prompt = llm.tokenizer.encode("The three primary colors are")

    def decode_logits(model, tokens):
        cache = model.new_kv_cache(1, 64)
        out = [model(torch.tensor([prompt]), 0, cache, last_only=True)[0, -1]]
        for i, token in enumerate(tokens[:-1]):
            out.append(model(torch.tensor([[token]]), len(prompt) + i, cache)[0, -1])
        return torch.stack(out)

    cache = llm.model.new_kv_cache(1, 64)
    tokens = [int(llm.model(torch.tensor([prompt]), 0, cache, last_only=True)[0, -1].argmax())]
    for i in range(15):
        tokens.append(int(llm.model(torch.tensor([[tokens[-1]]]), len(prompt) + i, cache)[0, -1].argmax()))
    reference = decode_logits(llm.model, tokens)

    quantized = LLM(dtype="float32", device="cpu").model
    quantize_model(quantized, "int4", 32, head_method="int8")
    errors = {}
    for fused in (False, True):
        quantized.use_fused_decode, quantized.fused_decode = fused, None
        logits = decode_logits(quantized, tokens)
        assert (quantized.fused_decode is not None) == fused
        errors[fused] = sum(relative_error(logits[i], reference[i]) for i in range(16)) / 16
        agree = sum(int(logits[i].argmax()) == tokens[i] for i in range(16))
        assert agree >= 14, (fused, agree)
    assert errors[True] < 1.25 * errors[False] + 0.005, errors


@torch.inference_mode()
def test_fused_decode_refuses_a_position_past_the_cache_and_is_rebuilt_after_a_reset():
    model = small_decoder()
    quantize_model(model, "int4", 32)
    cache = model.new_kv_cache(1, 8)
    model(torch.randint(0, 320, (1, 7)), 0, cache)
    model(torch.tensor([[1]]), 7, cache)
    first = model.fused_decode
    assert first is not None
    with pytest.raises(ValueError, match="KV cache holds 8 positions"):
        model(torch.tensor([[1]]), 8, cache)
    model.layers[0].mlp.down_proj = Int4Linear.from_linear(torch.nn.Linear(256, 128), 32)
    model.reset_fused_decode()
    model(torch.tensor([[1]]), 7, cache)
    assert model.fused_decode is not None and model.fused_decode is not first


@torch.inference_mode()
def test_fused_decode_is_not_used_for_float_models_batches_or_prompts_longer_than_8_tokens():
    model = small_decoder()
    cache = model.new_kv_cache(1, 32)
    model(torch.randint(0, 320, (1, 5)), 0, cache)
    model(torch.tensor([[1]]), 5, cache)
    assert model.fused_decode is None  # float weights: nothing to fuse
    quantize_model(model, "int4", 32)
    batch_cache = model.new_kv_cache(2, 16)
    model(torch.randint(0, 320, (2, 5)), 0, batch_cache)
    model(torch.tensor([[1], [2]]), 5, batch_cache)
    assert model.fused_decode is None  # two sequences: the module path
    model(torch.randint(0, 320, (1, MAX_TOKENS + 1)), 0, cache)
    assert model.fused_decode is None  # a 9-token prompt: the module path
    model(torch.randint(0, 320, (1, MAX_TOKENS)), MAX_TOKENS + 1, cache)
    assert model.fused_decode is not None  # 8 tokens of one sequence: fused


def prefilled(model, prompt, max_seq_len, fused: bool):
    """A fresh cache holding the module-by-module prefill of `prompt`, with fused steps on or off."""
    model.use_fused_decode, model.fused_decode = fused, None
    cache = model.new_kv_cache(1, max_seq_len)
    model(prompt, 0, cache, last_only=True)  # > 8 tokens: the module path either way
    return cache


@pytest.mark.parametrize("method,bias", [("int4", False), ("int8", False), ("int4", True)])
@pytest.mark.parametrize("tokens", [2, 5, 8])
@torch.inference_mode()
def test_a_fused_step_of_several_tokens_matches_the_module_by_module_step(method, bias, tokens):
    """T tokens at positions already after cached ones, each attending causally to the cache and
    to this step's earlier tokens: the same logits and the same keys and values as the module path
    (tolerances as for one token above). Over 64 cached positions the attention is split in spans."""
    model = small_decoder(bias=bias)
    quantize_model(model, method, 32)
    prompt_len = 70
    prompt, new = torch.randint(0, 320, (1, prompt_len)), torch.randint(0, 320, (1, 2 * tokens))
    caches, logits = {}, {}
    for fused in (False, True):
        cache = caches[fused] = prefilled(model, prompt, prompt_len + 2 * tokens + 4, fused)
        # two steps of T tokens: the second one reads keys the first one wrote
        logits[fused] = torch.cat([model(new[:, :tokens], prompt_len, cache),
                                   model(new[:, tokens:], prompt_len + tokens, cache)], dim=1)
        assert logits[fused].shape == (1, 2 * tokens, 320) and logits[fused].dtype == torch.float32
        assert (model.fused_decode is not None) == fused
    # No tighter bound for the first row than for the others: with T rows the norms and attention
    # round differently from the module path's batched ops, which can move an activation across an
    # int8 rounding boundary already in the first layer (~1% on this random model, as above).
    for t in range(2 * tokens):
        assert relative_error(logits[True][0, t], logits[False][0, t]) < 0.05
    for layer in range(3):
        for kv in ("k", "v"):
            fused, modules = (getattr(caches[f], kv)[layer][:, :, :prompt_len + 2 * tokens] for f in (True, False))
            assert relative_error(fused, modules) < 0.05
            # nothing written past this step's positions
            assert not getattr(caches[True], kv)[layer][:, :, prompt_len + 2 * tokens:].any()


@pytest.mark.parametrize("method", ["int4", "int8"])
@torch.inference_mode()
def test_a_fused_step_of_several_tokens_equals_that_many_single_token_steps(method):
    """What speculative decoding relies on: verifying T tokens in one step gives the logits (and the
    greedy choices) that decoding them one at a time would have."""
    model = small_decoder(seed=1)
    quantize_model(model, method, 32)
    prompt_len = 30
    prompt, new = torch.randint(0, 320, (1, prompt_len)), torch.randint(0, 320, (1, MAX_TOKENS))
    one_at_a_time = prefilled(model, prompt, 64, fused=True)
    singles = torch.cat([model(new[:, t:t + 1], prompt_len + t, one_at_a_time) for t in range(MAX_TOKENS)], dim=1)
    for tokens in (2, 3, MAX_TOKENS):
        cache = prefilled(model, prompt, 64, fused=True)
        many = model(new[:, :tokens], prompt_len, cache)
        assert model.fused_decode is not None
        for t in range(tokens):
            assert relative_error(many[0, t], singles[0, t]) < 0.02, (tokens, t)
        assert torch.equal(many[0].argmax(-1), singles[0, :tokens].argmax(-1))
        last = model(new[:, :tokens], prompt_len, cache, last_only=True)  # the same positions again
        assert last.shape == (1, 1, 320)
        torch.testing.assert_close(last[0, 0], many[0, -1])
        for layer in range(3):
            torch.testing.assert_close(cache.k[layer][:, :, :prompt_len + tokens],
                                       one_at_a_time.k[layer][:, :, :prompt_len + tokens], rtol=0.02, atol=0.02)


@torch.inference_mode()
def test_a_fused_step_of_several_tokens_refuses_to_write_past_the_cache_end():
    model = small_decoder()
    quantize_model(model, "int4", 32)
    cache = model.new_kv_cache(1, 16)
    model(torch.randint(0, 320, (1, 12)), 0, cache)
    model(torch.randint(0, 320, (1, 4)), 12, cache)  # positions 12..15: the last four fit
    assert model.fused_decode is not None
    before = [k.clone() for k in cache.k]
    with pytest.raises(ValueError, match="KV cache holds 16 positions, asked to write up to 17"):
        model(torch.randint(0, 320, (1, 5)), 12, cache)
    assert all(torch.equal(k, b) for k, b in zip(cache.k, before))  # refused before anything is written
    x = torch.zeros(5, 128)  # the C++ call checks too
    with pytest.raises(RuntimeError, match="KV cache holds 16 positions, asked to write up to 17"):
        model.fused_decode.stack.forward(x, cache.k, cache.v, 12)
    with pytest.raises(RuntimeError, match="1 to 8 tokens"):
        model.fused_decode.stack.forward(torch.zeros(9, 128), cache.k, cache.v, 0)


@pytest.mark.parametrize("method", ["int4", "int8"])
@torch.inference_mode()
def test_a_fused_step_gives_the_same_bits_on_any_number_of_threads(method):
    """Each thread streams its own range of every phase's items and takes over the others' leftovers:
    whichever thread computes an item, it computes it the same way, so 1, 2 or 3 threads (the step
    cut into other ranges) give bit-identical logits and caches, one token or several."""
    model = small_decoder(seed=2)
    quantize_model(model, method, 32)
    prompt_len = 150  # two attention spans per kv head, whatever the thread count
    prefill = prefilled(model, torch.randint(0, 320, (1, prompt_len)), prompt_len + 8, fused=True)
    new = torch.randint(0, 320, (1, 4))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            cache = model.new_kv_cache(1, prompt_len + 8)
            for mine, source in zip(cache.k + cache.v, prefill.k + prefill.v):
                mine.copy_(source)
            logits = torch.cat([model(new[:, :1], prompt_len, cache), model(new[:, 1:], prompt_len + 1, cache)], dim=1)
            results.append((logits, cache))
    finally:
        torch.set_num_threads(threads)
    assert model.fused_decode is not None and model.fused_decode.computes_logits
    for logits, cache in results[1:]:
        assert torch.equal(logits, results[0][0])
        assert all(torch.equal(a, b) for a, b in zip(cache.k + cache.v, results[0][1].k + results[0][1].v))


def test_tensors_copied_into_huge_pages_keep_their_values_and_outlive_the_originals():
    import gc

    torch.manual_seed(0)
    tensors = [torch.randint(0, 256, (1000,), dtype=torch.uint8), torch.randn(3, 5).half(), torch.randn(7)]
    copies = cpu_kernels().copy_into_huge_pages(tensors)
    for t, c in zip(tensors, copies):
        assert c.dtype == t.dtype and c.shape == t.shape and torch.equal(c, t)
        assert c.data_ptr() != t.data_ptr() and c.data_ptr() % 64 == 0
    expected = [t.clone() for t in tensors]
    copies[2].zero_()  # a copy of its own: the original is untouched
    assert torch.equal(tensors[2], expected[2])
    del tensors
    gc.collect()
    assert torch.equal(copies[0], expected[0]) and torch.equal(copies[1], expected[1])


@torch.inference_mode()
def test_layers_moved_to_huge_pages_compute_what_they_computed_before():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    super_blocks = SuperBlockLinear(torch.randint(0, 64, (32, 256), generator=g, dtype=torch.uint8),
                                    torch.randint(-128, 128, (32, 16), generator=g, dtype=torch.int8), None,
                                    torch.rand(32, 1, generator=g) * 1e-3, torch.rand(32, 1, generator=g) * -0.03,
                                    high_bits=2, group=16)
    five_bit = Int5BlockLinear(torch.randint(0, 32, (16, 64), generator=g, dtype=torch.uint8),
                               (torch.rand(16, 2, generator=g) * 1e-2).half())
    layers = [Int4Linear.from_linear(torch.nn.Linear(64, 48), 32), Int8Linear.from_linear(torch.nn.Linear(96, 32)),
              super_blocks, five_bit]
    inputs = [torch.randn(3, 64), torch.randn(3, 96), torch.randn(3, 256), torch.randn(3, 64)]
    before = [layer(x) for layer, x in zip(layers, inputs)]
    old = [(layer.packed_linear, layer.packed_weight.data_ptr()) for layer in layers]
    move_to_huge_pages(layers)
    for layer, (linear, pointer), x, y in zip(layers, old, inputs, before):
        assert layer.packed_linear is not linear and layer.packed_weight.data_ptr() != pointer
        assert torch.equal(layer(x), y)
    assert "packed_mins" in layers[0].state_dict() and torch.equal(layers[0].state_dict()["packed_weight"],
                                                                   layers[0].packed_weight)


# Head sizes through each of the kernel's vector widths (64, 32 and 8 floats at a time) and its
# scalar loop; a peaked softmax (scores far apart) sends most exps below float32's range.
@pytest.mark.parametrize("hd,peak", [(64, 1.0), (96, 1.0), (40, 1.0), (12, 1.0), (64, 15.0)])
def test_paged_decode_attention_reads_the_pool_in_place_as_sdpa_over_the_gathered_keys(hd, peak):
    """One query token per sequence, grouped-query heads, sequences of different lengths whose slots
    are scattered over the pool (past a sequence's length, its slots are ignored)."""
    import math

    import torch.nn.functional as F

    torch.manual_seed(0)
    heads, kv_heads, pool_rows = 9, 3, 640
    k, v = torch.randn(pool_rows, kv_heads, hd), torch.randn(pool_rows, kv_heads, hd)
    lengths = torch.tensor([37, 30, 20, 1])
    slots = torch.randint(0, pool_rows, (4, 37))
    q = torch.randn(4, heads, hd) * peak
    out = cpu_kernels().paged_decode_attention(q, k, v, slots, lengths, 1 / math.sqrt(hd))
    mask = (torch.arange(37)[None] < lengths[:, None])[:, None, None, :]
    ref = F.scaled_dot_product_attention(q.unsqueeze(2), k[slots].transpose(1, 2), v[slots].transpose(1, 2),
                                         attn_mask=mask, enable_gqa=True).squeeze(2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="outside the pool"):
        cpu_kernels().paged_decode_attention(q, k, v, slots + pool_rows, lengths, 0.125)
    with pytest.raises(RuntimeError, match="outside 1 .. max_len"):
        cpu_kernels().paged_decode_attention(q, k, v, slots, lengths + 1, 0.125)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hd,window", [(64, 0), (96, 0), (40, 0), (12, 0), (64, 7)])
def test_cached_decode_attention_reads_float32_or_float16_caches_as_sdpa_over_the_widened_keys(dtype, hd, window):
    """One query token per row of a contiguous cache (batch, kv_heads, max_seq, hd): positions
    0 .. length - 1 (the last `window` of them with a window), grouped-query heads; a float16 cache
    gives what SDPA gives on its keys and values widened to float32."""
    import math

    import torch.nn.functional as F

    torch.manual_seed(0)
    rows, heads, kv_heads, max_seq, length = 3, 9, 3, 50, 37
    k, v = torch.randn(rows, kv_heads, max_seq, hd).to(dtype), torch.randn(rows, kv_heads, max_seq, hd).to(dtype)
    q = torch.randn(rows, heads, hd)
    out = cpu_kernels().cached_decode_attention(q, k, v, length, window, 1 / math.sqrt(hd))
    first = max(0, length - window) if window else 0
    ref = F.scaled_dot_product_attention(q.unsqueeze(2), k[:, :, first:length].float(), v[:, :, first:length].float(),
                                         enable_gqa=True).squeeze(2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the paged kernel on the same rows laid out as a pool: the same bits
    pool_k, pool_v = (t.transpose(1, 2).reshape(rows * max_seq, kv_heads, hd).contiguous() for t in (k, v))
    slots = torch.arange(rows)[:, None] * max_seq + torch.arange(first, length)[None]
    paged = cpu_kernels().paged_decode_attention(q, pool_k, pool_v, slots, torch.full((rows,), length - first),
                                                 1 / math.sqrt(hd))
    assert torch.equal(paged, out)
    with pytest.raises(RuntimeError, match="length must be"):
        cpu_kernels().cached_decode_attention(q, k, v, max_seq + 1, 0, 0.125)
    with pytest.raises(RuntimeError, match="float32 or float16"):
        cpu_kernels().cached_decode_attention(q, k.bfloat16(), v.bfloat16(), length, 0, 0.125)


@torch.inference_mode()
def test_row_ops_compute_what_the_pytorch_modules_compute():
    """RMSNorm, SiLU(gate) * up and the rotary embedding as one kernel call over every row: PyTorch's
    results to float32 rounding, on widths through the vector loops and their scalar tails; the rotary
    output keeps the (batch, heads, seq, hd) shape over the projections' (batch, seq, heads, hd) memory."""
    import torch.nn.functional as F

    from leapllm.model.llama import rotate_half

    torch.manual_seed(0)
    x, w = torch.randn(3, 5, 77), torch.randn(77)
    torch.testing.assert_close(cpu_kernels().rms_norm_rows(x, w, 1e-5), F.rms_norm(x, (77,), w, 1e-5),
                               rtol=1e-5, atol=1e-6)
    gate_up = torch.randn(2, 7, 2 * 70) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(cpu_kernels().silu_and_mul(gate_up), F.silu(gate) * up, rtol=1e-5, atol=1e-6)
    q = torch.randn(2, 6, 9, 64).transpose(1, 2)  # (batch, heads, seq, hd) over (batch, seq, heads, hd)
    angles = torch.randn(6, 32)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    out = cpu_kernels().rotary_rows(q, cos, sin)
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, q * cos + rotate_half(q) * sin, rtol=1e-5, atol=1e-6)
    odd = torch.randn(1, 3, 4, 64)[..., ::2]  # a strided last dimension (hd 32)
    torch.testing.assert_close(cpu_kernels().rotary_rows(odd, cos[:4, :32], sin[:4, :32]),
                               odd * cos[:4, :32] + rotate_half(odd) * sin[:4, :32], rtol=1e-5, atol=1e-6)


def test_the_modules_keep_pytorch_ops_where_a_gradient_is_wanted():
    """Distillation trains through RMSNorm: with a gradient wanted the module runs PyTorch's ops."""
    from leapllm.model.llama import RMSNorm

    norm = RMSNorm(16, 1e-6)
    x = torch.randn(2, 16, requires_grad=True)
    norm(x).sum().backward()
    assert x.grad is not None and norm.weight.grad is not None


# Shapes through full and partial register tiles (6 rows, 16 keys), query blocks, a window, a chunk
# after cached positions, several batch rows, one token.
PREFILL_SHAPES = {
    "512 tokens, grouped": dict(rows=1, heads=9, kv_heads=3, n=512, start=0, hd=64, window=0),
    "chunk after 20 cached": dict(rows=2, heads=9, kv_heads=3, n=37, start=20, hd=64, window=0),
    "window of 13": dict(rows=3, heads=4, kv_heads=2, n=70, start=5, hd=32, window=13),
    "5 tokens after 100": dict(rows=1, heads=14, kv_heads=2, n=5, start=100, hd=64, window=0),
    "one token, no grouping": dict(rows=1, heads=8, kv_heads=8, n=1, start=0, hd=16, window=0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", list(PREFILL_SHAPES))
def test_cached_prefill_attention_is_causal_sdpa_over_the_widened_cache(dtype, shape):
    """n new tokens per row at positions start .. start + n - 1, each over the cached keys up to its
    own (the last `window`): SDPA's answer, in the (rows, n, heads, hd) layout the output projection reads."""
    import math

    import torch.nn.functional as F

    s = PREFILL_SHAPES[shape]
    torch.manual_seed(0)
    length = s["start"] + s["n"]
    q = torch.randn(s["rows"], s["n"], s["heads"], s["hd"]).transpose(1, 2)  # strided, as the model's
    k, v = (torch.randn(s["rows"], s["kv_heads"], length + 3, s["hd"]).to(dtype) for _ in range(2))
    out = cpu_kernels().cached_prefill_attention(q, k, v, s["start"], s["window"], 1 / math.sqrt(s["hd"]))
    assert out.shape == (s["rows"], s["n"], s["heads"], s["hd"])
    keys, queries = torch.arange(length), torch.arange(s["start"], length)[:, None]
    mask = keys[None] <= queries
    if s["window"]:
        mask &= keys[None] > queries - s["window"]
    ref = F.scaled_dot_product_attention(q, k[:, :, :length].float(), v[:, :, :length].float(), attn_mask=mask,
                                         enable_gqa=True)
    torch.testing.assert_close(out.transpose(1, 2), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="outside a cache"):
        cpu_kernels().cached_prefill_attention(q, k, v, s["start"] + 4, 0, 0.125)  # one past the cache's end


@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
@pytest.mark.parametrize("window", [None, 3])
def test_paged_cache_attention_on_the_kernel_equals_the_gathered_sdpa_path(monkeypatch, window, kv_dtype):
    """PagedKVCache.attend for a step of two decodes and a prefill chunk after cached tokens: the
    decode group read in place by the kernel, or gathered for PyTorch's SDPA, gives the same output,
    over all keys or over a sliding window of 3, from a float32 or a float16 pool."""
    from leapllm.model.attention import AttentionParams
    from leapllm.model.paged_kv_cache import PagedKVCache, build_paged_batch

    torch.manual_seed(1)
    heads, kv_heads, hd, bs = 6, 2, 32, 4
    cache = PagedKVCache(1, 16, bs, kv_heads, hd, torch.float32, "cpu", kv_dtype)
    assert cache.k[0].dtype == getattr(torch, kv_dtype)
    cache.k[0].normal_()
    cache.v[0].normal_()
    assert cache.decode_kernels() is not None
    decodes = [([3, 7, 1], 9), ([5, 2], 6)]  # (block table, position of the new token)
    prefills = [([8, 9], 2, 3)]  # positions 2 .. 4 of a sequence with 2 cached
    batch = build_paged_batch(decodes, prefills, bs, torch.device("cpu"))
    q, k_new, v_new = torch.randn(1, heads, 5, hd), torch.randn(1, kv_heads, 5, hd), torch.randn(1, kv_heads, 5, hd)
    pools = [t.clone() for t in cache.k + cache.v]
    fast = cache.attend(0, q, k_new, v_new, AttentionParams(grouped=True, window=window), batch)
    cache.k[0].copy_(pools[0])
    cache.v[0].copy_(pools[1])
    monkeypatch.setattr(PagedKVCache, "decode_kernels", lambda self: None)
    slow = cache.attend(0, q, k_new, v_new, AttentionParams(grouped=True, window=window), batch)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_a_load_maps_large_blocks_apart_and_then_hands_glibc_its_ceiling_back(monkeypatch):
    """Within separate_large_blocks (a load), glibc gives every block of 1 MiB or more its own memory
    map, returned to the OS when freed; after it, large blocks come from the heap up to 32 MiB."""
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(packing.ctypes, "CDLL", lambda name: FakeLibc())
    with separate_large_blocks():
        assert calls == [(packing.M_MMAP_THRESHOLD, 1 << 20)]
    assert calls[-1] == (packing.M_MMAP_THRESHOLD, 32 << 20)
    with pytest.raises(ValueError), separate_large_blocks():  # an error inside still restores it
        raise ValueError
    assert calls[-1] == (packing.M_MMAP_THRESHOLD, 32 << 20) and len(calls) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_first_nonfinite_names_the_first_tensor_holding_a_nan_or_an_infinity(dtype):
    first_nonfinite = cpu_kernels().first_nonfinite
    torch.manual_seed(0)
    tensors = [torch.randn(n).to(dtype) for n in (5, 1000, 33)]
    largest = torch.full((4,), torch.finfo(dtype).max, dtype=dtype)
    assert first_nonfinite(tensors + [largest, torch.empty(0, dtype=dtype)]) == -1
    for bad in (float("nan"), float("inf"), float("-inf")):
        damaged = [t.clone() for t in tensors]
        damaged[1][777] = bad
        damaged[2][0] = bad
        assert first_nonfinite(damaged) == 1
    transposed = torch.randn(10, 10).to(dtype).t()
    transposed[3, 4] = float("nan")
    assert first_nonfinite([tensors[0], transposed]) == 1


def test_a_huge_page_block_places_tensors_it_knows_and_gives_back_what_it_did_not_use():
    """A load packs its weights straight into a block (packed_weights_block): the block's tensors are
    told apart from others, and the reserve past what the load used goes back."""
    block_type = cpu_kernels().HugePageBlock
    block = block_type(8 << 20)
    a, b = block.empty((3, 5), torch.float16), block.empty((7,), torch.int8)
    assert a.shape == (3, 5) and a.dtype == torch.float16 and b.shape == (7,) and b.dtype == torch.int8
    assert a.data_ptr() % 64 == 0 and b.data_ptr() == a.data_ptr() + 64 and block.used == 128
    assert block_type.holds(a) and block_type.holds(b[2:]) and block_type.holds(block.copy(torch.arange(3)))
    assert not block_type.holds(torch.empty(3)) and not block_type.holds(a.clone())
    block.release_unused()
    assert block.capacity == block.used
    with pytest.raises(RuntimeError, match="more asked"):
        block.empty((1,), torch.uint8)
    a.fill_(1)
    b.fill_(2)
    del block  # every tensor keeps the block alive
    assert float(a.float().sum()) == 15 and int(b.sum()) == 14


RELEASED_SPACE_REUSED = """
import torch
from leapllm.kernels import cpu_kernels
block_type = cpu_kernels().HugePageBlock
MiB = 1 << 20
for _ in range(20):
    a = block_type(256 * MiB)
    x = a.empty((1024,), torch.uint8)
    a.release_unused()  # all but its first 2 MiB page go back
    b = block_type(200 * MiB)  # the kernel is free to place it in what `a` gave back
    y = b.empty((200 * MiB,), torch.uint8)
    del a, x  # `a` is unmapped: only what it kept
    y.fill_(7)
    assert int(y[-1]) == 7
"""


def test_a_block_that_gave_back_its_unused_space_unmaps_only_what_it_kept():
    """The space release_unused gives back may hold another mapping by the time the block is freed
    (a segmentation fault when the block unmapped its whole first reservation); in a subprocess."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", RELEASED_SPACE_REUSED], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def test_a_refused_reservation_leaves_a_loads_weights_in_the_heap(monkeypatch):
    """Where the system commits address space strictly, the 3x reservation may be refused: no block."""
    from types import SimpleNamespace

    from leapllm.kernels import packing

    real = cpu_kernels().HugePageBlock

    class Refused:
        aligned = staticmethod(real.aligned)

        def __init__(self, nbytes):
            raise RuntimeError("out of memory")

    monkeypatch.setattr(packing, "cpu_kernels", lambda: SimpleNamespace(HugePageBlock=Refused))
    assert packing.packed_weights_block(1 << 20, 10) is None
    weight, *_ = packing.packed_outputs("int4", 16, 64, block=None)
    assert weight.shape == (16, 32) and not real.holds(weight)


def test_a_huge_page_block_takes_copies_one_at_a_time_up_to_its_size():
    """move_to_huge_pages copies layer by layer and frees each original after its copy."""
    block_type = cpu_kernels().HugePageBlock
    a, b = torch.arange(10, dtype=torch.int64), torch.randn(3, 5)
    block = block_type(block_type.aligned(a.nbytes) + block_type.aligned(b.nbytes))
    ca = block.copy(a)
    del block  # every copy keeps the block alive
    assert torch.equal(ca, a) and ca.data_ptr() % 64 == 0
    block = block_type(block_type.aligned(a.nbytes))
    block.copy(a)
    with pytest.raises(RuntimeError, match="more asked"):
        block.copy(b)
