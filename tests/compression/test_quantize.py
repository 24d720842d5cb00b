"""`leapllm quantize`: folders that every `--model` path loads, with the quantized layers inside."""

from __future__ import annotations

import pytest
import torch

from leapllm import LLM
from leapllm.cli.main import main
from leapllm.model.quantized.int4 import Int4Linear, pack_nibbles, unpack_nibbles
from leapllm.model.quantized.int8 import Int8Linear
from leapllm.engine.sampling import SamplingParams
from leapllm.tokenization import Tokenizer
from tests.cli_helpers import assert_one_line_error

PROMPT = "The history of the printing press begins in the fifteenth century, when"


@pytest.fixture(scope="module")
def quantized_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    for method in ("int4", "int8"):
        assert main(["quantize", "--method", method, "-o", str(root / method)]) == 0
    return root


def test_nibble_packing_round_trips():
    q = torch.randint(0, 16, (6, 64), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q)


def test_saved_tokenizer_reads_back_with_the_same_ids_chat_and_stops(llm, tmp_path):
    llm.tokenizer.save_pretrained(tmp_path)
    again = Tokenizer.from_pretrained_dir(tmp_path)
    text = "Hello, world! 你好 🌦️ def f(x): return x"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert again.encode(text) == llm.tokenizer.encode(text)
    assert again.encode_chat(messages) == llm.tokenizer.encode_chat(messages)
    assert again.stop_token_ids == llm.tokenizer.stop_token_ids


@pytest.mark.slow
@pytest.mark.parametrize("method, layer_type", [("int4", Int4Linear), ("int8", Int8Linear)])
def test_quantized_folder_loads_with_quantized_layers_and_stays_close_to_float(llm, quantized_folders, method,
                                                                                layer_type):
    q = LLM(quantized_folders / method, dtype="float32", device="cpu")
    assert isinstance(q.model.layers[0].mlp.gate_up_proj, layer_type) and isinstance(q.model.lm_head, layer_type)
    ids = llm.encode(PROMPT)
    with torch.inference_mode():
        ref = torch.log_softmax(llm.model(torch.tensor([ids])), -1)[0]
        got = torch.log_softmax(q.model(torch.tensor([ids])), -1)[0]
    kl = (ref.exp() * (ref - got)).sum(-1).mean()
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean()
    assert kl < 0.1 and top1 > 0.8, (float(kl), float(top1))
    out = q.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 8 and out.text.strip()
    assert q.metadata["quantization"]["method"] == method


def test_bad_settings_are_one_line_errors(capsys, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert_one_line_error(capsys, ["quantize", "--method", "int4", "-o", str(tmp_path / "taken")], "not an empty")
    assert_one_line_error(capsys, ["quantize", "--method", "int4", "--group-size", "48", "-o", str(tmp_path / "a")],
                          "group size")
    assert_one_line_error(capsys, ["quantize", "--method", "int4", "-o", str(tmp_path / "no" / "x")],
                          "does not exist")
    assert not (tmp_path / "a").exists()


def test_calibration_is_for_int4_and_must_be_a_long_enough_readable_text(capsys, tmp_path):
    out = str(tmp_path / "q")
    assert_one_line_error(capsys, ["quantize", "--method", "int8", "--calib", "builtin:python-docs", "-o", out],
                          "--calib is for --method int4")
    assert_one_line_error(capsys, ["quantize", "--method", "int4", "--calib", str(tmp_path / "none.txt"), "-o", out],
                          "does not exist")
    assert_one_line_error(capsys, ["quantize", "--method", "int4", "--calib", "builtin:python-docs",
                                   "--calib-tokens", "100", "-o", out], "at least 512")
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_the_head_can_be_quantized_apart_from_the_projections(quantized_folders):
    folder = quantized_folders / "int4-int8-head"
    assert main(["quantize", "--method", "int4", "--head", "int8", "-o", str(folder)]) == 0
    q = LLM(folder, dtype="float32", device="cpu")
    assert isinstance(q.model.layers[0].attn.qkv_proj, Int4Linear) and isinstance(q.model.lm_head, Int8Linear)
    assert q.metadata["quantization"]["head_method"] == "int8"
    out = q.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 4


@pytest.mark.slow
def test_activation_aware_int4_beats_round_to_nearest_on_held_out_text(quantized_folders):
    from leapllm.evaluation.perplexity import perplexity
    from leapllm.evaluation.texts import load_text

    awq_folder = quantized_folders / "int4-awq"
    assert main(["quantize", "--method", "int4", "--calib", "builtin:python-docs", "--calib-tokens", "4096",
                 "-o", str(awq_folder)]) == 0
    rtn, awq = (LLM(quantized_folders / name, dtype="float32", device="cpu") for name in ("int4", "int4-awq"))
    assert awq.metadata["quantization"]["algorithm"] == "activation-aware"
    assert [step["method"] for step in awq.metadata["history"]] == ["int4"]
    ids = rtn.tokenizer.encode(load_text("builtin:python-docs-heldout"))[:2048]
    assert perplexity(awq.model, ids).perplexity < perplexity(rtn.model, ids).perplexity


def test_a_folder_missing_its_tensors_is_a_load_error(quantized_folders, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(quantized_folders / "int8", broken)
    (broken / "model.safetensors").write_bytes(b"truncated")
    assert_one_line_error(capsys, ["generate", "hi", "--model", str(broken), "--max-tokens", "2"], "model folder")


@pytest.mark.slow
def test_profiler_times_quantized_projections_and_counts_their_real_bytes(quantized_folders):
    from leapllm.profiling.costs import linear_cost
    from leapllm.profiling.stages import quantized_weight_bytes, stage_modules

    q = LLM(quantized_folders / "int4", dtype="float32", device="cpu")
    stages = [stage for stage, _, _ in stage_modules(q.model)]
    assert stages.count("gate_up_proj") == q.config.num_layers and "lm_head" in stages
    assert quantized_weight_bytes(q.model) == pytest.approx(0.5 + 4 / 32)
    float_cost, int4_cost = linear_cost(1, 576, 1536, 4), linear_cost(1, 576, 1536, 4, weight_e=0.625)
    assert int4_cost.weight_bytes == pytest.approx(float_cost.weight_bytes * 0.625 / 4)
