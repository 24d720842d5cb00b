"""`leapllm prune`: exact sparsity, the 2:4 pattern, structured pruning that really shrinks the
matrices (and computes what the unpruned model computes without the removed units), folders that
load, generate, round-trip per-layer shapes and quantize."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from leapllm import LLM
from leapllm.cli.main import main
from leapllm.loading.model_folder import (
    float_tensors,
    read_model_folder,
    save_model_folder,
)
from leapllm.compression.prune import prune_model, shrink_attention, shrink_mlp
from leapllm.engine.sampling import SamplingParams
from leapllm.errors import InvalidRequestError, ModelLoadError
from leapllm.loading.loader import load_model
from leapllm.model.config import ModelConfig
from leapllm.model.sparse import is_2_of_4, use_semi_structured_kernels
from leapllm.model.llama import Transformer
from leapllm.profiling.costs import step_costs
from tests.cli_helpers import assert_one_line_error
from tests.engine_helpers import run_to_completion
from tests.tiny_models import TINY_VOCAB, tiny_hf_state, write_tiny_gguf

TINY_CONFIG = ModelConfig(architecture="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=16, context_length=128)
CALIBRATION_TEXT = ("The printing press spread across Europe within decades. Books became cheaper, literacy rose, "
                    "and scholars could compare identical copies of a text for the first time.\n") * 12


def random_tiny_model(seed: int = 0, config: ModelConfig = TINY_CONFIG) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(config).eval().requires_grad_(False)


def calibration_ids(n: int = 256, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def logits(model: Transformer, seed: int = 2) -> torch.Tensor:
    tokens = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return model(tokens)


def projections(model: Transformer):
    for layer in model.layers:
        yield from (layer.attn.qkv_proj, layer.attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, default_gguf_path):
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", default_gguf_path, tiny_hf_state(TINY_VOCAB))


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIBRATION_TEXT, encoding="utf-8")
    return path


# ---------------------------------------------------------------- unstructured and 2:4

@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_unstructured_pruning_zeroes_exactly_the_fraction_of_every_row(method, sparsity):
    model = random_tiny_model()
    original = [p.weight.clone() for p in projections(model)]
    report = prune_model(model, method, sparsity, calibration_ids() if method == "wanda" else None)
    for linear, before in zip(projections(model), original):
        zeros_per_row = (linear.weight == 0).sum(1)
        assert (zeros_per_row == round(sparsity * linear.in_features)).all()
        kept = linear.weight != 0
        assert torch.equal(linear.weight[kept], before[kept])  # survivors are untouched
        if method == "magnitude":  # every zeroed weight is no larger than any kept one of its row
            largest_removed = torch.where(kept, 0, before.abs()).amax(1)
            smallest_kept = torch.where(kept, before.abs(), float("inf")).amin(1)
            assert (largest_removed <= smallest_kept).all()
    assert report["score"] == ("wanda" if method == "wanda" else "magnitude")
    # The embedding and the head stay dense.
    assert (model.embed_tokens.weight != 0).all() and (model.lm_head.weight != 0).all()


def test_wanda_uses_activations_to_choose_which_weights_go():
    magnitude, wanda = random_tiny_model(), random_tiny_model()
    prune_model(magnitude, "magnitude", 0.5)
    prune_model(wanda, "wanda", 0.5, calibration_ids())
    differs = [not torch.equal(a.weight != 0, b.weight != 0) for a, b in zip(projections(magnitude), projections(wanda))]
    assert any(differs)


@pytest.mark.parametrize("calibrated", [False, True])
def test_2_of_4_keeps_two_of_every_four_consecutive_inputs(calibrated):
    model = random_tiny_model()
    report = prune_model(model, "2:4", None, calibration_ids() if calibrated else None)
    for linear in projections(model):
        groups = (linear.weight != 0).reshape(linear.out_features, -1, 4).sum(-1)
        assert (groups == 2).all() and is_2_of_4(linear.weight)
    assert report["zero_fraction"] == 0.5
    assert not is_2_of_4(model.embed_tokens.weight)
    assert use_semi_structured_kernels(model) == 0  # only on CUDA


# ---------------------------------------------------------------- structured

def test_removing_ffn_channels_equals_zeroing_them():
    model = random_tiny_model()
    masked = random_tiny_model()
    kept = torch.tensor([0, 3, 4, 9, 17, 40, 41, 100, 127])
    shrink_mlp(model.layers[0].mlp, kept)
    removed = torch.ones(128, dtype=torch.bool)
    removed[kept] = False
    masked.layers[0].mlp.down_proj.weight[:, removed] = 0
    assert model.layers[0].mlp.gate_up_proj.weight.shape == (18, 64)
    assert model.layers[0].mlp.down_proj.weight.shape == (64, 9)
    torch.testing.assert_close(logits(model), logits(masked), rtol=1e-5, atol=1e-5)


def test_removing_query_heads_equals_zeroing_their_output():
    model = random_tiny_model()
    masked = random_tiny_model()
    shrink_attention(model.layers[1].attn, [1, 2])  # one head of each kv group (heads 0-1: kv 0, 2-3: kv 1)
    for head in (0, 3):
        masked.layers[1].attn.o_proj.weight[:, head * 16:(head + 1) * 16] = 0
    attn = model.layers[1].attn
    assert attn.num_heads == 2 and not attn.core.grouped
    assert attn.qkv_proj.weight.shape == (2 * 16 + 2 * 2 * 16, 64) and attn.o_proj.weight.shape == (64, 32)
    torch.testing.assert_close(logits(model), logits(masked), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["heads", "ffn"])
def test_a_sparsity_too_small_to_remove_a_unit_leaves_the_model_as_it_was(method):
    model = random_tiny_model()
    before = logits(model)
    report = prune_model(model, method, 0.01, calibration_ids(), multiple_of=32 if method == "ffn" else None)
    assert report["block_parameters_after"] == report["block_parameters_before"]
    assert torch.equal(logits(model), before)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_structured_pruning_shrinks_the_matrices_and_the_config_says_so(allocation):
    model = random_tiny_model()
    calib = calibration_ids()
    prune_model(model, "heads", 0.5, calib, allocation=allocation)
    prune_model(model, "ffn", 0.5, calib, allocation=allocation, multiple_of=32)
    c = model.config
    for i, layer in enumerate(model.layers):
        heads, width = c.heads_in_layer(i), c.intermediate_size_of_layer(i)
        assert layer.attn.num_heads == heads and heads % c.num_kv_heads == 0 and 0 < heads < 4
        assert layer.attn.qkv_proj.weight.shape == (heads * 16 + 64, 64)
        assert layer.mlp.gate_up_proj.weight.shape == (2 * width, 64) and width % 32 == 0 and 0 < width < 128
    # Half the units in all: 4 of 8 head units (2 per layer), 4 of 8 channel units of 32.
    assert sum(c.heads_in_layer(i) for i in range(2)) == 4
    assert sum(c.intermediate_size_of_layer(i) for i in range(2)) == 128
    assert torch.isfinite(logits(model)).all()


def test_structured_pruning_lowers_the_analytic_flops():
    model = random_tiny_model()
    before = step_costs(model.config, 1, 16, 0, 4)
    prune_model(model, "ffn", 0.5, calibration_ids(), multiple_of=32)
    after = step_costs(model.config, 1, 16, 0, 4)
    assert after["down_proj"].flops == before["down_proj"].flops / 2
    assert after["qkv_proj"].flops == before["qkv_proj"].flops


def test_per_layer_sizes_round_trip_through_a_folder(tiny_gguf, tmp_path):
    loaded = load_model(tiny_gguf, "float32", "cpu")
    shrink_mlp(loaded.model.layers[0].mlp, torch.arange(64))
    shrink_attention(loaded.model.layers[1].attn, [0, 2])
    config = replace(loaded.config, layer_intermediate_sizes=(64, 128), layer_num_heads=(4, 2))
    loaded.model.config = config
    save_model_folder(tmp_path / "m", config, loaded.tokenizer, float_tensors(loaded.model), None, [{"method": "test"}])
    again, _, _ = read_model_folder(tmp_path / "m")
    assert again == replace(config, extra={}) and again.layer_intermediate_sizes == (64, 128) and again.layer_num_heads == (4, 2)
    reloaded = load_model(tmp_path / "m", "float32", "cpu")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        torch.testing.assert_close(reloaded.model(ids), loaded.model(ids))
    # Costs follow the layers: layer 1 has half the attention FLOPs of layer 0.
    costs = step_costs(reloaded.config, 1, 8, 0, 4)
    uniform = step_costs(replace(config, layer_intermediate_sizes=None, layer_num_heads=None), 1, 8, 0, 4)
    assert costs["attention"].flops == uniform["attention"].flops * 3 / 4


def test_inconsistent_per_layer_sizes_are_load_errors():
    with pytest.raises(ModelLoadError, match="entries"):
        replace(TINY_CONFIG, layer_intermediate_sizes=(64,)).validate()
    with pytest.raises(ModelLoadError, match="multiples"):
        replace(TINY_CONFIG, layer_num_heads=(4, 3)).validate()
    with pytest.raises(ModelLoadError, match="positive"):
        replace(TINY_CONFIG, layer_intermediate_sizes=(64, 0)).validate()
    assert replace(TINY_CONFIG, layer_num_heads=[4, 2]).layer_num_heads == (4, 2)  # JSON lists become tuples


@pytest.mark.parametrize("method, sparsity, kwargs, message", [
    ("prune", 0.5, {}, "unknown pruning method"),
    ("wanda", 1.0, {}, "between 0 and 1"),
    ("wanda", 0.0, {}, "between 0 and 1"),
    ("ffn", None, {}, "required"),
    ("2:4", 0.3, {}, "0.5"),
    ("wanda", 0.5, {"calibration_ids": None}, "calibration"),
    ("ffn", 0.5, {"multiple_of": 48}, "multiple of 48"),
    ("magnitude", 0.5, {"allocation": "global"}, "heads and ffn"),
    ("heads", 0.5, {"allocation": "everywhere"}, "unknown allocation"),
])
def test_bad_settings_raise_invalid_request(method, sparsity, kwargs, message):
    kwargs = {"calibration_ids": calibration_ids(), **kwargs}
    with pytest.raises(InvalidRequestError, match=message):
        prune_model(random_tiny_model(), method, sparsity, **kwargs)


def test_heads_pruning_needs_query_heads_that_share_a_kv_head():
    model = random_tiny_model(config=replace(TINY_CONFIG, num_kv_heads=4))
    with pytest.raises(InvalidRequestError, match="one query head per kv head"):
        prune_model(model, "heads", 0.5, calibration_ids())


# ---------------------------------------------------------------- folders, through the CLI

@pytest.mark.parametrize("method, extra", [
    ("magnitude", ["--sparsity", "0.5"]),
    ("wanda", ["--sparsity", "0.5"]),
    ("2:4", []),
    ("heads", ["--sparsity", "0.5"]),
    ("ffn", ["--sparsity", "0.5", "--multiple-of", "32"]),
])
def test_every_method_writes_a_folder_that_loads_and_generates(tiny_gguf, calib_file, tmp_path, method, extra):
    calib = [] if method == "magnitude" else ["--calib", str(calib_file)]
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_gguf), "--method", method, *extra, *calib, "-o", str(out)]) == 0
    history = json.loads((out / "leapllm.json").read_text())["history"]
    assert history[-1]["method"] == method and history[-1]["source"] == "tiny.gguf"
    assert history[-1]["calibration"] == (None if method == "magnitude" else str(calib_file))
    llm = LLM(out, dtype="float32", device="cpu")
    result = llm.generate(["Hello"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(result.token_ids) == 4
    original_params = sum(p.numel() for p in load_model(tiny_gguf, "float32", "cpu").model.parameters())
    size = (out / "model.safetensors").stat().st_size
    if method in ("heads", "ffn"):
        assert sum(p.numel() for p in llm.model.parameters()) < original_params
        assert size < 4 * original_params  # float32 tensors
    else:
        assert llm.model.layers[0].mlp.down_proj.weight.eq(0).float().mean() == 0.5


def test_a_pruned_folder_quantizes_and_the_result_loads(tiny_gguf, calib_file, tmp_path):
    pruned, quantized = tmp_path / "ffn", tmp_path / "ffn-int4"
    assert main(["prune", "--model", str(tiny_gguf), "--method", "ffn", "--sparsity", "0.25", "--multiple-of", "32",
                 "--allocation", "global", "--calib", str(calib_file), "-o", str(pruned)]) == 0
    assert main(["quantize", "--model", str(pruned), "--method", "int4", "--group-size", "32",
                 "-o", str(quantized)]) == 0
    llm = LLM(quantized, dtype="float32", device="cpu")
    assert [m["method"] for m in llm.metadata["history"]] == ["ffn", "int4"]
    widths = [layer.mlp.down_proj.in_features for layer in load_model(pruned, "float32", "cpu").model.layers]
    assert sum(widths) == 192 and all(w % 32 == 0 for w in widths)
    result = llm.generate(["Hello"], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    assert len(result.token_ids) == 3


def test_bad_prune_commands_are_one_line_errors(capsys, tiny_gguf, calib_file, tmp_path):
    base = ["prune", "--model", str(tiny_gguf), "-o", str(tmp_path / "out")]
    assert_one_line_error(capsys, base + ["--method", "wanda", "--sparsity", "1.5"], "between 0 and 1")
    assert_one_line_error(capsys, base + ["--method", "wanda", "--sparsity", "0"], "between 0 and 1")
    assert_one_line_error(capsys, base + ["--method", "ffn"], "--sparsity is required")
    assert_one_line_error(capsys, base + ["--method", "2:4", "--sparsity", "0.6"], "0.5")
    assert_one_line_error(capsys, base + ["--method", "wanda", "--sparsity", "0.5", "--calib", str(tmp_path / "none")],
                          "does not exist")
    assert_one_line_error(capsys, base + ["--method", "magnitude", "--sparsity", "0.5", "--calib", str(calib_file)],
                          "no calibration")
    assert_one_line_error(capsys, base + ["--method", "ffn", "--sparsity", "0.5", "--calib", str(calib_file)],
                          "multiple of 128")  # the tiny model's 128 channels are one unit of the default 128
    assert_one_line_error(capsys, base + ["--method", "magnitude", "--sparsity", "0.5", "--multiple-of", "32"],
                          "applies to ffn")
    assert main(["quantize", "--model", str(tiny_gguf), "--method", "int8", "-o", str(tmp_path / "int8")]) == 0
    assert_one_line_error(capsys, ["prune", "--model", str(tmp_path / "int8"), "--method", "magnitude", "--sparsity",
                                   "0.5", "-o", str(tmp_path / "out")], "quantized")
    assert not (tmp_path / "out").exists()


def test_an_unknown_method_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--method", "random", "--sparsity", "0.5", "-o", "x"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


# ---------------------------------------------------------------- the default model

@pytest.mark.slow
def test_ffn_pruning_of_the_default_model_is_smaller_faster_and_still_fluent(llm, tmp_path):
    out = tmp_path / "ffn50"
    assert main(["prune", "--method", "ffn", "--sparsity", "0.5", "--calib-tokens", "1024", "-o", str(out)]) == 0
    pruned = LLM(out, dtype="float32", device="cpu")
    c = pruned.config
    assert c.intermediate_size == 768 and c.layer_intermediate_sizes is None and c.num_heads == 9
    params = sum(p.numel() for p in pruned.model.parameters())
    assert params == 134_515_008 - 30 * 3 * 576 * 768
    # float32 on disk: 4 bytes a parameter, and nothing else of note.
    assert abs((out / "model.safetensors").stat().st_size - 4 * params) < 2**20
    full, half = step_costs(llm.config, 1, 1, 0, 4), step_costs(c, 1, 1, 0, 4)
    assert half["gate_up_proj"].flops == full["gate_up_proj"].flops / 2
    out_text = pruned.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0))[0]
    assert out_text.token_ids


def test_a_model_with_fewer_heads_in_one_layer_serves_through_the_paged_engine(tiny_gguf):
    from leapllm.config import EngineConfig
    from leapllm.engine.llm_engine import LLMEngine

    llm = LLM(tiny_gguf, dtype="float32", device="cpu")
    shrink_attention(llm.model.layers[1].attn, [1, 3])
    llm.model.config = replace(llm.config, layer_num_heads=(4, 2))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompts = ["Hello there", "The printing press"]
    expected = [out.token_ids for out in llm.generate(prompts, params)]
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(num_blocks=64))
    assert run_to_completion(engine, [llm.encode(p) for p in prompts], params) == expected
