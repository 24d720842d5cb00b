"""A real profile of the default model: every stage timed, the stages add up, the hooks go away."""

from __future__ import annotations

import pytest
import torch

from leapllm.errors import InvalidRequestError
from leapllm.model.config import ModelConfig
from leapllm.model.llama import Transformer
from leapllm.profiling.costs import phase_costs
from leapllm.profiling.profiler import (
    check_run,
    check_sweep,
    profile_model,
    prompt_rows,
)
from leapllm.profiling.stages import (
    LAYER_STAGES,
    MEASURED_STAGES,
    STAGES,
    StageHooks,
    StageRecorder,
    clock_for,
    stage_modules,
)

TINY = ModelConfig(architecture="llama", vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, context_length=64)


def test_every_stage_is_timed_with_positive_time_in_both_phases(small_profile):
    for name in ("prefill", "decode"):
        stages = small_profile["phases"][name]["stages"]
        assert list(stages) == list(STAGES)
        for stage in STAGES:
            assert stages[stage]["seconds"] > 0, (name, stage)


def test_stages_plus_other_add_up_to_the_hooked_total_and_come_near_the_hook_free_one(small_profile):
    """The accounting is exact; the hooked and hook-free times are two timings, which the profiler's
    own check holds to 5% (retrying while they differ more). A test asserting that 5% failed about one
    run in four on a shared 2-core machine whose speed drifts for seconds at a time, so it only bounds
    the gap loosely here: hooks that slowed a step noticeably would still fail it."""
    for name in ("prefill", "decode"):
        phase = small_profile["phases"][name]
        summed = sum(row["seconds"] for row in phase["stages"].values())
        assert summed == pytest.approx(phase["total_s"], rel=1e-9)  # other closes the gap exactly
        assert abs(summed - phase["hook_free_total_s"]) <= 0.2 * phase["hook_free_total_s"], name
        check = phase["check"]
        assert check["tolerance"] == 0.05 and check["ok"] == (check["relative_difference"] <= 0.05), check
        assert sum(row["share"] for row in phase["stages"].values()) == pytest.approx(1.0)


def test_per_layer_entries_cover_all_30_layers_and_add_up(small_profile):
    for name in ("prefill", "decode"):
        phase = small_profile["phases"][name]
        layers = phase["per_layer"]
        assert [entry["layer"] for entry in layers] == list(range(30))
        for entry in layers:
            assert set(entry["seconds"]) == set(LAYER_STAGES)
            assert all(s > 0 for s in entry["seconds"].values()), entry
        for stage in MEASURED_STAGES:
            in_layers = sum(entry["seconds"].get(stage, 0.0) for entry in layers)
            assert in_layers + phase["outside_layers"].get(stage, 0.0) == pytest.approx(
                phase["stages"][stage]["seconds"], rel=1e-9)
        # embedding, the final norm, the output head and sampling run outside the blocks
        assert set(phase["outside_layers"]) == {"embedding", "norm", "lm_head", "sampling"}


def test_the_profile_reports_the_cost_model_and_the_rates(small_profile, llm):
    costs = phase_costs(llm.config, 2, 32, 4, 4)
    for name in ("prefill", "decode"):
        phase = small_profile["phases"][name]
        for stage, cost in costs[name].items():
            row = phase["stages"][stage]
            assert row["flops"] == cost.flops and row["bytes"] == cost.bytes
            assert row["flop_per_s"] == pytest.approx(cost.flops / row["seconds"])
            assert row["peak_bandwidth_fraction"] == pytest.approx(cost.bytes / row["seconds"] / 20e9)
        assert phase["stages"]["other"]["flops"] is None
    assert small_profile["phases"]["prefill"]["tokens"] == 64
    assert small_profile["phases"]["decode"]["steps"] == 4
    # Decode reads each weight for 2 sequences only: far below the stand-in balance of 5 FLOP/byte.
    assert small_profile["phases"]["decode"]["stages"]["gate_up_proj"]["bound"] == "memory"
    assert small_profile["phases"]["prefill"]["stages"]["gate_up_proj"]["bound"] == "compute"


