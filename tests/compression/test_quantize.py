"""`leapllm quantize`: folders that every `--model` path loads, with the quantized layers inside."""

from __future__ import annotations

import pytest
import torch

from leapllm import LLM
from leapllm.cli.main import main
from leapllm.engine.sampling import SamplingParams
from leapllm.errors import ModelLoadError
from leapllm.kernels import cpu_kernels
from leapllm.loading.model_folder import read_model_folder, save_model_folder
from leapllm.model.quantized.embedding import PackedRowsEmbedding
from leapllm.model.quantized.int4 import Int4Linear, dequantize_int4_groupwise, pack_nibbles, unpack_nibbles
from leapllm.model.quantized.int8 import Int8Linear, quantize_per_channel_int8
from leapllm.model.quantized.layers import quantized_embedding, quantized_module
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
    # The table is held once, as the scaled head: a looked-up row is divided back by the head's factors.
    _, tensors, _ = read_model_folder(awq_folder)
    assert [k for k in tensors if k.startswith("embed_tokens.")] == ["embed_tokens.column_scales"]
    with torch.inference_mode():
        torch.testing.assert_close(awq.model.embed_tokens(torch.arange(8)),
                                   quantized_table(tensors, "int4")[:8] * tensors["embed_tokens.column_scales"],
                                   rtol=1e-6, atol=1e-6)
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
    assert stages[0] == "embedding"  # the head's packed rows, looked up (the head is found once)
    assert stages.count("lm_head") == 1
    assert quantized_weight_bytes(q.model) == pytest.approx(0.5 + 4 / 32)
    float_cost, int4_cost = linear_cost(1, 576, 1536, 4), linear_cost(1, 576, 1536, 4, weight_e=0.625)
    assert int4_cost.weight_bytes == pytest.approx(float_cost.weight_bytes * 0.625 / 4)


def quantized_table(tensors: dict, method: str, name: str = "lm_head") -> torch.Tensor:
    """The float weights a folder's quantized table `name` stands for."""
    if method == "int4":
        return dequantize_int4_groupwise(unpack_nibbles(tensors[f"{name}.qweight"]), tensors[f"{name}.scales"].float(),
                                         tensors[f"{name}.mins"].float())
    return tensors[f"{name}.qweight"].float() * tensors[f"{name}.scales"].float()[:, None]


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_a_tied_table_is_saved_once_as_the_quantized_head_and_looked_up_there(quantized_folders, method):
    """The default model ties its embedding table to its head: the folder holds the table once,
    quantized (a float32 copy was 113 MiB of the int4 folder's 192), and lookups dequantize its rows."""
    _, tensors, _ = read_model_folder(quantized_folders / method)
    assert "embed_tokens.weight" not in tensors
    q = LLM(quantized_folders / method, dtype="float32", device="cpu")
    ids = torch.tensor([[0, 1, 17, 49151]])
    with torch.inference_mode():
        looked_up = q.model.embed_tokens(ids)
    torch.testing.assert_close(looked_up[0], quantized_table(tensors, method)[ids[0]], rtol=1e-6, atol=1e-6)
    if cpu_kernels() is not None:
        assert isinstance(q.model.embed_tokens, PackedRowsEmbedding) and q.model.embed_tokens.table is q.model.lm_head


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_a_head_off_the_kernels_gives_its_table_dequantized_to_floats(method):
    weight = torch.randn(64, 96)
    if method == "int4":
        from leapllm.compression.quantize import quantize_tensors
        parts = quantize_tensors(weight, "int4", 32)
    else:
        q, scale = quantize_per_channel_int8(weight)
        parts = {"qweight": q, "scales": scale}
    table = quantized_table({f"lm_head.{k}": v for k, v in parts.items()}, method)
    floats = quantized_embedding(torch.nn.Linear(96, 64), parts, method, torch.float32, "cpu")  # no packed rows
    assert isinstance(floats, torch.nn.Embedding) and torch.equal(floats.weight, table)
    if cpu_kernels() is not None:
        packed = quantized_embedding(quantized_module(parts, None, method, "cpu"), parts, method, torch.float32, "cpu")
        ids = torch.arange(64)
        torch.testing.assert_close(packed(ids), floats(ids), rtol=1e-6, atol=1e-6)


