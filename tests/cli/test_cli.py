"""The `leapllm` command: real runs in a subprocess, and every bad input gives one line + exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from leapllm.cli.main import main
from leapllm.kernels import cpu_kernels
from tests.cli_helpers import assert_one_line_error


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "leapllm", *args], input=stdin, capture_output=True,
                          text=True, timeout=600)


def test_the_parser_is_built_without_importing_torch():
    """`leapllm --help` and argparse's usage errors answer at once: building the parser imports no
    PyTorch (nor numpy)."""
    code = ("import sys; from leapllm.cli.main import build_parser; build_parser(); "
            "print(sorted({'torch', 'numpy'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_console_script_freezes_what_importing_torch_made_and_collects_after(tmp_path):
    code = ("import gc, sys; from leapllm.cli.main import run; "
            "sys.argv = ['leapllm', 'info', '--model', sys.argv[1]]; rc = run(); "
            "print(rc, gc.isenabled(), gc.get_freeze_count())")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "missing.gguf")], capture_output=True,
                            text=True, timeout=600)
    status, enabled, frozen = result.stdout.split()
    assert (status, enabled) == ("2", "True"), result.stderr
    assert int(frozen) > 10_000  # PyTorch's import leaves some hundred thousand objects
    assert result.stderr.count("\n") == 1 and "no such file" in result.stderr


@pytest.mark.slow
def test_generate_streams_a_greedy_completion():
    result = run_cli("generate", "The capital of France is", "--max-tokens", "8", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


@pytest.mark.slow
def test_chat_answers_the_capital_of_france_with_paris_in_float32():
    # The default runs the file's Q4_1 blocks on int8 activations and, like llama.cpp on the same
    # file, answers this prompt with "L'Étoile, ..."; the float32 reference answers Paris.
    result = run_cli("chat", "--temperature", "0", "--dtype", "float32", stdin="What is the capital of France?\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


@pytest.mark.slow
def test_info_reports_the_default_model_facts_as_json():
    result = run_cli("info", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["architecture"], info["layers"], info["heads"], info["kv_heads"]) == ("llama", 30, 9, 3)
    assert (info["vocab_size"], info["context_length"]) == (49152, 8192)
    assert 134_000_000 < info["parameters"] < 136_000_000
    assert set(info["stored_dtypes"]) == {"Q4_1", "Q8_0", "F32"}
    if cpu_kernels() is not None:  # the default: the file's blocks run as stored, nothing else in float32
        assert info["kernels_by_type"] == {"F32": ["float32"], "Q4_1": ["leapllm int4 kernels"],
                                           "Q8_0": ["leapllm int8 kernels"]}
        assert info["memory_bytes_by_dtype"]["float32"] < 2**20
    float_info = json.loads(run_cli("info", "--json", "--dtype", "float32").stdout)
    assert float_info["kernels_by_type"]["Q4_1"] == ["dequantized to float32"]
    assert float_info["parameters"] == info["parameters"]


def test_missing_model_path(capsys, tmp_path):
    assert_one_line_error(capsys, ["generate", "hi", "--model", str(tmp_path / "missing.gguf")], "no such file")


def test_corrupt_model_file(capsys, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 100)
    assert_one_line_error(capsys, ["info", "--model", str(bad)], "corrupt")


def test_folder_that_is_not_a_model(capsys, tmp_path):
    assert_one_line_error(capsys, ["info", "--model", str(tmp_path)], "no config.json")


@pytest.mark.parametrize("flag,value,field", [
    ("--max-tokens", "0", "max_tokens"), ("--max-tokens", "-3", "max_tokens"),
    ("--temperature", "-1", "temperature"), ("--top-p", "0", "top_p"), ("--min-p", "1.5", "min_p"),
])
def test_bad_sampling_values(capsys, flag, value, field):
    assert_one_line_error(capsys, ["generate", "hi", flag, value], field)


def test_bad_thread_count(capsys):
    assert_one_line_error(capsys, ["generate", "hi", "--threads", "0"], "--threads")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu(capsys):
    assert_one_line_error(capsys, ["info", "--device", "cuda"], "no CUDA GPU")


def test_unknown_device(capsys):
    assert_one_line_error(capsys, ["info", "--device", "tpu"], "device")


def test_argparse_usage_errors_also_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "hi", "--dtype", "float64"])
    assert exc.value.code == 2


@pytest.mark.slow
def test_max_tokens_beyond_the_context_is_one_line_and_exit_2(capsys):
    assert_one_line_error(capsys, ["generate", "hi", "--max-tokens", "9000"], "context")


@pytest.mark.slow
def test_generate_with_a_json_schema_file_prints_json_that_matches_it(tmp_path):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
              "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    result = run_cli("generate", "The capital of France as JSON:", "--max-tokens", "30", "--temperature", "0",
                     "--json-schema", str(tmp_path / "schema.json"))
    assert result.returncode == 0, result.stderr
    assert list(json.loads(result.stdout.strip())) == ["city"]


@pytest.mark.parametrize("flags, words", [
    (["--json-schema", "{not json"], "--json-schema"),
    (["--json-schema", '{"type": "nonsense"}'], "nonsense"),
    (["--regex", "(("], "unclosed group"),
    (["--grammar", "start: missing"], "missing"),
])
def test_a_bad_constraint_flag_is_one_line_and_exit_2(capsys, flags, words):
    assert_one_line_error(capsys, ["generate", "hi", "--max-tokens", "4", *flags], words)
