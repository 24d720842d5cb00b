"""Hugging Face safetensors folders: tiny random Llama, Mistral and Qwen2 models saved by
transformers itself must give the same logits through leapllm; broken folders give clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from leapllm.errors import ModelLoadError
from leapllm.loading.loader import load_model
from tests.tiny_models import write_tiny_hf_folder


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory, hf_tokenizer):
    root = tmp_path_factory.mktemp("hf")
    return {arch: write_tiny_hf_folder(root / arch, hf_tokenizer, arch) for arch in ("llama", "mistral", "qwen2")}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@torch.inference_mode()
def test_logits_match_transformers_on_its_own_saved_model(tiny_folders, arch):
    import transformers

    folder = tiny_folders[arch]
    ours = load_model(folder, "float32", "cpu")
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert ours.config.architecture == arch
    assert ours.config.attention_bias == (arch == "qwen2")
    ids = ours.tokenizer.encode("Tiny models still run the whole path: 你好 🙂 def f(x): return x")
    a = ours.model(torch.tensor([ids]))
    b = ref(torch.tensor([ids])).logits
    assert (a - b).abs().max().item() < 1e-4


def test_tokenizer_json_is_used_for_safetensors_folders(tiny_folders, hf_tokenizer):
    ours = load_model(tiny_folders["llama"], "float32", "cpu")
    text = "Hello, world! 12345 中文"
    assert ours.tokenizer.encode(text) == hf_tokenizer.encode(text)


def test_missing_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_unknown_model_type_is_named(tmp_path, tiny_folders):
    folder = tmp_path / "m"
    folder.mkdir()
    cfg = json.loads((tiny_folders["llama"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2'"):
        load_model(folder)


def test_invalid_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(tmp_path)


def test_corrupt_safetensors_file(tmp_path, tiny_folders):
    import shutil

    folder = shutil.copytree(tiny_folders["llama"], tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model(folder)


def test_missing_tensor_in_safetensors_is_named(tmp_path, tiny_folders):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(tiny_folders["llama"], tmp_path / "m")
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.self_attn.o_proj.weight"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"missing tensor 'layers\.1\.attn\.o_proj\.weight'"):
        load_model(folder)
