"""GGUF loading: tiny files written with the gguf package, and every kind of damaged input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from leapllm.errors import ModelLoadError
from leapllm.loading.gguf_loader import load_gguf
from leapllm.loading.loader import load_model
from tests.kernel_paths import PATHS, take_path
from tests.tiny_models import TINY_VOCAB, tiny_hf_state, write_tiny_gguf

VOCAB = TINY_VOCAB


@pytest.fixture(scope="module")
def tiny_state():
    return tiny_hf_state(VOCAB)


def canonical(hf_name: str) -> str:
    from leapllm.loading.safetensors_loader import canonical_name
    return canonical_name(hf_name)


def test_f32_gguf_round_trips_weights_exactly_undoing_the_qk_permutation(tmp_path, default_gguf_path, tiny_state):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", default_gguf_path, tiny_state)
    config, tensors, _ = load_gguf(path)
    assert (config.architecture, config.num_layers, config.num_heads, config.num_kv_heads) == ("llama", 2, 4, 2)
    assert not config.tie_word_embeddings
    for hf_name, array in tiny_state.items():
        np.testing.assert_array_equal(tensors[canonical(hf_name)].dequantize().numpy(), array, err_msg=hf_name)


def test_qwen2_gguf_keeps_qk_rows_unpermuted_and_loads_qkv_bias(tmp_path, default_gguf_path):
    state = tiny_hf_state(VOCAB, bias=True)
    path = write_tiny_gguf(tmp_path / "qwen.gguf", default_gguf_path, state, arch="qwen2")
    config, tensors, _ = load_gguf(path)
    assert config.attention_bias
    for hf_name, array in state.items():
        np.testing.assert_array_equal(tensors[canonical(hf_name)].dequantize().numpy(), array, err_msg=hf_name)


@pytest.mark.parametrize("qtype,tol", [(Q.F16, 2e-3), (Q.BF16, 2e-2), (Q.Q8_0, 0.01), (Q.Q5_1, 0.05),
                                       (Q.Q5_0, 0.06), (Q.Q4_1, 0.1), (Q.Q4_0, 0.12)])
def test_quantized_gguf_dequantizes_close_to_the_original_weights(tmp_path, default_gguf_path, tiny_state, qtype, tol):
    path = write_tiny_gguf(tmp_path / f"tiny-{qtype.name}.gguf", default_gguf_path, tiny_state, qtype=qtype)
    _, tensors, _ = load_gguf(path)
    for hf_name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        err = np.abs(tensors[canonical(hf_name)].dequantize().numpy() - tiny_state[hf_name]).max()
        assert err < tol, (qtype.name, hf_name, err)


def test_quantized_tiny_model_runs_and_tracks_the_float_model(tmp_path, default_gguf_path, tiny_state):
    f32 = load_model(write_tiny_gguf(tmp_path / "a.gguf", default_gguf_path, tiny_state), "float32", "cpu")
    q8 = load_model(write_tiny_gguf(tmp_path / "b.gguf", default_gguf_path, tiny_state, qtype=Q.Q8_0), "float32", "cpu")
    tokens = torch.tensor([f32.tokenizer.encode("Hello world, this is a test.")])
    a, b = f32.model(tokens), q8.model(tokens)
    assert torch.isfinite(b).all()
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "nope.gguf")


def test_file_that_is_not_gguf_is_rejected_by_its_magic(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 definitely a zip file" * 10)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(bad)


def test_truncated_gguf_names_the_problem(tmp_path, default_gguf_path, tiny_state):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", default_gguf_path, tiny_state)
    data = path.read_bytes()
    for cut in (len(data) - 1000, len(data) // 2, 64, 10):
        truncated = tmp_path / f"cut{cut}.gguf"
        truncated.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match="truncated|corrupt"):
            load_model(truncated)


@pytest.fixture(params=PATHS)
def string_reader(request, monkeypatch):
    """Each way the header's string arrays are read: leapllm's kernels where they build, else Python."""
    from leapllm.loading import gguf_file

    return take_path(request.param, gguf_file, monkeypatch)


def test_a_vocabulary_string_cut_short_or_not_utf8_is_named_not_a_crash(tmp_path, default_gguf_path, tiny_state,
                                                                        string_reader):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", default_gguf_path, tiny_state)
    data = path.read_bytes()
    at = data.index(b"<|im_start|>")  # a token of the vocabulary's string array
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:at + 4])
    with pytest.raises(ModelLoadError, match="truncated or corrupt GGUF file"):
        load_model(cut)
    bad = bytearray(data)
    bad[at] = 0xFF
    path.write_bytes(bytes(bad))
    with pytest.raises(ModelLoadError, match=f"a string that is not UTF-8 at byte {at}"):
        load_model(path)


def test_both_string_readers_read_the_default_models_header_alike(default_gguf_path, monkeypatch):
    from leapllm.kernels import cpu_kernels
    from leapllm.loading import gguf_file

    if cpu_kernels() is None:
        pytest.skip("leapllm's CPU kernels do not build here")
    _, in_cpp = gguf_file.open_gguf(default_gguf_path)
    monkeypatch.setattr(gguf_file, "cpu_kernels", lambda: None)
    _, in_python = gguf_file.open_gguf(default_gguf_path)
    assert in_cpp == in_python and len(in_cpp["tokenizer.ggml.tokens"]) == 49152


def test_corrupt_header_counts_are_an_error_not_a_crash(tmp_path, default_gguf_path, tiny_state):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", default_gguf_path, tiny_state)
    data = bytearray(path.read_bytes())
    data[8:16] = (2**40).to_bytes(8, "little")  # absurd tensor count
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError):
        load_model(path)


def test_unknown_architecture_is_named_in_the_error(tmp_path, default_gguf_path, tiny_state):
    path = write_tiny_gguf(tmp_path / "neox.gguf", default_gguf_path, tiny_state, arch="gptneox")
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gptneox'"):
        load_model(path)


def test_missing_tensor_is_named_in_the_error(tmp_path, default_gguf_path, tiny_state):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", default_gguf_path, tiny_state, drop="blk.1.ffn_up.weight")
    with pytest.raises(ModelLoadError, match=r"missing tensor 'layers\.1\.mlp\.up_proj\.weight'"):
        load_model(path)


def test_wrong_tensor_shape_is_named_in_the_error(tmp_path, default_gguf_path, tiny_state):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", default_gguf_path, tiny_state, reshape="blk.0.attn_v.weight")
    with pytest.raises(ModelLoadError, match=r"layers\.0\.attn\.v_proj\.weight.*has shape \(31, 64\), expected \(32, 64\)"):
        load_model(path)


def test_default_model_config_matches_smollm2_135m(default_gguf_path):
    from leapllm.loading.gguf_file import open_gguf
    from leapllm.loading.gguf_loader import config_from_gguf_metadata

    reader, meta = open_gguf(default_gguf_path)
    config = config_from_gguf_metadata(meta, {t.name for t in reader.tensors})
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert (config.vocab_size, config.context_length, config.rope_theta) == (49152, 8192, 100000.0)
    assert config.tie_word_embeddings


def test_directory_without_config_is_not_mistaken_for_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_a_quantized_gguf_dequantized_on_a_gpu_gets_a_one_line_notice(default_gguf_path):
    from pathlib import Path

    from leapllm.loading.loader import dequantization_notice
    _, tensors, _ = load_gguf(default_gguf_path)
    cuda = torch.device("cuda")
    notice = dequantization_notice(Path(default_gguf_path), tensors, "auto", torch.bfloat16, cuda)
    assert notice == (f"{Path(default_gguf_path).name}: its Q4_1, Q8_0 weights are dequantized to bfloat16 on cuda "
                      "(leapllm runs quantized blocks as stored on CPUs)")
    assert dequantization_notice(Path(default_gguf_path), tensors, "bfloat16", torch.bfloat16, cuda) is None  # asked
    floats = {name: t for name, t in tensors.items() if t.type_name == "F32"}
    assert floats and dequantization_notice(Path(default_gguf_path), floats, "auto", torch.bfloat16, cuda) is None
