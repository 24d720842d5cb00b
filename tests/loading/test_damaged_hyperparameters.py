"""Damaged model files: every impossible or hostile hyperparameter, and NaN or Inf weights, end in a
ModelLoadError (the CLI's one line and exit 2) before anything is built from them, never in a
traceback, a minute of allocation or a model that prints nothing."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from leapllm.errors import ModelLoadError
from leapllm.loading.gguf_file import open_gguf
from leapllm.loading.gguf_loader import config_from_gguf_metadata
from leapllm.loading.loader import load_model
from leapllm.loading.safetensors_loader import load_safetensors_folder
from tests.cli_helpers import assert_one_line_error
from tests.tiny_models import TINY_VOCAB, tiny_hf_state, write_tiny_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, default_gguf_path):
    return write_tiny_gguf(tmp_path_factory.mktemp("g") / "tiny.gguf", default_gguf_path, tiny_hf_state(TINY_VOCAB))


@pytest.fixture(scope="module")
def tiny_metadata(tiny_gguf):
    contents, metadata = open_gguf(tiny_gguf)
    return metadata, {t.name for t in contents.tensors}


@pytest.mark.parametrize("key, value, words", [
    ("llama.attention.head_count", 0, "num_heads"),
    ("llama.attention.head_count_kv", 0, "num_kv_heads"),
    ("llama.block_count", 2**32 - 1, "num_layers"),
    ("llama.embedding_length", -64, "hidden_size"),
    ("llama.context_length", 2**40, "context_length"),
    ("llama.rope.freq_base", -10000.0, "rope_theta"),
    ("llama.rope.freq_base", float("inf"), "rope_theta"),
    ("llama.attention.layer_norm_rms_epsilon", float("nan"), "rms_norm_eps"),
    ("llama.attention.head_count", "eight", "head_count"),
    ("llama.rope.scaling.type", "linear", "rope.scaling.factor"),  # a scaling type without its factor
])
def test_an_impossible_gguf_hyperparameter_is_a_model_load_error(tiny_metadata, key, value, words):
    metadata, names = tiny_metadata
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match=words):
        config_from_gguf_metadata({**metadata, key: value}, names)
    assert time.monotonic() - start < 5  # refused before anything per layer is built


def write_config(folder, cfg) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))


LLAMA = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 128}


@pytest.mark.parametrize("cfg, words", [
    ([LLAMA], "JSON object"),
    ({**LLAMA, "num_attention_heads": 0}, "num_heads"),
    ({**LLAMA, "num_key_value_heads": -2}, "num_kv_heads"),
    ({**LLAMA, "num_hidden_layers": 10**9}, "num_layers"),
    ({**LLAMA, "rope_scaling": "yarn"}, "rope_scaling / rope_parameters must be an object"),
    ({**LLAMA, "max_position_embeddings": 2**40}, "context_length"),
    ({**LLAMA, "rope_theta": -1.0}, "rope_theta"),
])
def test_an_impossible_config_json_is_a_model_load_error(tmp_path, cfg, words):
    write_config(tmp_path / "m", cfg)
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match=words):
        load_safetensors_folder(tmp_path / "m")
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("tensor, bad, named", [("model.norm.weight", np.nan, "norm.weight"),
                                                ("model.layers.1.input_layernorm.weight", np.inf, "layers.1.attn_norm"),
                                                ("model.embed_tokens.weight", np.nan, "embed_tokens.weight")])
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch"])
def test_nan_or_inf_in_norms_or_embeddings_is_refused_at_load_naming_the_tensor(tmp_path, default_gguf_path, tensor,
                                                                                bad, named, kernels, monkeypatch):
    """Checked by leapllm's kernels in one call where they build, else by PyTorch tensor by tensor."""
    if not kernels:
        from leapllm.loading import loader
        monkeypatch.setattr(loader, "cpu_kernels", lambda: None)
    state = tiny_hf_state(TINY_VOCAB)
    state[tensor] = state[tensor].copy()
    state[tensor].flat[3] = bad
    path = write_tiny_gguf(tmp_path / "bad.gguf", default_gguf_path, state)
    with pytest.raises(ModelLoadError, match=f"tensor {named}.* holds NaN or infinite"):
        load_model(path, "float32", "cpu")


def test_the_cli_reports_a_damaged_file_in_one_line(tmp_path, default_gguf_path, capsys):
    state = tiny_hf_state(TINY_VOCAB)
    state["model.norm.weight"] = np.full_like(state["model.norm.weight"], np.nan)
    path = write_tiny_gguf(tmp_path / "bad.gguf", default_gguf_path, state)
    assert_one_line_error(capsys, ["generate", "hi", "--model", str(path), "--max-tokens", "2"], "NaN or infinite")