def test_projections_on_the_kernels_tiles_are_held_against_the_int8_ceiling(small_profile, llm):
    """The default model's projections run on the int8-activation tiles; attention runs in float32."""
    from leapllm.profiling.stages import kernel_stage_dtypes

    on_tiles = kernel_stage_dtypes(llm.model)
    stages = small_profile["phases"]["prefill"]["stages"]
    assert stages["attention"]["compute_dtype"] == "float32"
    if on_tiles:
        assert set(on_tiles) >= {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
        assert all(stages[s]["compute_dtype"] == "int8" for s in on_tiles)


def test_hooks_are_removed_after_the_profile(small_profile, llm):
    for module in llm.model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, module


def test_hooks_are_removed_when_the_forward_fails():
    model = Transformer(TINY).eval()
    with pytest.raises(IndexError), StageHooks(model, StageRecorder(clock_for("cpu"))):
        model(torch.tensor([[TINY.vocab_size + 5]]))  # out of the vocabulary
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_stage_modules_are_found_by_type_and_name_with_their_layer():
    model = Transformer(TINY)
    found = [(stage, layer) for stage, layer, _ in stage_modules(model)]
    per_layer = ["norm", "qkv_proj", "rotary", "attention", "o_proj", "norm", "gate_up_proj", "activation",
                 "down_proj"]
    assert found == ([("embedding", -1)] + [(s, 0) for s in per_layer] + [(s, 1) for s in per_layer]
                     + [("norm", -1), ("lm_head", -1)])


def test_a_table_shared_by_the_embedding_and_a_quantized_head_is_found_as_both_stages():
    """A quantized GGUF's tied table (the default model's): the embedding looks tokens up in the
    packed head, which named_modules would report once, under the embedding's name."""
    from dataclasses import replace

    from leapllm.model.quantized.embedding import PackedRowsEmbedding
    from leapllm.model.quantized.int4 import Int4Linear

    model = Transformer(replace(TINY, vocab_size=128))
    model.lm_head = Int4Linear.from_linear(model.lm_head, 32)
    model.embed_tokens = PackedRowsEmbedding(model.lm_head)
    found = [(stage, layer) for stage, layer, _ in stage_modules(model)]
    assert found[0] == ("embedding", -1) and found[-1] == ("lm_head", -1)
    assert [stage for stage, _ in found].count("lm_head") == 1


def test_a_tiny_model_profiles_without_a_real_tokenizer():
    class Bytes:  # bytes folded into the tiny vocabulary (a loaded model's tokenizer always fits it)
        def encode(self, text, add_special_tokens=True):
            return [b % TINY.vocab_size for b in text.encode("utf-8")]

    data = profile_model(Transformer(TINY).eval(), Bytes(), prompt_len=8, gen_len=2, batch=3, warmup=False)
    assert data["phases"]["decode"]["steps"] == 2 and data["machine"] is None
    assert data["phases"]["prefill"]["stages"]["attention"]["bound"] is None


def test_prompts_are_real_text_of_the_exact_length():
    class Bytes:
        def encode(self, text, add_special_tokens=True):
            return list(text.encode("utf-8"))

    rows = prompt_rows(Bytes(), 50, 3)
    assert [len(r) for r in rows] == [50, 50, 50] and rows[0] != rows[1]
    assert "argparse" in bytes(prompt_rows(Bytes(), 3000, 1)[0]).decode("utf-8", "replace")


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_len=0), "prompt_len"), (dict(gen_len=0), "gen_len"), (dict(batch=0), "batch"),
    (dict(prompt_len=60, gen_len=5), "exceeds the model's context"),
])
def test_bad_run_values_are_invalid_requests(kwargs, message):
    values = dict(prompt_len=8, gen_len=4, batch=1) | kwargs
    with pytest.raises(InvalidRequestError, match=message):
        check_run(TINY, **values)


def test_bad_sweep_values_are_invalid_requests():
    with pytest.raises(InvalidRequestError, match="exceeds the model's context"):
        check_sweep(TINY, [16, 128], [1])
    with pytest.raises(InvalidRequestError, match="batch"):
        check_sweep(TINY, [16], [0])


def test_a_fused_int4_decode_step_is_profiled_stage_by_stage_from_the_kernels_clock_marks():
    from leapllm.compression.quantize import quantize_model
    from leapllm.kernels import cpu_kernels

    if cpu_kernels() is None:
        pytest.skip("leapllm CPU kernels unavailable")
    config = ModelConfig(architecture="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, context_length=64)
    model = Transformer(config).eval()
    quantize_model(model, "int4", 32)

    class Bytes:
        def encode(self, text, add_special_tokens=True):
            return [b % config.vocab_size for b in text.encode("utf-8")]

    data = profile_model(model, Bytes(), prompt_len=8, gen_len=3, batch=1)
    assert model.fused_decode is not None  # the decode steps ran fused
    assert model.fused_decode.computes_logits  # the final norm and the head in the same call
    decode = data["phases"]["decode"]["stages"]
    for stage in ("qkv_proj", "attention", "o_proj", "gate_up_proj", "down_proj", "lm_head"):
        assert decode[stage]["seconds"] > 0, stage
    assert model.fused_decode._stage_intervals is None  # recording stops with the hooks


def test_a_mixture_of_experts_profiles_with_its_experts_under_the_mlp_stages():
    from dataclasses import replace

    class Bytes:
        def encode(self, text, add_special_tokens=True):
            return [b % TINY.vocab_size for b in text.encode("utf-8")]

    moe = replace(TINY, num_experts=4, num_experts_per_token=2, expert_intermediate_size=32)
    data = profile_model(Transformer(moe).eval(), Bytes(), prompt_len=8, gen_len=2, batch=1, warmup=False)
    decode = data["phases"]["decode"]["stages"]
    assert decode["gate_up_proj"]["seconds"] > 0 and decode["down_proj"]["seconds"] > 0
    # Per decode step and layer: the gate/up rows of 2 experts of 4, and the router.
    h, width = moe.hidden_size, moe.expert_intermediate_size
    assert decode["gate_up_proj"]["weight_bytes"] == 2 * moe.num_layers * (2 * h * 2 * width * 4 + h * 4 * 4)
