"""The analytic cost model against FLOPs and bytes counted by hand for a tiny config."""

from __future__ import annotations

import pytest

from leapllm.model.config import ModelConfig
from leapllm.profiling.costs import Cost, layer_costs, mean_keys_per_query, phase_costs, step_costs

# hidden h = 64, 2 layers, H = 4 heads, K = 2 kv heads, d = 16 (so q = 64, kv = 32), I = 128, V = 100.
TINY = ModelConfig(architecture="llama", vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, context_length=256)
E = 4  # float32
# The step counted below: B = 2 sequences, T = 3 new tokens each, C = 5 cached: N = 6 rows, S = 8 keys.
B, T, C = 2, 3, 5


def test_one_layer_matches_the_hand_count():
    got = layer_costs(TINY, B, T, C, E)
    # (flops, weight bytes, activation bytes, kv bytes)
    hand = {
        # two RMSNorms over 6 rows of 64: 4 * 6 * 64 = 1536 FLOPs each; weight 64 * 4 = 256 B each;
        # in + out 2 * 6 * 64 * 4 = 3072 B each.
        "norm": (2 * 1536, 2 * 256, 2 * 3072, 0),
        # 64 -> 64 + 2 * 32 = 128 outputs: 2 * 6 * 64 * 128 = 98304; weight 64 * 128 * 4 = 32768;
        # in 6 * 64 * 4 = 1536 + out 6 * 128 * 4 = 3072.
        "qkv_proj": (98304, 32768, 4608, 0),
        # q and k: 6 * (64 + 32) = 576 elements, 3 FLOPs each = 1728; read + write 2 * 576 * 4 = 4608,
        # cos + sin 2 * 3 * 16 * 4 = 384.
        "rotary": (1728, 0, 4992, 0),
        # S_eff = 5 + (3 + 1) / 2 = 7; scores 2 * 4 * 3 * 7 = 168; q k^T and p v 2 * 168 * 16 = 5376 each,
        # softmax 5 * 168 = 840: 2 * 5376 + 840 = 11592. Activations: q and out 2 * 6 * 64 * 4 = 3072,
        # new k, v read 2 * 6 * 32 * 4 = 1536. KV: write 2 * 6 * 32 * 4 = 1536, read 2 * 2 * 8 * 32 * 4 = 4096.
        "attention": (11592, 0, 4608, 5632),
        # 64 -> 64: 2 * 6 * 64 * 64 = 49152; weight 16384; in + out (384 + 384) * 4 = 3072.
        "o_proj": (49152, 16384, 3072, 0),
        # 64 -> 256: 2 * 6 * 64 * 256 = 196608; weight 65536; (384 + 1536) * 4 = 7680.
        "gate_up_proj": (196608, 65536, 7680, 0),
        # 6 * 128 outputs, 5 FLOPs each = 3840; read 6 * 256 * 4 = 6144, write 6 * 128 * 4 = 3072.
        "activation": (3840, 0, 9216, 0),
        # 128 -> 64: 2 * 6 * 128 * 64 = 98304; weight 32768; (768 + 384) * 4 = 4608.
        "down_proj": (98304, 32768, 4608, 0),
    }
    assert set(got) == set(hand)
    for stage, (flops, weight, act, kv) in hand.items():
        assert got[stage] == Cost(flops, weight, act, kv), stage


