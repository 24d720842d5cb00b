"""`leapllm bench --random-weights SHAPE`: the shapes, the file every system reads, the decode floor,
and transformers' static-cache + torch.compile peer."""

from __future__ import annotations

import pytest
import torch

from leapllm.benchmarking.harness import BenchSettings, resolve
from leapllm.benchmarking.random_weights import SHAPES, Shape, decode_floor, parameter_count, write_random_gguf
from leapllm.errors import InvalidRequestError

TINY_SHAPE = Shape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, tied=False, rope_theta=10000.0,
                   context=256)


def test_each_shape_has_the_real_models_parameter_count_with_its_real_vocabulary():
    real = {"smollm2-135m": (49152, 134_515_008), "llama-1b": (128256, 1_235_814_400),
            "1.7b": (49152, 1_711_376_384), "llama-8b": (128256, 8_030_261_248)}
    assert set(real) == set(SHAPES)
    for name, (vocab, count) in real.items():
        assert parameter_count(SHAPES[name], vocab) == count, name


def test_the_floor_is_every_weight_and_the_cached_keys_and_values_at_the_bandwidth():
    shape = SHAPES["1.7b"]
    floor = decode_floor(shape, 49152, "bfloat16", context=192, bandwidth=3.0e12)
    assert floor["weight_bytes"] == 2 * 1_711_376_384
    assert floor["kv_bytes_per_token"] == 2 * 24 * 32 * 64 * 2  # keys and values, 24 layers of 32 heads x 64
    assert floor["step_bytes"] == floor["weight_bytes"] + 192 * floor["kv_bytes_per_token"]
    assert floor["tokens_per_s"] == pytest.approx(3.0e12 / floor["step_bytes"])
    assert decode_floor(shape, 49152, "float32", 192, 3.0e12)["tokens_per_s"] == pytest.approx(
        floor["tokens_per_s"] / 2)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, default_gguf_path):
    return write_random_gguf(TINY_SHAPE, tmp_path_factory.mktemp("random") / "tiny.gguf", default_gguf_path)


@torch.inference_mode()
def test_the_random_file_is_one_model_to_leapllm_and_transformers(tiny_gguf):
    from transformers import AutoModelForCausalLM

    from leapllm.loading.loader import load_model
    ours = load_model(tiny_gguf, "float32", "cpu")
    assert (ours.config.num_layers, ours.config.hidden_size, ours.config.num_kv_heads) == (2, 64, 2)
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name,
                                               dtype=torch.float32).eval()
    ids = torch.tensor([ours.tokenizer.encode("Once upon a time, in a land far away")])
    assert (ours.model(ids) - ref(ids).logits).abs().max().item() < 1e-4


def test_random_weights_settings_are_checked_before_anything_runs():
    with pytest.raises(InvalidRequestError, match="not both"):
        resolve(BenchSettings(model="x.gguf", random_weights="1.7b", systems="leapllm-float32"))
    with pytest.raises(InvalidRequestError, match="smollm2-135m, llama-1b, 1.7b, llama-8b"):
        resolve(BenchSettings(random_weights="70b", systems="leapllm-float32"))
    plan = resolve(BenchSettings(random_weights="1.7b", systems="leapllm-float32,hfcompile-float32"))
    assert "--random-weights 1.7b" in plan.canonical_command()


@pytest.mark.slow
def test_the_compiled_static_cache_peer_decodes_transformers_greedy_tokens(tiny_gguf):
    from leapllm.benchmarking.systems import make_system

    systems = [make_system(name, tiny_gguf, "cpu", 1, 64) for name in ("hf-float32", "hfcompile-float32")]
    tokens = []
    for system in systems:
        system.import_libraries()
        system.load()
        seconds, rows = system.batched_decode([[1, 2, 3, 4, 5, 6, 7, 8]] * 2, 6)
        assert seconds > 0
        tokens.append(rows)
    assert tokens[1] == tokens[0] and len(tokens[0][0]) == 6
    assert "torch.compile" in systems[1].info()["decode"]


@pytest.mark.slow
def test_bench_on_a_random_weight_shape_reports_each_systems_share_of_the_decode_floor(tmp_path):
    from leapllm.benchmarking.harness import run_bench

    report = run_bench(BenchSettings(random_weights="smollm2-135m", systems="leapllm-float32,hf-float32",
                                     threads=1, prompt_lens="16", decode_tokens=4, decode_prompt_len=16,
                                     chat_decode_tokens=0, batches="none", serve_batches="none", repeats=1),
                       log=lambda message: None)
    assert report["random_weights"] == "smollm2-135m" and report["model"] == "random-smollm2-135m.gguf"
    assert [e["status"] for e in report["systems"]] == ["ok", "ok"]
    floor = report["floor"]
    assert floor["bandwidth_bytes_per_s"] > 1e8
    assert floor["by_dtype"]["float32"]["weight_bytes"] == 4 * 134_515_008
    for name in ("leapllm-float32", "hf-float32"):
        speed = next(e for e in report["systems"] if e["name"] == name)["figures"]["decode"]
        assert floor["decode_fraction_of_floor"][name] == pytest.approx(
            speed / floor["by_dtype"]["float32"]["tokens_per_s"])
    assert report["systems"][1]["greedy_agreement"] == 4
    from leapllm.benchmarking.report import markdown
    text = markdown(report)
    assert "Decode floor of the smollm2-135m shape" in text
    assert "| system | decode b1 tok/s | MB read per step | floor tok/s | of floor |" in text
    assert f"| leapllm-float32 | {report['systems'][0]['figures']['decode']:.1f} | " in text