def test_a_folder_that_saved_the_tied_table_as_floats_still_loads_it(quantized_folders, tmp_path):
    """Folders written before the table was shared hold it as `embed_tokens.weight`: it is used."""
    config, tensors, meta = read_model_folder(quantized_folders / "int4")
    table = torch.randn(config.vocab_size, config.hidden_size)
    tokenizer = Tokenizer.from_pretrained_dir(quantized_folders / "int4")
    save_model_folder(tmp_path / "old", config, tokenizer, tensors | {"embed_tokens.weight": table},
                      meta["quantization"], meta["history"])
    q = LLM(tmp_path / "old", dtype="float32", device="cpu")
    assert isinstance(q.model.embed_tokens, torch.nn.Embedding) and torch.equal(q.model.embed_tokens.weight, table)


def test_a_tied_tables_column_scales_of_the_wrong_shape_are_a_load_error(quantized_folders, tmp_path):
    config, tensors, meta = read_model_folder(quantized_folders / "int4")
    tokenizer = Tokenizer.from_pretrained_dir(quantized_folders / "int4")
    save_model_folder(tmp_path / "bad", config, tokenizer, tensors | {"embed_tokens.column_scales": torch.ones(3)},
                      meta["quantization"], meta["history"])
    with pytest.raises(ModelLoadError, match=r"embed_tokens.column_scales has shape \(3,\), expected \(576,\)"):
        LLM(tmp_path / "bad", dtype="float32", device="cpu")


def test_a_folder_with_an_infinite_factor_is_refused_at_load(quantized_folders, tmp_path):
    """Folders get the finiteness check GGUF files get: a non-finite norm, scale or table factor
    would silence the model."""
    config, tensors, meta = read_model_folder(quantized_folders / "int4")
    tokenizer = Tokenizer.from_pretrained_dir(quantized_folders / "int4")
    factors = torch.ones(config.hidden_size)
    factors[7] = float("inf")
    save_model_folder(tmp_path / "bad", config, tokenizer, tensors | {"embed_tokens.column_scales": factors},
                      meta["quantization"], meta["history"])
    with pytest.raises(ModelLoadError, match="embed_tokens.column_scales holds NaN or infinite values"):
        LLM(tmp_path / "bad", dtype="float32", device="cpu")


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_an_untied_table_is_quantized_on_its_own_and_loads_back(llm, tmp_path, method):
    from leapllm.compression.quantize import quantize_model
    from leapllm.loading.model_folder import load_model_folder
    from leapllm.model.config import ModelConfig
    from leapllm.model.llama import Transformer

    torch.manual_seed(0)
    config = ModelConfig(architecture="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, context_length=64, tie_word_embeddings=False)
    model = Transformer(config).eval()
    tensors = quantize_model(model, method)
    assert "embed_tokens.weight" not in tensors and "embed_tokens.qweight" in tensors
    table = quantized_table(tensors, method, "embed_tokens")
    ids = torch.arange(config.vocab_size)
    with torch.inference_mode():
        torch.testing.assert_close(model.embed_tokens(ids), table, rtol=1e-6, atol=1e-6)
        logits = model(ids[None, :16])
    quantization = {"method": method, "group_size": 32, "head_method": None}
    save_model_folder(tmp_path / "q", config, llm.tokenizer, tensors, quantization, [quantization])
    again, _ = load_model_folder(tmp_path / "q", torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        torch.testing.assert_close(again.embed_tokens(ids), table, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(again(ids[None, :16]), logits)
    _, saved, _ = read_model_folder(tmp_path / "q")
    del saved["embed_tokens.scales"]
    save_model_folder(tmp_path / "broken", config, llm.tokenizer, saved, quantization, [quantization])
    with pytest.raises(ModelLoadError, match="missing quantized tensors of embed_tokens"):
        load_model_folder(tmp_path / "broken", torch.float32, torch.device("cpu"))


@pytest.mark.skipif(cpu_kernels() is None, reason="leapllm's CPU kernels are not built here")
def test_a_folders_packed_weights_are_on_their_block_of_2_mib_pages_once_loaded(quantized_folders):
    """As a GGUF's are: the first decode step then has nothing to move (it took 60-350 ms of it)."""
    from leapllm.model.quantized.layers import quantized_linears

    q = LLM(quantized_folders / "int8", dtype="float32", device="cpu")
    held = cpu_kernels().HugePageBlock.holds
    assert all(held(getattr(parent, attr).packed_weight) for _, parent, attr in quantized_linears(q.model))
    out = q.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 2
