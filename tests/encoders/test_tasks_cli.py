"""`leapllm qa`, `leapllm ner` and `leapllm classify predict` on a fine-tuned folder: JSON lines equal to
the library's answers, and one `leapllm: error:` line with exit 2 for bad input."""

from __future__ import annotations

import io
import json
import sys

import pytest

from leapllm.cli.main import main
from leapllm.encoders.task_heads import load_task
from tests.cli_helpers import assert_one_line_error
from tests.encoders.tiny_task_models import CLASSIFY_TEXTS, CONTEXT, NER_TEXTS, one_torch_thread, task_folder


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def context_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("qa") / "context.txt"
    path.write_text(CONTEXT, encoding="utf-8")
    return path


def test_qa_answers_each_question_as_one_json_line(context_file, capsys):
    folder = task_folder("roberta", "question-answering")[0]
    questions = ["Where was Marie Curie born?", "Who was her husband?"]
    assert main(["qa", "--model", str(folder), "--context", str(context_file), *questions, "--top-k", "2"]) == 0
    rows = jsonl(capsys.readouterr().out)
    expected = load_task(folder).answer(questions, [CONTEXT], top_k=2)
    assert [r["question"] for r in rows] == questions
    for row, answers in zip(rows, expected, strict=True):
        assert row["answers"] == answers
        assert {k: row[k] for k in ("answer", "score", "start", "end")} == answers[0]


def test_ner_reads_stdin_lines_and_writes_entities(monkeypatch, capsys):
    folder = task_folder("bert", "token-classification")[0]
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{NER_TEXTS[0]}\n\n{NER_TEXTS[2]}\n"))
    assert main(["ner", "--model", str(folder), "--aggregation", "first"]) == 0
    rows = jsonl(capsys.readouterr().out)
    expected = load_task(folder)([NER_TEXTS[0], NER_TEXTS[2]], aggregation_strategy="first")
    assert rows == [{"text": t, "entities": e} for t, e in zip([NER_TEXTS[0], NER_TEXTS[2]], expected, strict=True)]


def test_classify_predict_takes_a_fine_tuned_folder_and_text_arguments(capsys):
    folder = task_folder("distilbert", "text-classification")[0]
    assert main(["classify", "predict", "--model", str(folder), *CLASSIFY_TEXTS[:3], "--top-k", "2"]) == 0
    rows = jsonl(capsys.readouterr().out)
    expected = load_task(folder).classify(CLASSIFY_TEXTS[:3], top_k=2)
    assert [r["text"] for r in rows] == CLASSIFY_TEXTS[:3]
    for row, ranked in zip(rows, expected, strict=True):
        assert row["labels"] == ranked and (row["label"], row["score"]) == (ranked[0]["label"], ranked[0]["score"])


@pytest.mark.parametrize("argv, pattern", [
    (["qa", "--model", "{qa}", "--context", "{missing}", "Where?"], "no such file"),
    (["qa", "--model", "{qa}", "--context", "{context}", "Where?", "--top-k", "0"], "top_k must be at least 1"),
    (["qa", "--model", "{ner}", "--context", "{context}", "Where?"], "a token-classification model"),
    (["ner", "--model", "{ner}", "Paris", "--aggregation", "none", "--stride", "8"], "stride reads long texts"),
    (["ner", "--model", "{ner}", "Paris", "--input", "{context}"], "not both"),
    (["classify", "predict", "--model", "{qa}", "Paris"], "a question-answering model"),
])
def test_bad_input_is_one_line_and_exit_2(argv, pattern, context_file, tmp_path, capsys):
    paths = {"qa": task_folder("bert", "question-answering")[0], "ner": task_folder("bert", "token-classification")[0],
             "context": context_file, "missing": tmp_path / "missing.txt"}
    assert_one_line_error(capsys, [a.format(**paths) for a in argv], pattern)