def test_whole_step_adds_embedding_final_norm_head_and_sampling():
    got = step_costs(TINY, B, T, C, E)
    layer = layer_costs(TINY, B, T, C, E)
    # Embedding: 0 FLOPs; 6 rows of 64 gathered (1536 B of weights) and written (1536 B).
    assert got["embedding"] == Cost(0, 1536, 1536, 0)
    # Norms: 2 layers x 2 norms (3072 FLOPs, 512 B weights, 6144 B activations per layer) plus the final
    # norm on the last position only, 2 rows: 4 * 2 * 64 = 512 FLOPs, 256 B weight, 2 * 2 * 64 * 4 = 1024 B.
    assert got["norm"] == Cost(2 * 3072 + 512, 2 * 512 + 256, 2 * 6144 + 1024, 0)
    # Output head on 2 rows (last position): 2 * 2 * 64 * 100 = 25600 FLOPs; weight 64 * 100 * 4 = 25600 B;
    # in 2 * 64 * 4 = 512 + out 2 * 100 * 4 = 800.
    assert got["lm_head"] == Cost(25600, 25600, 1312, 0)
    # Greedy sampling: one comparison per logit, 2 * 100 = 200; reads 2 * 100 float32 logits = 800 B.
    assert got["sampling"] == Cost(200, 0, 800, 0)
    for stage in ("qkv_proj", "rotary", "attention", "o_proj", "gate_up_proj", "activation", "down_proj"):
        assert got[stage] == layer[stage] * 2, stage
    assert got["attention"].flops == 2 * 11592
    assert got["gate_up_proj"].bytes == 2 * (65536 + 7680)


def test_a_head_quantized_otherwise_than_the_projections_is_counted_at_its_own_bytes():
    """`leapllm quantize --method int4 --head int8`: the head's weights at a byte each (plus scales),
    the projections' at 0.625."""
    both = step_costs(TINY, B, T, C, E, weight_e=0.625)
    head8 = step_costs(TINY, B, T, C, E, weight_e=0.625, head_weight_e=1.0)
    assert head8["lm_head"].weight_bytes == 64 * 100 * 1.0 and both["lm_head"].weight_bytes == 64 * 100 * 0.625
    assert all(head8[s] == both[s] for s in both if s != "lm_head")


def test_decode_phase_sums_steps_with_a_growing_cache():
    # prompt 5, 3 decode steps of T = 1 at C = 5, 6, 7: S_eff = S = 6, 7, 8 keys, 21 in all.
    costs = phase_costs(TINY, B, 5, 3, E)
    # attention scores per layer: 2 * 4 * 21 = 168; FLOPs 2 * (2 * 168 * 16) + 5 * 168 = 11592 per layer.
    assert costs["decode"]["attention"].flops == 2 * 11592
    # KV read: 2 (k, v) * 2 batch * 21 keys * 32 * 4 B = 10752; write 3 steps * 2 * 2 * 32 * 4 = 1536; per layer.
    assert costs["decode"]["attention"].kv_bytes == 2 * (10752 + 1536)
    # Weights are read once per step: 3 * 32768 per layer for qkv.
    assert costs["decode"]["qkv_proj"].weight_bytes == 2 * 3 * 32768
    # Prefill: T = 5 on an empty cache, S_eff = (5 + 1) / 2 = 3; scores 2 * 4 * 5 * 3 = 120 per layer.
    assert costs["prefill"]["attention"].flops == 2 * (2 * (2 * 120 * 16) + 5 * 120)


def test_mean_keys_per_query_under_the_causal_mask():
    assert mean_keys_per_query(1, 0) == 1
    assert mean_keys_per_query(4, 0) == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert mean_keys_per_query(2, 10) == pytest.approx((11 + 12) / 2)


def test_attention_bias_adds_one_flop_and_the_bias_bytes_per_output():
    biased = ModelConfig(**{**TINY.to_dict(), "attention_bias": True, "architecture": "qwen2"})
    plain, with_bias = layer_costs(TINY, B, T, C, E)["qkv_proj"], layer_costs(biased, B, T, C, E)["qkv_proj"]
    assert with_bias.flops - plain.flops == 6 * 128
    assert with_bias.weight_bytes - plain.weight_bytes == 128 * 4


def test_bfloat16_halves_the_bytes_but_not_the_flops():
    f32, bf16 = step_costs(TINY, B, T, C, 4), step_costs(TINY, B, T, C, 2)
    for stage in ("qkv_proj", "attention", "down_proj", "lm_head"):
        assert bf16[stage].flops == f32[stage].flops
        assert bf16[stage].bytes * 2 == f32[stage].bytes
