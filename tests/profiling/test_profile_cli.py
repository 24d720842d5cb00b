"""`leapllm profile`: bad values give one line and exit 2; a small real run writes JSON and HTML."""

from __future__ import annotations

import argparse
import json
import sys

import pytest
import torch

from leapllm.cli import common as cli_common
from leapllm.cli import main as cli_main
from leapllm.cli.profile_cmd import add_profile_parser
from leapllm.errors import LeapLLMError
from leapllm.profiling.machine import INT8_PEAK_METHOD, MachineLimits, default_cache_path, device_name, save_machine


def profile_is_wired() -> bool:
    parser = cli_main.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return "profile" in subparsers.choices


def run(argv: list[str]) -> int:
    """`leapllm.cli.main.main(argv)` once `profile` is wired into it; until then the same error handling
    around a parser that has only the profile command."""
    if profile_is_wired():
        return cli_main.main(argv)
    parser = argparse.ArgumentParser(prog="leapllm")
    add_profile_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LeapLLMError as exc:
        print(f"leapllm: error: {exc}", file=sys.stderr)
        return 2


def assert_one_line_error(capsys, argv, pattern):
    assert run(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("leapllm: error:") and pattern in lines[0], err


@pytest.mark.parametrize("argv, pattern", [
    (["profile", "--prompt-len", "0"], "--prompt-len must be at least 1"),
    (["profile", "--gen-len", "-3"], "--gen-len must be at least 1"),
    (["profile", "--batch", "0"], "--batch must be at least 1"),
    (["profile", "--sweep-batches", "1,x"], "comma-separated integers"),
    (["profile", "--sweep-prompt-lens", "0,128"], "positive integers"),
])
def test_bad_values_print_one_line_and_exit_2(capsys, argv, pattern):
    assert_one_line_error(capsys, argv, pattern)


def test_an_unwritable_output_path_fails_before_the_run(capsys, tmp_path):
    assert_one_line_error(capsys, ["profile", "--json", str(tmp_path / "no" / "such" / "out.json")], "does not exist")
    assert_one_line_error(capsys, ["profile", "--report", str(tmp_path)], "is a folder")


@pytest.mark.slow
def test_a_small_profile_prints_the_table_and_writes_json_and_html(capsys, tmp_path, monkeypatch, llm):
    monkeypatch.setattr(cli_common, "load_llm", lambda args: llm)  # the session's model, not a second load
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # never the user's cache
    # Seed the cache so the run does not spend seconds measuring the machine.
    save_machine(MachineLimits(device="cpu", name=device_name(torch.device("cpu")), threads=torch.get_num_threads(),
                               torch_version=torch.__version__, bandwidth=20e9, flops={"float32": 100e9, "int8": 200e9},
                               int8_method=INT8_PEAK_METHOD),
                 default_cache_path())
    out_json, out_html = tmp_path / "p.json", tmp_path / "p.html"
    code = run(["profile", "--prompt-len", "8", "--gen-len", "2", "--device", "cpu", "--dtype", "float32",
                "--json", str(out_json), "--report", str(out_html)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "output head" in captured.out and "stages + other" in captured.out
    data = json.loads(out_json.read_text())
    assert data["settings"]["prompt_len"] == 8 and data["machine"]["bandwidth"] == 20e9
    assert data["model"]["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert out_html.read_text().count('<img src="data:image/png;base64,') == 2


def test_machine_flag_measures_prints_and_caches_without_loading_a_model(capsys, tmp_path, monkeypatch):
    from leapllm.profiling import machine as machine_mod

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    real = machine_mod.measure_machine
    monkeypatch.setattr(machine_mod, "measure_machine",
                        lambda device, **kw: real(device, bandwidth_bytes=8 << 20, matmul_n=128, repeats=2))
    monkeypatch.setattr(cli_common, "load_llm", lambda args: pytest.fail("--machine loaded a model"))
    assert run(["profile", "--machine", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "float32 matmul" in out and "bandwidth" in out and str(tmp_path) in out
    cached = json.loads((tmp_path / "leapllm" / "machine.json").read_text())
    assert len(cached) == 1 and next(iter(cached.values()))["device"] == "cpu"
