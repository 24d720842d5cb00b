"""`leapllm bench serve`: the load generator's arithmetic, its settings, and one real run."""

from __future__ import annotations

import json

import pytest

from leapllm.benchmarking.serve_load import LevelResult, RequestResult, make_prompts
from leapllm.cli.main import main


def test_prompts_are_distinct_and_exactly_as_long_as_asked():
    text = list(range(1000))
    prompts = make_prompts(text, 10, 37, seed=0)
    assert len(prompts) == 10 and all(len(p) == 37 for p in prompts)
    assert len({tuple(p) for p in prompts}) == 10


def test_level_summary_counts_only_successful_requests_in_throughput_and_latency():
    level = LevelResult("x", 2, [RequestResult(True, 0.1, 1.1, 11), RequestResult(True, 0.3, 2.3, 21),
                                 RequestResult(False, error="HTTP 503")], wall_s=4.0)
    s = level.summary()
    assert s["output_tokens"] == 32 and s["output_tokens_per_s"] == 8.0 and s["failed"] == 1
    assert s["ttft_ms_p50"] == pytest.approx(200.0)
    assert s["tpot_ms_p50"] == pytest.approx(100.0)  # both requests: 1 s per 10 tokens after the first
    assert s["errors"] == ["HTTP 503"]


@pytest.mark.parametrize("argv", [["--concurrency", "0"], ["--concurrency", "a,b"], ["--output-len", "0"],
                                  ["--request-rate", "0"], ["--json", "/nonexistent-dir/x.json"],
                                  ["--structured", "yaml"]])
def test_bad_settings_are_one_line_errors(argv, capsys):
    assert main(["bench", "serve", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("leapllm: error:")


@pytest.mark.slow
def test_bench_serve_runs_levels_against_its_own_server_and_stops_it_cleanly(tmp_path, capsys):
    out = tmp_path / "serve.json"
    md = tmp_path / "serve.md"
    code = main(["bench", "serve", "--concurrency", "1,2", "--num-requests", "2", "--prompt-len", "16",
                 "--output-len", "4", "--structured", "json-schema", "--json", str(out), "--markdown", str(md)])
    assert code == 0
    report = json.loads(out.read_text())
    systems = [(r["system"], r["concurrency"]) for r in report["levels"]]
    assert systems == [("core engine, batch 1", 1), ("leapllm serve", 1), ("leapllm serve, JSON schema", 1),
                       ("leapllm serve", 2), ("leapllm serve, JSON schema", 2)]
    for r in report["levels"]:
        # a constrained request runs to max_tokens too: its schema cannot be complete that soon
        assert r["failed"] == 0 and r["output_tokens"] == 4 * r["requests"]
        assert r["ttft_ms_p50"] > 0 and r["tpot_ms_p50"] > 0
    assert [r["throughput_vs_plain"] > 0 for r in report["levels"] if r["system"].endswith("schema")] == [True] * 2
    assert all(v > 0 for v in report["first_compile"].values())
    assert report["server_exit_code"] == 0  # SIGTERM: a graceful exit
    text = md.read_text()
    assert "| leapllm serve | 2 |" in text and "| leapllm serve, JSON schema | 2 |" in text
    assert "that schema cached" in text
