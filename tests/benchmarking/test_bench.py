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
    check_speculation,
    compute_ratios,
    fit_chat_prompts,
    measurements,
    open_model_file,
    resolve,
    resolve_systems,
    run_bench,
    serve_prompts,
    worker_argv,
)
from leapllm.benchmarking.report import markdown
from leapllm.benchmarking.systems import (
    ALL_SYSTEMS,
    QUANTIZED,
    base_system,
    make_system,
    speculation_method,
    system_engine_dtype,
)
from leapllm.cli.bench_cmd import add_bench_parser, settings_from_args
from leapllm.errors import InvalidRequestError, ModelLoadError
from leapllm.reference_text import CHAT_PROMPTS, chat_prompt_ids

FAKE_WORKER = Path(__file__).with_name("fake_worker.py")
# One thread: on a small machine shared with other work, two threads waiting on each other at every
# barrier can make a tiny run many times slower.
TINY = ["--threads", "1", "--prompt-lens", "16", "--decode-tokens", "4", "--decode-prompt-len", "16",
        "--chat-decode-tokens", "4", "--batches", "2",
        "--batch-decode-tokens", "4", "--serve-batches", "2", "--serve-output-tokens", "3", "--serve-prompt-len", "16",
        "--repeats", "1"]
TINY_SETTINGS = dict(threads=1, prompt_lens="16", decode_tokens=4, decode_prompt_len=16, chat_decode_tokens=4,
                     batches="2", batch_decode_tokens=4, serve_batches="2", serve_output_tokens=3, serve_prompt_len=16,
                     repeats=1)
MAIN_KEYS = ["prefill@16", "decode", "decode_chat", "decode_b2"]
SERVE_KEYS = ["serve_b2", "serve_b2_ttft", "serve_b2_ttft_max"]
KEYS = MAIN_KEYS + SERVE_KEYS
RATIO_KEYS = MAIN_KEYS + ["serve_b2", "serve_b2_ttft"]  # no ratio of the slowest request's TTFT
OTHER_RATIO_KEYS = {"peak_memory_mib", "resident_memory_mib", "load_s", "cold_start_s"}
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
    assert set(ratios) == set(RATIO_KEYS) | OTHER_RATIO_KEYS
    assert all(ratios[k] > 0 for k in MAIN_KEYS + list(OTHER_RATIO_KEYS))
    assert all(systems[name]["first_token_s"] > 0 for name in ("leapllm-float32", "hf-float32"))
    assert ratios["serve_b2"] is None and ratios["serve_b2_ttft"] is None
    assert report["machine"]["threads"] >= 1 and report["model"].endswith(".gguf")

    text = out_md.read_text()
    assert text == markdown(report) + "\n"
    assert ("| system | prefill@16 tok/s | decode b1 tok/s | chat decode b1 tok/s | decode b2 total tok/s | "
            "serve b2 tok/s | TTFT b2 ms | TTFT max b2 ms | peak MiB | resident MiB |") in text
    # Every chat prompt got its 4 greedy tokens, from both systems.
    assert [len(row) for row in systems["hf-float32"]["tokens"]["decode_chat"]] == [4] * len(CHAT_PROMPTS)
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


def busy_loop_children() -> set[int]:
    found = set()
    for pid in child_pids():
        try:
            if b"while True: pass" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(pid)
        except OSError:
            pass
    return found


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--contend needs a core left free")
def test_contend_measures_every_repeat_beside_busy_loops_and_ends_them():
    seen = []

    def log(message: str) -> None:  # which busy loops run while each round is measured
        if message.startswith(("warm-up", "repeat")):
            seen.append(busy_loop_children())

    settings = BenchSettings(systems="leapllm-float32", contend=1, **TINY_SETTINGS)
    report = run_bench(settings, log=log, worker_command=workers_from({"leapllm-float32": "ok"}))
    assert seen and all(len(pids) == 1 for pids in seen), seen
    assert not busy_loop_children()  # stopped with the workers
    assert report["settings"]["contend"] == 1
    assert "1 core(s) taken by busy loops" in markdown(report)
    assert "--contend 1" in report["canonical_command"]
    assert_all_figures(by_name(report)["leapllm-float32"])


