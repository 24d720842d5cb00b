"""`leapllm embed`: stdin or a file in, JSONL or .npy out, one-line errors."""

from __future__ import annotations

import io
import json
import sys

import numpy as np

from leapllm.cli.main import main
from tests.cli_helpers import assert_one_line_error


def run_embed(monkeypatch, capsys, argv, stdin=""):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["embed", *argv])
    return code, capsys.readouterr()


def test_stdin_lines_become_jsonl_rows_in_order(monkeypatch, capsys, embedder):
    code, out = run_embed(monkeypatch, capsys, [], "A man is eating food.\nThe girl is carrying a baby.\n")
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert code == 0 and [r["index"] for r in rows] == [0, 1]
    assert rows[1]["text"] == "The girl is carrying a baby."
    expected = embedder.embed(["A man is eating food."])[0]
    assert np.allclose(rows[0]["embedding"], expected, atol=1e-6)


def test_file_to_npy_matrix(monkeypatch, capsys, tmp_path):
    src = tmp_path / "lines.txt"
    src.write_text("one\ntwo\nthree\n", encoding="utf-8")
    out = tmp_path / "vectors.npy"
    code, _ = run_embed(monkeypatch, capsys, ["--input", str(src), "--output", str(out), "--int8"])
    vectors = np.load(out)
    assert code == 0 and vectors.shape == (3, 384) and vectors.dtype == np.float32


def test_empty_lines_fail_unless_skipped(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("a\n\nb\n"))
    assert_one_line_error(capsys, ["embed"], "line 2 is empty")
    code, out = run_embed(monkeypatch, capsys, ["--skip-empty"], "a\n\nb\n")
    assert code == 0 and len(out.out.splitlines()) == 2


def test_bad_outputs_inputs_and_over_length_text_are_one_line_errors(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "stdin", io.StringIO("x\n"))
    assert_one_line_error(capsys, ["embed", "--output", str(tmp_path / "v.csv")], ".npy or .jsonl")
    assert_one_line_error(capsys, ["embed", "--input", str(tmp_path / "missing.txt")], "cannot read")
    assert_one_line_error(capsys, ["embed", "--model", str(tmp_path)], "config.json")
    monkeypatch.setattr(sys, "stdin", io.StringIO("word " * 400 + "\n"))
    assert_one_line_error(capsys, ["embed", "--no-truncate"], "at most 256")
