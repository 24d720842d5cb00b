"""`leapllm classify train` and `leapllm classify predict`: tables, JSONL out on stdin and files, and
one `leapllm: error:` line with exit 2 for every bad input."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import pytest

from leapllm.cli.main import main
from tests.cli_helpers import assert_one_line_error
from tests.encoders.conftest import write_csv, write_jsonl

LABELS = {"negative", "neutral", "positive"}


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_train_prints_the_metrics_tables_and_saves_the_folder(tiny_sentiment_rows, tmp_path, capsys):
    data = write_csv(tmp_path / "train.csv", tiny_sentiment_rows)
    test = write_jsonl(tmp_path / "test.jsonl", [{"body": r["text"], "y": r["label"]} for r in tiny_sentiment_rows[:6]])
    renamed = write_csv(tmp_path / "train2.csv", [{"body": r["text"], "y": r["label"]} for r in tiny_sentiment_rows])
    assert main(["classify", "train", "--data", str(renamed), "--text-col", "body", "--label-col", "y", "-o",
                 str(tmp_path / "model"), "--epochs", "3", "--test", str(test), "--no-progress"]) == 0
    out = capsys.readouterr().out
    for expected in ("head training on 21 examples, 3 for validation", "validation (3 examples)",
                     "test (6 examples)", "macro avg", "accuracy", "majority rate", "saved to"):
        assert expected in out
    config = json.loads((tmp_path / "model" / "classifier.json").read_text())
    assert config["hyperparameters"]["epochs"] == 3 and set(config["labels"]) == LABELS
    assert data.exists()


def test_predict_reads_stdin_lines_and_writes_jsonl(trained_classifier, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Best crew ever, thank you!\n\n   \nI hate delays\n"))
    assert main(["classify", "predict", "--model", str(trained_classifier[1])]) == 0
    rows = jsonl(capsys.readouterr().out)
    assert [r["text"] for r in rows] == ["Best crew ever, thank you!", "I hate delays"]  # blank lines skipped
    for r in rows:
        assert set(r) == {"text", "label", "score"} and r["label"] in LABELS and 1 / 3 < r["score"] <= 1


def test_predict_reads_a_text_file_and_writes_the_output_file(trained_classifier, tmp_path, capsys):
    lines = tmp_path / "texts.txt"
    lines.write_text("great flight\nlost my bag\nthe plane leaves at 6\n", encoding="utf-8")
    output = tmp_path / "predictions.jsonl"
    assert main(["classify", "predict", "--model", str(trained_classifier[1]), "--input", str(lines),
                 "--output", str(output), "--stats"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "texts/s" in captured.err
    rows = jsonl(output.read_text(encoding="utf-8"))
    assert [r["text"] for r in rows] == ["great flight", "lost my bag", "the plane leaves at 6"]


def test_predict_eval_on_a_labeled_csv_matches_the_training_report(trained_classifier, sentiment_csvs, tmp_path,
                                                                   capsys):
    report, folder = trained_classifier
    output = tmp_path / "predictions.jsonl"
    assert main(["classify", "predict", "--model", str(folder), "--input", str(sentiment_csvs[1]), "--eval",
                 "--output", str(output)]) == 0
    out = capsys.readouterr().out  # predictions went to the file, so the table comes to stdout
    assert "evaluation on" in out and f"{report['metrics']['test']['accuracy']:.3f}" in out
    assert len(jsonl(output.read_text(encoding="utf-8"))) == 120


def test_predict_on_a_jsonl_input_with_another_text_column(trained_classifier, tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", [{"tweet": "so happy with this airline"}, {"tweet": "cancelled again"}])
    assert main(["classify", "predict", "--model", str(trained_classifier[1]), "--input", str(data),
                 "--text-col", "tweet"]) == 0
    assert [r["text"] for r in jsonl(capsys.readouterr().out)] == ["so happy with this airline", "cancelled again"]


def test_predict_through_a_real_pipe(trained_classifier):
    result = subprocess.run([sys.executable, "-m", "leapllm", "classify", "predict", "--model",
                             str(trained_classifier[1])], input="what a lovely flight\n", capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    (row,) = jsonl(result.stdout)
    assert row["text"] == "what a lovely flight" and row["label"] == "positive"


# -- errors: one line, exit 2 ------------------------------------------------------------------
@pytest.fixture
def files(tmp_path, trained_classifier):
    """Good and bad inputs side by side, and a copy of the trained classifier."""
    good = [{"text": "great", "label": "positive"}, {"text": "awful", "label": "negative"},
            {"text": "lovely", "label": "positive"}, {"text": "dreadful", "label": "negative"}]
    model = tmp_path / "model"
    shutil.copytree(trained_classifier[1], model)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x.txt").write_text("x")
    texts = tmp_path / "texts.txt"
    texts.write_text("hello\n")
    return {
        "good": write_csv(tmp_path / "good.csv", good),
        "one_label": write_csv(tmp_path / "one.csv", [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}]),
        "unknown": write_csv(tmp_path / "unknown.csv", good + [{"text": "meh", "label": "bored"}]),
        "empty_text": write_csv(tmp_path / "empty.csv", good + [{"text": "", "label": "positive"}]),
        "no_label": write_csv(tmp_path / "nolabel.csv", good + [{"text": "meh", "label": ""}]),
        "model": model, "busy": busy, "texts": texts, "missing": tmp_path / "missing.csv", "dir": tmp_path,
    }


TRAIN_ERRORS = [
    (["--data", "{missing}"], "missing.csv: no such file"),
    (["--data", "{good}", "--text-col", "body"], "no text column 'body'; its columns: 'text', 'label'"),
    (["--data", "{good}", "--label-col", "y"], "no label column 'y'"),
    (["--data", "{one_label}"], "at least 2 labels, found 1 ('x')"),
    (["--data", "{empty_text}"], "line 6: text column 'text' is empty"),
    (["--data", "{no_label}"], "line 6: label column 'label' is missing a value"),
    (["--data", "{good}", "--test", "{unknown}"], "not trained on: 'bored'"),
    (["--data", "{good}", "--epochs", "0"], "epochs must be at least 1"),
    (["--data", "{good}", "--val-fraction", "0"], "validation fraction must be between 0 and 1"),
]


@pytest.mark.parametrize("args,pattern", TRAIN_ERRORS, ids=[p for _, p in TRAIN_ERRORS])
def test_train_errors_are_one_line(args, pattern, files, capsys):
    argv = ["classify", "train", *[a.format(**files) for a in args], "-o", str(files["dir"] / "new")]
    assert_one_line_error(capsys, argv, pattern)


def test_train_refuses_a_non_empty_output_folder(files, capsys):
    assert_one_line_error(capsys, ["classify", "train", "--data", str(files["good"]), "-o", str(files["busy"])],
                          "exists and is not empty; pass --force")
    assert_one_line_error(capsys, ["classify", "train", "--data", str(files["good"]), "-o", str(files["busy"]),
                                   "--force"], "refusing to replace a folder that is not a classifier")


PREDICT_ERRORS = [
    (["--model", "{dir}/nowhere"], "no such classifier folder"),
    (["--model", "{dir}"], "no classifier.json"),
    (["--model", "{model}", "--input", "{unknown}", "--eval"], "not trained on: 'bored'"),
    (["--model", "{model}", "--input", "{texts}", "--eval"], "--eval needs a .csv or .jsonl --input"),
    (["--model", "{model}", "--input", "{missing}"], "missing.csv: no such file"),
    (["--model", "{model}", "--input", "{good}", "--text-col", "tweet"], "no text column 'tweet'"),
    (["--model", "{model}", "--input", "{empty_text}"], "line 6: text column 'text' is empty"),
    (["--model", "{model}", "--input", "{texts}", "--output", "{dir}/no/such/dir/out.jsonl"], "does not exist"),
]


@pytest.mark.parametrize("args,pattern", PREDICT_ERRORS, ids=[p for _, p in PREDICT_ERRORS])
def test_predict_errors_are_one_line(args, pattern, files, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("some text\n"))
    assert_one_line_error(capsys, ["classify", "predict", *[a.format(**files) for a in args]], pattern)


def test_predict_refuses_empty_stdin_and_a_corrupt_model(files, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n  \n"))
    assert_one_line_error(capsys, ["classify", "predict", "--model", str(files["model"])],
                          "no texts to classify in stdin")
    (files["model"] / "classifier.safetensors").write_bytes(b"garbage")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert_one_line_error(capsys, ["classify", "predict", "--model", str(files["model"])],
                          "not a readable safetensors file")