def test_contend_must_leave_a_core_free_and_is_a_one_line_error_otherwise(capsys):
    from leapllm.cli.main import main

    cores = len(os.sched_getaffinity(0))
    assert resolve(settings_from_args(parse(["--contend", "0"]))).contend == 0
    assert "--contend" not in resolve(settings_from_args(parse([]))).canonical_command()
    for value in ("-1", str(cores)):
        assert main(["bench", "--contend", value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("leapllm: error: --contend"), err


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
    assert "| hf-float32 |" + " broken |" * (FIGURE_COUNT + 4) + " 0 |" in markdown(report)


def test_the_quantized_leapllm_systems_are_known_and_run_by_default():
    for name, dtype in (("leapllm-int4", "int4"), ("leapllm-int8", "int8")):
        assert name in ALL_SYSTEMS and system_engine_dtype(name) == ("leapllm", dtype)
        assert resolve_systems(BenchSettings(systems=name)) == [name]  # on CPU too: no CUDA-only restriction
    assert QUANTIZED["int4"].args == {"method": "int4", "group_size": 32, "head_method": "int8"}
    assert QUANTIZED["int8"].args == {"method": "int8"}
    assert resolve_systems(BenchSettings(peers="llamacpp")) == [
        "leapllm", "leapllm-float32", "leapllm-bfloat16", "leapllm-int4", "leapllm-int8", "llamacpp"]
    assert resolve_systems(BenchSettings(peers="none"))[3:] == ["leapllm-int4", "leapllm-int8"]


def test_the_leapllm_system_is_the_cli_with_no_flags():
    assert system_engine_dtype("leapllm") == ("leapllm", "auto")
    assert system_engine_dtype("leapllm+ngram") == ("leapllm", "auto")
    assert resolve_systems(BenchSettings(peers="none"))[0] == "leapllm"


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


# -- speculative systems and chat decoding -------------------------------------------------------

NO_BATCHES = dict(TINY_SETTINGS, batches="none", serve_batches="none")
SPEC_KEYS = ["prefill@16", "decode", "decode_chat"]


def test_speculative_systems_are_their_base_system_with_a_method_and_not_run_by_default():
    for name, method in (("leapllm-int4+ngram", "ngram"), ("leapllm-int4+draft", "draft")):
        assert name in ALL_SYSTEMS
        assert system_engine_dtype(name) == ("leapllm", "int4")  # QUANTIZED and the notes key on the base dtype
        assert base_system(name) == "leapllm-int4" and speculation_method(name) == method
        assert resolve_systems(BenchSettings(systems=f"leapllm-int4,{name}")) == ["leapllm-int4", name]
    assert speculation_method("leapllm-int4") is None and base_system("llamacpp") == "llamacpp"
    assert not any("+" in name for name in resolve_systems(BenchSettings()))
    with pytest.raises(InvalidRequestError, match="needs --device cuda"):
        resolve_systems(BenchSettings(systems="leapllm-float16+ngram"))
    with pytest.raises(InvalidRequestError, match="unknown system 'hf-float32\\+ngram'"):
        resolve_systems(BenchSettings(systems="hf-float32+ngram"))


def test_the_speculation_options_reach_the_plan_the_workers_and_the_canonical_command(tmp_path):
    draft = tmp_path / "draft.gguf"
    draft.write_bytes(b"")
    args = parse(["--systems", "leapllm-int4,leapllm-int4+ngram,leapllm-int4+draft", "--draft-model", str(draft),
                  "--num-speculative-tokens", "6", "--chat-decode-tokens", "64", "--batches", "none"])
    plan = resolve(settings_from_args(args))
    assert (plan.draft_model, plan.num_speculative_tokens, plan.chat_decode_tokens, plan.batches) == (draft, 6, 64, [])
    command = plan.canonical_command()
    assert "--chat-decode-tokens 64 --batches none" in command
    assert f"--draft-model {draft} --num-speculative-tokens 6" in command
    command_of = workers_from({})
    assert worker_argv(plan, "leapllm-int4", command_of)[-2:] == ["--max-seq-len", str(plan.max_seq_len)]
    assert worker_argv(plan, "leapllm-int4+ngram", command_of)[-2:] == ["--num-speculative-tokens", "6"]
    assert worker_argv(plan, "leapllm-int4+draft", command_of)[-4:] == ["--num-speculative-tokens", "6",
                                                                        "--draft-model", str(draft)]
    defaults = resolve(settings_from_args(parse([])))
    assert (defaults.draft_model, defaults.num_speculative_tokens, defaults.chat_decode_tokens) == (None, 4, 128)
    assert defaults.batches == [8, 32]


def test_chat_decode_and_speculative_systems_give_figures_ratios_and_acceptance_per_prompt_kind():
    settings = BenchSettings(systems="leapllm-int4,leapllm-int4+ngram,leapllm-int8+ngram,leapllm-int4+draft,llamacpp",
                             **NO_BATCHES)
    modes = {name: "ok" for name in ("leapllm-float32", "leapllm-int4", "leapllm-int4+ngram", "leapllm-int8+ngram",
                                     "leapllm-int4+draft", "llamacpp")}
    report = run_bench(settings, log=lambda _: None, worker_command=workers_from(modes))
    systems = by_name(report)
    assert [f["key"] for f in report["figures"]] == SPEC_KEYS  # --batches none, --serve-batches none
    assert [f["label"] for f in report["figures"]][2] == "chat decode b1"
    prompts = len(CHAT_PROMPTS)
    assert [p["kind"] for p in report["chat_prompts"]] == [kind for kind, _ in CHAT_PROMPTS]
    assert all(p["prompt_tokens"] > 0 for p in report["chat_prompts"])
    for name in ("leapllm-int4", "leapllm-int4+ngram", "leapllm-int8+ngram", "llamacpp"):
        entry = systems[name]
        assert_all_figures(entry, SPEC_KEYS)
        # The stand-in decodes at 10 ms a token: every prompt's 3 decode steps, summed.
        assert entry["runs"]["decode_chat"][0]["seconds"] == pytest.approx(prompts * 0.03)
        assert entry["figures"]["decode_chat"] == pytest.approx(100.0)
        assert entry["tokens"]["decode_chat"] == [list(range(100, 104))] * prompts
    spec, unchecked = systems["leapllm-int4+ngram"], systems["leapllm-int8+ngram"]
    assert spec["identical_to_base"] == {"decode": True, "decode_chat": True} and spec["base"] == "leapllm-int4"
    assert spec["info"] == {"draft_model": None, "num_speculative_tokens": 4}
    # Each prompt's own counts: what its decode proposed and kept, not the worker's running totals.
    assert spec["runs"]["decode_chat"][0]["speculation"] == [
        {"proposed": 4, "accepted": 3, "speculative_steps": 1}] * prompts
    assert spec["runs"]["decode"][0]["speculation"] == {"proposed": 4, "accepted": 3, "speculative_steps": 1}
    assert spec["speedup_over_base"] == {"decode": pytest.approx(1.0), "decode_chat": pytest.approx(1.0)}
    assert "speculation" not in systems["leapllm-int4"]["runs"]["decode_chat"][0]
    # Its base is not in the run: not checked, and not broken either.
    assert unchecked["identical_to_base"] == {"decode": None, "decode_chat": None}
    assert "leapllm-int8 is not in this run" in unchecked["speculation_check"]
    missing = systems["leapllm-int4+draft"]
    assert missing["status"] == "missing" and "--draft-model PATH" in missing["reason"]
    assert missing["pid"] is None  # no worker was started for it
    # Side by side with llama.cpp, chat decode included.
    ratios = report["ratios"]
    assert list(ratios) == ["leapllm-int4 / llamacpp", "leapllm-int4+ngram / llamacpp", "leapllm-int8+ngram / llamacpp"]
    assert ratios["leapllm-int4+ngram / llamacpp"]["decode_chat"] == pytest.approx(1.0)
    assert set(ratios["leapllm-int4+ngram / llamacpp"]) == set(SPEC_KEYS) | OTHER_RATIO_KEYS

    text = markdown(report)
    assert "| system | prefill@16 tok/s | decode b1 tok/s | chat decode b1 tok/s | peak MiB |" in text
    assert "| leapllm-int4+ngram / llamacpp |" in text
    assert "leapllm-int4+ngram: greedy tokens identical to leapllm-int4's on decode b1 and chat decode b1" in text
    assert ("leapllm-int4+ngram acceptance (accepted / proposed, last repeat): decode b1 0.75 (3/4); chat decode b1: "
            "code 0.75 (3/4), code-edit 0.75 (3/4)") in text
    assert f"all prompts 0.75 ({3 * prompts}/{4 * prompts})" in text
    assert "leapllm-int4+ngram over leapllm-int4 (same run, ratio of medians): decode b1 x1.00, chat decode b1 x1.00" \
        in text
    assert "leapllm-int8+ngram: greedy tokens not checked on decode b1 and chat decode b1" in text
    assert "leapllm-int4+draft missing: needs a draft model: give --draft-model PATH" in text
    assert "Chat decode b1: 4 greedy tokens (EOS ignored) after each of 7 chat prompts (code, code-edit," in text
    assert "Decode bN total" not in text and "plain batched loop" not in text


def test_a_speculative_system_whose_tokens_differ_from_its_base_is_broken_and_chat_decode_can_be_off(tmp_path):
    draft = tmp_path / "draft-folder"
    draft.mkdir()
    settings = BenchSettings(systems="leapllm-int4,leapllm-int4+ngram,leapllm-int4+draft,llamacpp",
                             draft_model=draft, num_speculative_tokens=2, **dict(NO_BATCHES, chat_decode_tokens=0))
    modes = {"leapllm-float32": "ok", "leapllm-int4": "ok", "leapllm-int4+ngram": "wrong", "leapllm-int4+draft": "ok",
             "llamacpp": "ok"}
    report = run_bench(settings, log=lambda _: None, worker_command=workers_from(modes))
    systems = by_name(report)
    assert [f["key"] for f in report["figures"]] == ["prefill@16", "decode"]  # --chat-decode-tokens 0
    assert report["settings"]["chat_decode_tokens"] == 0 and report["chat_prompts"] == []
    broken, drafted = systems["leapllm-int4+ngram"], systems["leapllm-int4+draft"]
    assert broken["status"] == "broken" and broken["figures"] == {}
    assert "greedy tokens differ from its base leapllm-int4's: decode b1: from token 0 on (of 4)" in broken["reason"]
    assert broken["identical_to_base"] == {"decode": False}
    assert drafted["status"] == "ok" and drafted["identical_to_base"] == {"decode": True}
    assert drafted["info"] == {"draft_model": str(draft), "num_speculative_tokens": 2}  # what its worker was given
    assert list(report["ratios"]) == ["leapllm-int4 / llamacpp", "leapllm-int4+draft / llamacpp"]
    assert "| leapllm-int4+ngram |" + " broken |" * 4 in markdown(report)


def test_one_differing_chat_token_makes_a_speculative_system_broken():
    def entry(name, chat_rows):
        method = name.partition("+")[2] or None
        return {"name": name, "status": "ok", "reason": None, "speculative": method,
                "base": name.partition("+")[0] if method else None, "identical_to_base": {},
                "speculation_check": None, "tokens": {"decode": [[1, 2, 3]], "decode_chat": chat_rows}}
    rows = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    base = entry("leapllm-int4", [rows])
    same = entry("leapllm-int4+ngram", [rows, rows])
    other = entry("leapllm-int4+draft", [rows, [rows[0], rows[1], [7, 8, 0]]])  # its second run parts at the end
    check_speculation([base, same, other])
    assert same["status"] == "ok" and same["identical_to_base"] == {"decode": True, "decode_chat": True}
    assert other["status"] == "broken" and other["identical_to_base"] == {"decode": True, "decode_chat": False}
    assert other["reason"] == ("greedy tokens differ from its base leapllm-int4's: chat decode b1: chat prompt 2 "
                               f"({CHAT_PROMPTS[2][0]}): from token 2 on (of 3)")


@pytest.mark.parametrize("argv, message", [
    (["--draft-model", "/no/such/draft.gguf"], "--draft-model /no/such/draft.gguf: no such file or folder"),
    (["--num-speculative-tokens", "0"], "--num-speculative-tokens must be an integer from 1 to 7, got 0"),
    (["--num-speculative-tokens", "8"], "--num-speculative-tokens must be an integer from 1 to 7, got 8"),
    (["--chat-decode-tokens", "1"], "--chat-decode-tokens must be an integer of at least 2"),
    (["--batches", ""], "--batches is empty"),
])
def test_bad_speculation_and_chat_options_are_one_line_errors(argv, message, capsys):
    from leapllm.cli.main import main

    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"leapllm: error: {message}"), err


def test_chat_prompts_are_the_chat_template_around_each_message_and_fit_in_the_plan(default_gguf_path):
    tokenizer, _ = open_model_file(default_gguf_path)
    plan = resolve(BenchSettings(chat_decode_tokens=100, prompt_lens="16", decode_prompt_len=16, decode_tokens=4,
                                 batches="none", serve_batches="none"))
    assert plan.max_seq_len == 20
    chat = fit_chat_prompts(plan, tokenizer)
    assert [kind for kind, _ in chat] == [kind for kind, _ in CHAT_PROMPTS]
    assert len({kind for kind, _ in chat}) == len(chat) >= 6
    for (kind, message), (_, ids) in zip(CHAT_PROMPTS, chat):
        assert ids == tokenizer.encode_chat([{"role": "user", "content": message}], add_generation_prompt=True)
        assert message.split()[0] in tokenizer.decode(ids)
    assert plan.max_seq_len == max(len(ids) for _, ids in chat) + 100  # the longest chat prompt and its answer
    todo = {m.key: m for m in measurements(plan, tokenizer, chat)}
    assert todo["decode_chat"].request == {"op": "decode_many", "prompts": [ids for _, ids in chat], "n": 100}
    assert todo["decode_chat"].tokens == len(chat) * 99
    plan.chat_decode_tokens = 0
    assert "decode_chat" not in {m.key for m in measurements(plan, tokenizer)}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["leapllm-float32+ngram", "leapllm-int4+draft"])
