"""`leapllm bench`: real tiny runs (one worker process per system) and every failure path.

Each real worker loads the default model (about 5 s here), so the settings are tiny; the crash and
hang tests use stand-in workers (fake_worker.py) that load nothing. No test asserts a speed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import threading
from pathlib import Path

import pytest

from leapllm.benchmarking.harness import (
    DISTINCT_PREFIX,
    BenchSettings,
    compute_ratios,
    open_model_file,
    resolve,
    resolve_systems,
    run_bench,
    serve_prompts,
)
from leapllm.benchmarking.report import markdown
from leapllm.benchmarking.systems import (
    ALL_SYSTEMS,
    QUANTIZED,
    make_system,
    system_engine_dtype,
)
from leapllm.cli.bench_cmd import add_bench_parser, settings_from_args
from leapllm.errors import InvalidRequestError, ModelLoadError

FAKE_WORKER = Path(__file__).with_name("fake_worker.py")
# One thread: on a small machine shared with other work, two threads waiting on each other at every
# barrier can make a tiny run many times slower.
TINY = ["--threads", "1", "--prompt-lens", "16", "--decode-tokens", "4", "--decode-prompt-len", "16", "--batches", "2",
        "--batch-decode-tokens", "4", "--serve-batches", "2", "--serve-output-tokens", "3", "--serve-prompt-len", "16",
        "--repeats", "1"]
TINY_SETTINGS = dict(threads=1, prompt_lens="16", decode_tokens=4, decode_prompt_len=16, batches="2",
                     batch_decode_tokens=4, serve_batches="2", serve_output_tokens=3, serve_prompt_len=16, repeats=1)
MAIN_KEYS = ["prefill@16", "decode", "decode_b2"]
SERVE_KEYS = ["serve_b2", "serve_b2_ttft", "serve_b2_ttft_max"]
KEYS = MAIN_KEYS + SERVE_KEYS
RATIO_KEYS = MAIN_KEYS + ["serve_b2", "serve_b2_ttft"]  # no ratio of the slowest request's TTFT
FIGURE_COUNT = len(KEYS)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="leapllm")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


def workers_from(modes: dict[str, str]):
    """Worker command per system: the stand-in worker in the given mode, else the real one."""
    def command(name: str) -> list[str]:
        if name in modes:
            return [sys.executable, str(FAKE_WORKER), modes[name]]
        return [sys.executable, "-m", "leapllm.benchmarking.worker"]
    return command


def child_pids() -> set[int]:
    me, found = os.getpid(), set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                found.add(int(d.name))
    return found


def by_name(report: dict) -> dict[str, dict]:
    return {e["name"]: e for e in report["systems"]}


def assert_all_figures(entry: dict, keys=KEYS) -> None:
    assert entry["status"] == "ok", entry["reason"]
    for key in keys:
        assert entry["figures"][key] > 0, (entry["name"], key)
    assert entry["peak_memory_mib"] > 0 and entry["resident_memory_mib"] is not None


@pytest.mark.slow
def test_bench_runs_end_to_end_with_the_hf_peer_and_writes_json_and_markdown(tmp_path, capsys):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    args = parse(["--systems", "leapllm-float32,hf-float32", *TINY, "--json", str(out_json),
                  "--markdown", str(out_md)])
    assert args.func(args) == 0

    report = json.loads(out_json.read_text())
    systems = by_name(report)
    assert list(systems) == ["leapllm-float32", "hf-float32"]
    assert_all_figures(systems["leapllm-float32"])
    assert_all_figures(systems["hf-float32"], MAIN_KEYS)
    for entry in systems.values():
        assert len(entry["runs"]["decode"]) == 1 and "decode" in entry["warmup"]
    # leapllm's serving engine: every request got its 3 tokens, its first one within the total time.
    serve = systems["leapllm-float32"]["runs"]["serve_b2"][0]
    assert len(serve["ttft_s"]) == 2 and all(0 < t <= serve["seconds"] for t in serve["ttft_s"])
    assert [len(row) for row in systems["leapllm-float32"]["tokens"]["serve_b2"]] == [3, 3]
    assert systems["leapllm-float32"]["serve_peak_memory_mib"] > 0
    # transformers has no continuous batching: unsupported, not estimated.
    assert systems["hf-float32"]["notes"]["serve_b2"].startswith("not supported")
    assert not set(SERVE_KEYS) & set(systems["hf-float32"]["figures"])
    assert systems["hf-float32"]["greedy_agreement"] == 4  # float32 systems agree on the greedy tokens
    assert systems["hf-float32"]["batched_agreement"] == {"decode_b2": 4}
    assert len(report["reference_tokens"]) == 4
    ratios = report["ratios"]["leapllm-float32 / hf-float32"]
    assert set(ratios) == set(RATIO_KEYS) | {"peak_memory_mib", "resident_memory_mib"}
    assert all(ratios[k] > 0 for k in MAIN_KEYS + ["peak_memory_mib", "resident_memory_mib"])
    assert ratios["serve_b2"] is None and ratios["serve_b2_ttft"] is None
    assert report["machine"]["threads"] >= 1 and report["model"].endswith(".gguf")

    text = out_md.read_text()
    assert text == markdown(report) + "\n"
    assert ("| system | prefill@16 tok/s | decode b1 tok/s | decode b2 total tok/s | serve b2 tok/s | TTFT b2 ms | "
            "TTFT max b2 ms | peak MiB | resident MiB |") in text
    assert "| unsupported | unsupported | unsupported |" in text
    rows = [line for line in text.splitlines() if line.startswith("| leapllm-float32")]
    assert len(rows) == 2  # the main table and the ratio table
    assert "leapllm-float32 / hf-float32" in capsys.readouterr().out  # the terminal table
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary behind


@pytest.mark.slow
def test_a_missing_peer_is_reported_missing_with_its_reason_and_the_others_still_run(tmp_path):
    settings = BenchSettings(systems="leapllm-float32,llamacpp", **TINY_SETTINGS)
    report = run_bench(settings, log=lambda _: None, worker_command=workers_from({"llamacpp": "no-llama-cpp"}))
    systems = by_name(report)
    assert systems["llamacpp"]["status"] == "missing"
    assert "llama-cpp-python is not installed" in systems["llamacpp"]["reason"]
    assert systems["llamacpp"]["figures"] == {} and systems["llamacpp"]["peak_memory_mib"] is None
    assert_all_figures(systems["leapllm-float32"])
    assert report["ratios"] == {}  # nothing invented for the missing peer
    text = markdown(report)
    assert "| llamacpp | missing | missing | missing | missing | missing |" in text
    assert "llamacpp missing: llama-cpp-python is not installed" in text


def test_a_worker_that_crashes_or_hangs_mid_run_is_reported_and_leaves_no_process(tmp_path):
    before = child_pids()
    settings = BenchSettings(systems="leapllm-float32,leapllm-bfloat16,hf-float32", timeout=3, **TINY_SETTINGS)
    command = workers_from({"leapllm-float32": "ok", "leapllm-bfloat16": "crash", "hf-float32": "hang"})
    result = {}
    thread = threading.Thread(target=lambda: result.update(report=run_bench(settings, log=lambda _: None,
                                                                             worker_command=command)), daemon=True)
    thread.start()
    thread.join(timeout=300)  # a guard against a hang, not a speed limit
    assert not thread.is_alive(), "the harness hung"

    systems = by_name(result["report"])
    crashed, hung = systems["leapllm-bfloat16"], systems["hf-float32"]
    assert crashed["status"] == "failed" and "decode" in crashed["reason"]
    assert "exit status 3" in crashed["reason"], crashed["reason"]
    assert hung["status"] == "failed" and "no answer within 3 s" in hung["reason"], hung["reason"]
    assert crashed["figures"] == {} and hung["figures"] == {}
    assert_all_figures(systems["leapllm-float32"])  # the others continue
    assert child_pids() <= before
    for entry in systems.values():
        assert entry["pid"] is not None and not Path(f"/proc/{entry['pid']}").exists()


def test_a_float32_system_whose_greedy_tokens_disagree_is_broken_and_gets_no_speed_figures():
    settings = BenchSettings(systems="leapllm-float32,hf-float32,hf-bfloat16", **TINY_SETTINGS)
    command = workers_from({"leapllm-float32": "ok", "hf-float32": "wrong", "hf-bfloat16": "wrong"})
    report = run_bench(settings, log=lambda _: None, worker_command=command)
    systems = by_name(report)
    hf32, hf16 = systems["hf-float32"], systems["hf-bfloat16"]
    assert hf32["status"] == "broken" and "agree with leapllm-float32 for 0 < 4 tokens" in hf32["reason"]
    assert hf32["figures"] == {} and hf32["greedy_agreement"] == 0
    # Half precision only reports how far it agrees.
    assert hf16["status"] == "ok" and hf16["greedy_agreement"] == 0 and hf16["figures"]["decode"] > 0
    assert list(report["ratios"]) == ["leapllm-float32 / hf-bfloat16"]
    assert "| hf-float32 |" + " broken |" * (FIGURE_COUNT + 2) + " 0 |" in markdown(report)


def test_the_quantized_leapllm_systems_are_known_and_run_by_default():
    for name, dtype in (("leapllm-int4", "int4"), ("leapllm-int8", "int8")):
        assert name in ALL_SYSTEMS and system_engine_dtype(name) == ("leapllm", dtype)
        assert resolve_systems(BenchSettings(systems=name)) == [name]  # on CPU too: no CUDA-only restriction
    assert QUANTIZED["int4"].args == {"method": "int4", "group_size": 32, "head_method": "int8"}
    assert QUANTIZED["int8"].args == {"method": "int8"}
    assert resolve_systems(BenchSettings(peers="llamacpp")) == [
        "leapllm-float32", "leapllm-bfloat16", "leapllm-int4", "leapllm-int8", "llamacpp"]
    assert resolve_systems(BenchSettings(peers="none"))[2:] == ["leapllm-int4", "leapllm-int8"]


def test_quantized_leapllm_systems_whose_greedy_tokens_differ_are_reported_not_broken():
    settings = BenchSettings(systems="leapllm-float32,leapllm-int4,leapllm-int8,llamacpp", **TINY_SETTINGS)
    command = workers_from({"leapllm-float32": "ok", "leapllm-int4": "wrong", "leapllm-int8": "wrong",
                            "llamacpp": "ok"})
    report = run_bench(settings, log=lambda _: None, worker_command=command)
    systems = by_name(report)
    for name in ("leapllm-int4", "leapllm-int8"):
        entry = systems[name]
        assert entry["dtype"] == name.split("-")[1] and entry["greedy_agreement"] == 0
        assert_all_figures(entry)  # no figure withheld, not even the batched one
        assert entry["batched_agreement"] == {"decode_b2": 0} and entry["notes"] == {}
    # Side by side with llama.cpp: a ratio for every quantized system against it.
    assert list(report["ratios"]) == ["leapllm-float32 / llamacpp", "leapllm-int4 / llamacpp",
                                      "leapllm-int8 / llamacpp"]
    text = markdown(report)
    assert "| leapllm-int4 / llamacpp |" in text and "| leapllm-int8 / llamacpp |" in text
    assert "leapllm-int4 quantizes the dequantized weights at load" in text
    assert "the precision llama.cpp has on Q4_1 projections with a Q8_0 output head" in text


@pytest.mark.slow
def test_the_leapllm_int4_system_loads_the_default_model_quantized_and_decodes(default_gguf_path):
    import torch

    from leapllm.compression.int4 import Int4Linear
    from leapllm.compression.int8 import Int8Linear

    threads = torch.get_num_threads()  # import_libraries sets it: leave this process's setting as it is
    system = make_system("leapllm-int4", default_gguf_path, "cpu", threads, 32)
    system.import_libraries()
    system.load()
    model = system.model
    assert model.dtype == torch.float32  # float32 activations
    assert all(isinstance(layer.mlp.down_proj, Int4Linear) for layer in model.layers)
    assert isinstance(model.lm_head, Int8Linear)
    ids = list(range(1000, 1016))
    assert system.prefill(ids) > 0
    seconds, tokens = system.decode(ids, 4)
    assert seconds > 0 and len(tokens) == 4 and all(0 <= t < model.config.vocab_size for t in tokens)
    seconds, rows = system.batched_decode([ids, ids], 3)
    assert seconds > 0 and [len(row) for row in rows] == [3, 3]
    assert rows[0] == rows[1] and rows[0][0] == tokens[0]  # the same prompt gives the same first token
    info = system.info()
    kernel = ("PyTorch kernels" if model.lm_head.packed_linear is None else
              "leapllm VNNI kernels" if model.lm_head.packed_linear.simd else "leapllm portable kernels")
    assert info["weights"] == f"int4 groups of 32 (projections), int8 output head; kernel: {kernel}"
    assert info["compute_dtype"] == "float32" and info["weights_mib"] > 0


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llamacpp_peer_measures_every_figure_including_batched_decode():
    settings = BenchSettings(systems="llamacpp", **TINY_SETTINGS)  # leapllm-float32 loads as reference only
    report = run_bench(settings, log=lambda _: None)
    entry = by_name(report)["llamacpp"]
    assert_all_figures(entry)
    assert len(report["reference_tokens"]) == 4 and entry["greedy_agreement"] is not None
    # Batched rows give the same greedy tokens as the peer's own batch-1 decode.
    assert entry["batched_agreement_own"] == {"decode_b2": 4}


def test_serve_figures_give_throughput_and_time_to_first_token_with_ratios_that_favour_the_faster():
    settings = BenchSettings(systems="leapllm-float32,llamacpp", **dict(TINY_SETTINGS, serve_batches="2,3"))
    logged = []
    report = run_bench(settings, log=logged.append,
                       worker_command=workers_from({"leapllm-float32": "ok", "llamacpp": "ok"}))
    systems = by_name(report)
    for entry in systems.values():
        assert_all_figures(entry, KEYS + ["serve_b3", "serve_b3_ttft", "serve_b3_ttft_max"])
        # The stand-in's requests get their first tokens 10, 20 (, 30) ms in; the last ends 0.1 s later.
        assert entry["figures"]["serve_b2"] == pytest.approx(2 * 3 / 0.12)
        assert entry["figures"]["serve_b2_ttft"] == pytest.approx(15.0)
        assert entry["figures"]["serve_b2_ttft_max"] == pytest.approx(20.0)
        assert entry["figures"]["serve_b3_ttft"] == pytest.approx(20.0)
        assert entry["runs"]["serve_b3"][0]["ttft_s"] == pytest.approx([0.01, 0.02, 0.03])
        assert entry["tokens"]["serve_b3"] == [list(range(100, 103))] * 3
        # Memory is read before the serve phase and again after it.
        assert {"end", "after_serve"} <= set(entry["memory"])
    ratios = report["ratios"]["leapllm-float32 / llamacpp"]
    assert ratios["serve_b2"] == pytest.approx(1.0) and ratios["serve_b2_ttft"] == pytest.approx(1.0)
    assert "serve_b2_ttft_max" not in ratios
    assert logged.index("serve: warm-up") > logged.index("repeat 1/1")  # a second phase
    keys = [f["key"] for f in report["figures"]]
    assert keys == KEYS + ["serve_b3", "serve_b3_ttft", "serve_b3_ttft_max"]
    assert report["settings"]["serve_batches"] == [2, 3] and report["settings"]["serve_output_tokens"] == 3

    text = markdown(report)
    assert "| serve b2 tok/s | TTFT b2 ms | TTFT max b2 ms | serve b3 tok/s |" in text
    assert "| serve b2 | TTFT b2 (peer / leapllm) | serve b3 | TTFT b3 (peer / leapllm) | peak memory |" in text
    assert "| 50.0 | 15.0 | 20.0 |" in text
    assert "peer's time to first token / leapllm's, so > 1: leapllm answers sooner" in text
    assert "Serve bN: N requests arrive at once, each with its own 16-token prompt, 3 greedy tokens each" in text


def test_the_ttft_ratio_is_peer_over_leapllm_so_above_one_means_leapllm_is_faster():
    figures = [{"key": "serve_b2", "better": "higher", "ratio": True},
               {"key": "serve_b2_ttft", "better": "lower", "ratio": True},
               {"key": "serve_b2_ttft_max", "better": "lower", "ratio": False}]
    common = {"status": "ok", "peak_memory_mib": 1.0, "resident_memory_mib": 1.0}
    mine = dict(common, name="leapllm-int4", engine="leapllm",
                figures={"serve_b2": 300.0, "serve_b2_ttft": 50.0, "serve_b2_ttft_max": 60.0})
    peer = dict(common, name="llamacpp", engine="llamacpp",
                figures={"serve_b2": 100.0, "serve_b2_ttft": 100.0, "serve_b2_ttft_max": 120.0})
    ratios = compute_ratios([mine, peer], figures)["leapllm-int4 / llamacpp"]
    assert ratios["serve_b2"] == 3.0 and ratios["serve_b2_ttft"] == 2.0 and "serve_b2_ttft_max" not in ratios


def test_serve_prompts_are_as_long_as_asked_and_share_no_prefix(default_gguf_path):
    tokenizer, _ = open_model_file(default_gguf_path)
    prompts = serve_prompts(tokenizer, 32, 128)
    assert len(prompts) == 32 and all(len(p) == 128 for p in prompts)
    assert len({tuple(p[:DISTINCT_PREFIX]) for p in prompts}) == 32
    # More than the text holds: it repeats shifted, and the windows still start differently.
    long = serve_prompts(tokenizer, 300, 128)
    assert len({tuple(p[:DISTINCT_PREFIX]) for p in long}) == 300


@pytest.mark.parametrize("value", [None, "none", "", " none ", []])
def test_serve_batches_none_or_empty_skips_the_serve_figures(value):
    plan = resolve(BenchSettings(serve_batches=value))
    assert plan.serve_batches == []
    assert "--serve-batches none" in plan.canonical_command()
    # The serve lengths no longer count towards the longest sequence.
    assert resolve(BenchSettings(serve_batches=value, serve_prompt_len=9000)).max_seq_len == 513


def test_serve_options_reach_the_plan_and_the_canonical_command():
    args = parse(["--serve-batches", "4,2,4", "--serve-output-tokens", "8", "--serve-prompt-len", "600"])
    plan = resolve(settings_from_args(args))
    assert (plan.serve_batches, plan.serve_output_tokens, plan.serve_prompt_len) == ([2, 4], 8, 600)
    assert "--serve-batches 2,4 --serve-output-tokens 8 --serve-prompt-len 600" in plan.canonical_command()
    assert plan.max_seq_len == 608  # longer than any other figure's sequence
    defaults = resolve(settings_from_args(parse([])))
    assert (defaults.serve_batches, defaults.serve_output_tokens, defaults.serve_prompt_len) == ([16, 32], 128, 128)


@pytest.mark.parametrize("argv", [["--serve-batches", "0"], ["--serve-batches", "4,x"],
                                  ["--serve-output-tokens", "0"], ["--serve-prompt-len", "-1"]])
def test_bad_serve_options_are_one_line_errors(argv, capsys):
    from leapllm.cli.main import main

    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("leapllm: error: --serve-"), err


@pytest.mark.slow
def test_the_leapllm_system_serves_concurrent_requests_through_its_engine(default_gguf_path):
    import torch

    system = make_system("leapllm-float32", default_gguf_path, "cpu", torch.get_num_threads(), 32)
    system.import_libraries()
    system.load()
    prompts = [list(range(1000, 1012)), list(range(2000, 2012))]
    for _ in range(2):  # the second call gets a fresh engine: nothing of the first is reused
        seconds, ttft, rows = system.serve(prompts, 4)
        assert len(ttft) == 2 and all(0 < t <= seconds for t in ttft)
        assert [len(row) for row in rows] == [4, 4]
        assert all(0 <= t < system.model.config.vocab_size for row in rows for t in row)
    assert "continuous batching" in system.info()["serve"]


@pytest.mark.slow
def test_the_llamacpp_system_serves_concurrent_requests_in_one_context(default_gguf_path):
    pytest.importorskip("llama_cpp")
    system = make_system("llamacpp", default_gguf_path, "cpu", 1, 32)
    system.import_libraries()
    system.load()
    prompts = [list(range(1000, 1012)), list(range(2000, 2012)), list(range(3000, 3012))]
    system.SERVE_N_BATCH = 16  # the prompts then take two llama_decode calls: the first request answers first
    seconds, ttft, rows = system.serve(prompts, 4)
    assert len(ttft) == 3 and all(0 < t <= seconds for t in ttft) and ttft[0] < ttft[2]
    assert [len(row) for row in rows] == [4, 4, 4]
    # Each request's tokens are its own prompt's: the same as the peer's batch-1 decode.
    assert rows[1] == system.decode(prompts[1], 4)[1]


@pytest.mark.parametrize("settings, message", [
    (dict(systems="leapllm-float32,vllm"), "unknown system 'vllm'"),
    (dict(peers="hf,vllm"), "unknown peer 'vllm'"),
    (dict(systems=""), "--systems is empty"),
    (dict(systems="leapllm-float16"), "needs --device cuda"),
    (dict(prompt_lens="0,128"), "--prompt-lens values must be positive"),
    (dict(prompt_lens="12x"), "--prompt-lens expects comma-separated integers"),
    (dict(batches=""), "--batches is empty"),
    (dict(decode_tokens=0), "--decode-tokens must be an integer of at least 2"),
    (dict(batch_decode_tokens=1), "--batch-decode-tokens must be an integer of at least 2"),
    (dict(decode_prompt_len=0), "--decode-prompt-len must be an integer of at least 1"),
    (dict(serve_batches="0,16"), "--serve-batches values must be positive"),
    (dict(serve_batches="16,a"), "--serve-batches expects comma-separated integers"),
    (dict(serve_output_tokens=0), "--serve-output-tokens must be an integer of at least 1"),
    (dict(serve_prompt_len=0), "--serve-prompt-len must be an integer of at least 1"),
    (dict(repeats=0), "--repeats must be"),
    (dict(threads=0), "--threads must be"),
    (dict(device="tpu"), "--device must be cpu or cuda"),
    (dict(json="no/such/folder/out.json"), "does not exist"),
])
def test_bad_arguments_raise_invalid_request_error(settings, message):
    with pytest.raises(InvalidRequestError, match=message.replace("(", r"\(")):
        resolve(BenchSettings(**settings))


def test_bad_model_paths_raise_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        resolve(BenchSettings(model=tmp_path / "missing.gguf"))
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="needs a GGUF file"):
        resolve(BenchSettings(model=tmp_path / "weights.safetensors"))


def test_a_sequence_longer_than_the_context_is_refused_before_any_worker_starts():
    with pytest.raises(InvalidRequestError, match="exceeds the model's context"):
        run_bench(BenchSettings(systems="leapllm-float32", prompt_lens="9000"), log=lambda _: None,
                  worker_command=lambda name: ["false"])


def test_cmd_bench_raises_for_the_cli_to_print(tmp_path):
    args = parse(["--systems", "nope", "--json", str(tmp_path / "out.json")])
    with pytest.raises(InvalidRequestError, match="unknown system 'nope'"):
        args.func(args)
    assert not (tmp_path / "out.json").exists()
