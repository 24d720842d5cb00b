"""The outputs: the HTML report renders as one self-contained file with its plots, the JSON parses,
the terminal table lists every stage."""

from __future__ import annotations

import base64
import copy
import json
import re
import struct

import pytest
from rich.console import Console

from leapllm.profiling.report import print_tables, render_html, to_json, write_html, write_json
from leapllm.profiling.stages import STAGE_LABELS, STAGES

IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == PNG_SIGNATURE and png[12:16] == b"IHDR"
    return struct.unpack(">II", png[16:24])


def test_html_report_is_one_self_contained_file_with_four_plots(small_profile, tmp_path):
    path = tmp_path / "report.html"
    write_html(small_profile, path)
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no side files, no temporaries
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    images = IMG.findall(text)
    # stage bars, roofline, prefill vs prompt length, decode vs batch
    assert len(images) == 4 == text.count("<img ")
    for encoded in images:
        width, height = png_size(base64.b64decode(encoded, validate=True))
        assert width > 300 and height > 200
    # nothing is fetched from anywhere else
    assert not re.search(r"(src|href)=\"(?!data:)", text)
    assert "http://" not in text and "https://" not in text and "<link" not in text and "<script" not in text
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", text)
    assert len(captions) == 4 and all(len(c) > 60 for c in captions)
    assert "attention" in captions[2] and "batch" in captions[3]
    for stage in STAGES:
        assert STAGE_LABELS[stage] in text


def test_html_report_without_a_sweep_has_the_stage_bars_and_the_roofline(small_profile):
    data = copy.deepcopy(small_profile)
    del data["sweep"]
    text = render_html(data)
    assert len(IMG.findall(text)) == 2
    assert "stacked stage bars" in text and "roofline" in text


def test_json_output_parses_with_the_expected_keys(small_profile, tmp_path):
    path = tmp_path / "profile.json"
    write_json(small_profile, path)
    data = json.loads(path.read_text())
    assert {"settings", "model", "runtime", "machine", "stages", "phases", "sweep"} <= set(data)
    assert data["stages"] == list(STAGES)
    for name in ("prefill", "decode"):
        phase = data["phases"][name]
        assert {"total_s", "hook_free_total_s", "profiler_overhead_s", "stages", "per_layer", "check"} <= set(phase)
        assert set(phase["stages"]) == set(STAGES)
        assert {"seconds", "share", "flops", "bytes", "flop_per_s", "bytes_per_s", "peak_flops_fraction",
                "peak_bandwidth_fraction", "bound"} <= set(phase["stages"]["qkv_proj"])
        assert len(phase["per_layer"]) == 30
    assert [p["prompt_len"] for p in data["sweep"]["prefill"]["points"]] == [16, 32]
    assert [p["batch"] for p in data["sweep"]["decode"]["points"]] == [1, 2]
    assert json.loads(to_json(small_profile)) == data


def test_sweep_points_have_every_stage_and_add_up(small_profile):
    sweep = small_profile["sweep"]
    for point in sweep["prefill"]["points"]:
        assert set(point["seconds"]) == set(STAGES)
        assert sum(point["seconds"].values()) == pytest.approx(point["total_s"])
    for point in sweep["decode"]["points"]:
        assert sum(point["seconds"].values()) == pytest.approx(point["step_s"])
    a, b = sweep["decode"]["points"]
    # twice the sequences per weight read: twice the FLOPs per byte of the projections, nearly
    assert 1.8 < b["projection_intensity"] / a["projection_intensity"] <= 2.0


def test_terminal_table_lists_every_stage_and_the_check(small_profile):
    console = Console(record=True, width=200)
    print_tables(small_profile, console=console, per_layer=True)
    text = console.export_text()
    for stage in STAGES:
        assert STAGE_LABELS[stage] in text
    assert text.count("stages + other =") == 2 and "ms per layer" in text
    assert "sweep: prefill" in text and "sweep: one decode step" in text


def test_the_decode_step_is_set_against_its_bandwidth_floor(small_profile):
    """The bytes a decode step reads at the measured streaming bandwidth: the fastest a memory-bound
    step can be, and how near the measured step comes to it."""
    console = Console(record=True, width=200)
    print_tables(small_profile, console=console)
    line = next(t for t in console.export_text().splitlines() if t.startswith("decode floor:"))
    phase, bandwidth = small_profile["phases"]["decode"], small_profile["machine"]["bandwidth"]
    floor = phase["bytes"] / phase["steps"] / bandwidth
    assert f"= {floor * 1e3:.2f} ms" in line
    assert f"{floor / phase['seconds_per_step'] * 100:.0f}% of the floor's speed" in line


def test_a_stage_above_the_measured_peak_asks_to_measure_the_machine_again(small_profile):
    data = copy.deepcopy(small_profile)
    # Every stage within the peak first: the fixture's peaks are made up, and a fast CPU (AMX) beats
    # them for real.
    for phase in data["phases"].values():
        for row in phase["stages"].values():
            for key in ("peak_flops_fraction", "peak_bandwidth_fraction"):
                if row[key] is not None:
                    row[key] = min(row[key], 0.9)
    assert "above the measured peak" not in render_html(data)
    data["phases"]["prefill"]["stages"]["gate_up_proj"]["peak_flops_fraction"] = 1.2
    text = render_html(data)
    assert "prefill MLP gate/up ran above the measured peak" in text and "leapllm profile --machine" in text


def test_a_failed_sum_check_is_shown_and_explained(small_profile):
    data = copy.deepcopy(small_profile)
    data["phases"]["decode"]["check"].update(ok=False, relative_difference=0.2)
    data["phases"]["decode"]["profiler_overhead_s"] = 0.01
    text = render_html(data)
    assert "NOT within 5%" in text and "--repeats 3" in text and 'class="bad"' in text