def test_a_speculative_leapllm_system_speculates_and_decodes_its_base_tokens(name, default_gguf_path):
    import torch

    from leapllm.benchmarking.worker import decode as worker_decode
    from leapllm.model.quantized.int4 import Int4Linear

    tokenizer, _ = open_model_file(default_gguf_path)
    (_, ids), = [c for c in chat_prompt_ids(tokenizer) if c[0] == "rewrite"]
    # The default model drafts for itself: the same tokenizer, and proposals it often agrees with.
    system = make_system(name, default_gguf_path, "cpu", torch.get_num_threads(), len(ids) + 24,
                         draft_model=default_gguf_path, num_speculative_tokens=3)
    system.import_libraries()
    system.load()
    assert system.llm.speculative.method == speculation_method(name)
    assert system.llm.speculative.num_speculative_tokens == 3
    seconds, tokens, counts = worker_decode(system, ids, 24)
    assert seconds > 0 and len(tokens) == 24
    assert set(counts) == {"proposed", "accepted", "speculative_steps"}
    assert 0 <= counts["accepted"] <= counts["proposed"]
    info = system.info()
    assert "up to 3 tokens a step" in info["speculation"]
    if name.endswith("+draft"):
        assert counts["proposed"] > 0  # a draft always has proposals
        draft = system.llm.speculative.draft_model
        assert isinstance(system.model.layers[0].mlp.down_proj, Int4Linear)  # the target is quantized ...
        assert not any(isinstance(m, Int4Linear) for m in draft.modules())  # ... the draft is loaded as given
        assert info["draft_dtype"] == "float32" and info["draft_weights_mib"] > 0
    # The same loaded model without speculation: the base system's tokens, exactly.
    spec, system.llm.speculative = system.llm.speculative, None
    assert system.speculation_counts() is None
    assert system.decode(ids, 24)[1] == tokens
    system.llm.speculative = spec


