"""Activation-aware int4: the scaling leaves the float model unchanged, and the searches never lose to RTN."""

from __future__ import annotations

import copy

import pytest
import torch

from leapllm.compression.awq import (
    ActivationStats,
    apply_awq,
    fake_quantize,
    search_clip,
    search_scale,
)
from leapllm.compression.quantize import quantize_model
from leapllm.model.config import ModelConfig
from leapllm.model.llama import Transformer


def tiny_transformer(tie: bool = True) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(architecture="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, context_length=256, tie_word_embeddings=tie)
    model = Transformer(config)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data = 1 + 0.3 * torch.rand_like(p)  # norms with some spread, so folding into them shows
        else:
            p.data.normal_(0, 0.1)
    return model.eval().requires_grad_(False)


def outlier_stats(k: int, rows: int = 64) -> ActivationStats:
    torch.manual_seed(1)
    x = torch.randn(rows, k)
    x[:, :4] *= 30  # a few channels with large activations: what AWQ exploits
    return ActivationStats(x.abs().mean(0), x)


def output_error(w, x, wq):
    return (x @ wq.T - x @ w.T).pow(2).sum().item()


def test_scaling_and_folding_leave_the_float_model_output_unchanged():
    model = tiny_transformer()
    before = copy.deepcopy(model)
    tokens = torch.randint(0, 256, (1, 512))
    _, scales = apply_awq(model, tokens[0], group_size=32, seq_len=128)
    with torch.inference_mode():
        assert torch.allclose(model(tokens[:, :64]), before(tokens[:, :64]), atol=1e-4)
    # The tied head got its own scaled copy; the embedding table is untouched.
    assert torch.equal(model.embed_tokens.weight, before.embed_tokens.weight)
    assert model.lm_head.weight is not model.embed_tokens.weight
    # What is returned is what the head's input columns were multiplied by.
    torch.testing.assert_close(model.lm_head.weight, before.embed_tokens.weight * scales["lm_head"])


@pytest.mark.parametrize("head_method", [None, "int8"])
def test_a_tied_table_is_looked_up_in_the_scaled_head_and_divided_back(head_method):
    """A tied model quantized activation-aware keeps one table, the scaled head: a looked-up row is
    multiplied by the inverse factors, so it stands for the original table up to the head's rounding."""
    model = tiny_transformer()
    table = model.embed_tokens.weight.detach().clone()
    tensors = quantize_model(model, "int4", 32, torch.randint(0, 256, (512,)), head_method=head_method)
    assert not any(k.startswith("embed_tokens.") for k in tensors if k != "embed_tokens.column_scales")
    assert tensors["embed_tokens.column_scales"].shape == (64,)
    with torch.inference_mode():
        rows = model.embed_tokens(torch.arange(256))
    error = float((rows - table).norm() / table.norm())
    assert error < (0.01 if head_method == "int8" else 0.1), error  # int8 rows ~0.3%, int4 groups of 32 ~4%


def test_scale_search_is_never_worse_than_round_to_nearest_and_helps_with_outlier_channels():
    torch.manual_seed(0)
    w = torch.randn(96, 128)
    stats = outlier_stats(128)
    s, alpha = search_scale(w, stats, 32)
    rtn = output_error(w, stats.sample, fake_quantize(w, 32))
    awq = output_error(w, stats.sample, fake_quantize(w * s, 32) / s)
    assert alpha > 0 and awq < 0.9 * rtn


def test_clip_search_is_never_worse_than_the_full_range():
    torch.manual_seed(0)
    w = torch.randn(80, 64)
    w[0, 5] = 8.0  # one outlier weight: clipping it pays off for its group
    x = outlier_stats(64).sample
    clip = search_clip(w, x, 32)
    assert clip.shape == (80, 2) and (clip <= 1).all() and (clip < 1).any()
    assert output_error(w, x, fake_quantize(w, 32, clip)) <= output_error(w, x, fake_quantize(w, 32))


def test_calibration_text_must_fill_one_window():
    from leapllm.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="at least 128"):
        apply_awq(tiny_transformer(), torch.randint(0, 256, (100,)), group_size=32, seq_len=128)


def test_fake_quantization_equals_quantize_then_dequantize():
    from leapllm.model.quantized.int4 import dequantize_int4_groupwise, quantize_int4_groupwise

    torch.manual_seed(0)
    w, clip = torch.randn(16, 128), 0.8 + 0.2 * torch.rand(16, 4)
    expected = dequantize_int4_groupwise(*quantize_int4_groupwise(w, 32, clip))
    assert torch.allclose(fake_quantize(w, 32, clip), expected, atol=1e-6)
