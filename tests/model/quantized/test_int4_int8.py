"""The quantized Linear layers: each matches a float Linear on its dequantized weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leapllm.model.quantized.int4 import Int4Linear, dequantize_int4_groupwise, quantize_int4_groupwise
from leapllm.model.quantized.int8 import Int8Linear, quantize_linears_int8, quantize_per_channel_int8
from leapllm.errors import InvalidRequestError


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_round_to_nearest_error_is_at_most_half_a_step(group_size):
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    q, scale, minimum = quantize_int4_groupwise(w, group_size)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    err = (dequantize_int4_groupwise(q, scale, minimum) - w).abs().reshape(64, -1, group_size)
    assert (err <= scale[..., None] / 2 + 1e-6).all()


@pytest.mark.parametrize("rows", [1, 7, 40])
def test_int4_linear_equals_a_float_linear_on_the_dequantized_weights_up_to_bfloat16(rows):
    torch.manual_seed(0)
    linear = nn.Linear(576, 1536, bias=True)
    q4 = Int4Linear.from_linear(linear, 64)
    deq = dequantize_int4_groupwise(*quantize_int4_groupwise(linear.weight, 64))
    x = torch.randn(2, rows, 576)
    expected = x @ deq.t() + linear.bias
    out = q4(x)
    # PyTorch's kernels take bfloat16 activations and scales (about 3 significant digits); leapllm's
    # round activations to int8 per block of 32 for a few rows (~0.5% on random data) and run a
    # bfloat16 GEMM for many.
    assert out.dtype == x.dtype and ((out - expected).norm() / expected.norm()) < 1e-2


def test_int4_group_size_must_be_supported_and_divide_the_input():
    with pytest.raises(InvalidRequestError, match="one of"):
        Int4Linear.from_linear(nn.Linear(256, 8), 48)
    with pytest.raises(InvalidRequestError, match="does not divide"):
        Int4Linear.from_linear(nn.Linear(96, 8), 64)


@pytest.mark.parametrize("rows", [1, 40])
def test_int8_linear_stays_within_a_percent_of_float(rows):
    torch.manual_seed(0)
    linear = nn.Linear(384, 1536)
    x = torch.randn(rows, 384)
    ref, out = linear(x), Int8Linear.from_linear(linear)(x)
    assert ((out - ref).norm() / ref.norm()) < 0.01


def test_quantize_linears_int8_replaces_every_linear_in_place():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 32)))
    quantize_linears_int8(model)
    assert isinstance(model[0], Int8Linear) and isinstance(model[2][0], Int8Linear)
    assert model(torch.randn(5, 32)).shape == (5, 32)


def test_int8_two_activation_digits_reach_weight_only_accuracy_where_one_digit_does_not(monkeypatch):
    """PyTorch's int8 GEMM path (leapllm's kernels off) quantizes activations per token."""
    monkeypatch.setenv("LEAPLLM_CPU_KERNELS", "0")
    torch.manual_seed(0)
    linear = nn.Linear(576, 512, bias=False)
    x = torch.randn(8, 576)
    x[:, 3] *= 60  # an outlier channel, as in real decoder activations, makes the per-token step coarse
    q, scale = Int8Linear.from_linear(linear).weight_t, Int8Linear.from_linear(linear).weight_scale
    weight_only = x @ (q.float() * scale[:, None]).t()  # int8 weights, exact float activations
    one, two = (Int8Linear.from_linear(linear, digits)(x) for digits in (1, 2))
    err = lambda out: ((out - weight_only).norm() / weight_only.norm()).item()  # noqa: E731
    assert err(two) < 1e-3 and err(two) < err(one) / 50


def test_int8_on_leapllms_kernels_keeps_an_outlier_channel_to_its_own_block():
    """Activation scales per block of 32 values: an outlier coarsens its block only, so the error
    stays far below one per-token digit's (~1% against ~4.6% on this input)."""
    from leapllm.kernels import cpu_kernels

    if cpu_kernels() is None:
        pytest.skip("leapllm CPU kernels unavailable")
    torch.manual_seed(0)
    linear = nn.Linear(576, 512, bias=False)
    x = torch.randn(8, 576)
    x[:, 3] *= 60
    layer = Int8Linear.from_linear(linear)
    assert layer.packed_linear is not None
    q, scale = quantize_per_channel_int8(linear.weight)
    weight_only = x @ (q.float() * scale[:, None]).t()
    assert ((layer(x) - weight_only).norm() / weight_only.norm()).item() < 0.015


def test_int8_activation_digits_must_be_one_or_two():
    with pytest.raises(ValueError, match="1 or 2"):
        Int8Linear.from_linear(nn.Linear(8, 8), 3)


def test_int4_clip_ratio_shrinks_each_groups_range():
    w = torch.linspace(-1, 1, 64).repeat(2, 1)
    _, full_scale, full_min = quantize_int4_groupwise(w, 32)
    _, scale, minimum = quantize_int4_groupwise(w, 32, torch.full((2, 2), 0.5))
    assert torch.allclose(scale, full_scale * 0.5) and torch.allclose(minimum, full_min * 0.5)


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_an_int8_layer_whose_outputs_the_tiles_do_not_divide_runs_on_the_kernels_without_its_padding(rows):
    """A 58,101-token vocabulary is no multiple of the kernels' 16-row tiles: zero rows fill the last
    tile, and the outputs equal those of the same rows inside a layer that needs no padding."""
    from leapllm.kernels import cpu_kernels

    if cpu_kernels() is None:
        pytest.skip("leapllm CPU kernels unavailable")
    torch.manual_seed(0)
    wide = nn.Linear(64, 64, bias=True)
    narrow = nn.Linear(64, 50, bias=True)
    with torch.no_grad():
        narrow.weight.copy_(wide.weight[:50])
        narrow.bias.copy_(wide.bias[:50])
    padded, whole = Int8Linear.from_linear(narrow), Int8Linear.from_linear(wide)
    assert padded.packed_linear is not None and padded.padded_rows == 14
    x = torch.randn(rows, 64)
    out = padded(x)
    assert out.shape == (rows, 50)
    assert torch.equal(out, whole(x)[:, :50])