@pytest.mark.slow
def test_the_leapllm_int4_system_loads_the_default_model_quantized_and_decodes(default_gguf_path):
    import torch

    from leapllm.model.quantized.int4 import Int4Linear
    from leapllm.model.quantized.int8 import Int8Linear

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
    packed = model.lm_head.packed_linear
    kernel = "PyTorch kernels" if packed is None else f"leapllm {packed.kernel} kernels"
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


def test_each_system_gives_its_load_and_its_first_token_right_after_with_ratios_peer_over_leapllm():
    settings = BenchSettings(systems="leapllm-float32,llamacpp", **dict(TINY_SETTINGS, serve_batches="none"))
    logged = []
    report = run_bench(settings, log=logged.append,
                       worker_command=workers_from({"leapllm-float32": "ok", "llamacpp": "ok"}))
    for entry in report["systems"]:
        assert entry["load_s"] >= 0
        assert entry["first_token_s"] == pytest.approx(0.008)  # the stand-in's prefill: 1 ms a token, 8 tokens
    assert sum("its first token 8 ms after" in line for line in logged) == 2
    assert {"load_s", "cold_start_s"} <= set(report["ratios"]["leapllm-float32 / llamacpp"])
    text = markdown(report)
    assert "| peak MiB | resident MiB | load s | first token ms |" in text
    assert "| load (peer / leapllm) | load + first token (peer / leapllm) |" in text
    assert "| 8 |" in text


