"""benchmarks/many_rows.py: the tiles-versus-dequantized-GEMM measurement behind the many-rows path."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from leapllm.kernels import cpu_kernels

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "many_rows.py"


def load_script():
    spec = importlib.util.spec_from_file_location("many_rows", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(cpu_kernels() is None, reason="leapllm's CPU kernels do not build here")
def test_the_report_has_both_paths_for_every_shape_form_and_row_count(tmp_path, monkeypatch):
    script = load_script()
    monkeypatch.setattr(script, "SHAPES", ((32, 64),))
    monkeypatch.setattr(script, "ROWS", (1, 40))
    monkeypatch.setattr(script, "measure_int8_ops", lambda: 1e9)
    monkeypatch.setattr(script, "measure_matmul_flops", lambda device, dtype, n: 1e9)
    out = tmp_path / "rows.json"
    assert script.main(["--out", str(out), "--threads", "1", "--repeats", "1"]) == 0
    report = json.loads(out.read_text())
    forms = ("int4", "int8", "int8-16")
    assert {(r["form"], r["rows"]) for r in report["results"]} == {(f, n) for f in forms for n in (1, 40)}
    assert all(r["tiles_gops"] > 0 and r["gemm_gops"] > 0 for r in report["results"])
    assert report["int8_peak_gops"] == 1.0 and report["tiles"] in ("VNNI", "AVX2", "portable")