def test_the_load_and_cold_start_ratios_are_peer_over_leapllm():
    common = {"status": "ok", "peak_memory_mib": 1.0, "resident_memory_mib": 1.0, "figures": {}}
    mine = dict(common, name="leapllm", engine="leapllm", load_s=1.0, first_token_s=0.5)
    peer = dict(common, name="llamacpp", engine="llamacpp", load_s=0.5, first_token_s=2.0)
    ratios = compute_ratios([mine, peer], [])["leapllm / llamacpp"]
    assert ratios["load_s"] == 0.5 and ratios["cold_start_s"] == pytest.approx(2.5 / 1.5)
    no_first = compute_ratios([mine, dict(peer, first_token_s=None)], [])["leapllm / llamacpp"]
    assert no_first["cold_start_s"] is None


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


AMX_BUILD = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | AVX512 = 1 | AVX512_VNNI = 1 | AMX_INT8 = 1 | "


def test_a_llamacpp_build_without_an_instruction_set_this_cpu_has_gets_no_figures():
    """An AMX CPU with a llama.cpp that fell back to AVX-512 (or a generic build) would flatter leapllm."""
    from leapllm.benchmarking.harness import check_peer_build, missing_isa, new_entry

    amx_cpu = {"avx2", "fma", "f16c", "avx512f", "avx512_vnni", "amx_int8"}
    assert missing_isa(AMX_BUILD, amx_cpu) == []
    assert missing_isa(AMX_BUILD.replace("AMX_INT8 = 1", "AMX_INT8 = 0"), amx_cpu) == ["AMX_INT8"]
    fell_back, fastest = new_entry("llamacpp"), new_entry("llamacpp")
    fell_back["info"] = {"system_info": "CPU : AVX2 = 1 | F16C = 1 | FMA = 1 | AVX512 = 1 | "}
    fastest["info"] = {"system_info": AMX_BUILD}
    check_peer_build([fell_back, fastest], amx_cpu, "cpu")
    assert fell_back["status"] == "broken" and "AVX512_VNNI, AMX_INT8" in fell_back["reason"]
    assert fastest["status"] == "ok" and fastest["peer_build_missing"] == []
    avx2_only = new_entry("llamacpp")
    avx2_only["info"] = {"system_info": "CPU : AVX2 = 1 | F16C = 1 | FMA = 1 | "}
    check_peer_build([avx2_only], {"avx2", "fma", "f16c"}, "cpu")  # this AVX2 machine's build is its fastest
    assert avx2_only["status"] == "ok"
