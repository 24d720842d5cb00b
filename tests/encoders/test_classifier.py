"""Text classification: training on real tweets, the report, saving and reloading, early stopping,
and a clear error for every bad input (before any encoder is loaded where possible)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from leapllm.encoders import classifier as classifier_module
from leapllm.encoders.classifier import (CONFIG_FILE, WEIGHTS_FILE, TextClassifier, read_labeled_texts,
                                         train_classifier)
from leapllm.output_files import write_folder_atomically
from leapllm.errors import InvalidRequestError, ModelLoadError
from tests.encoders.conftest import write_csv, write_jsonl

LABELS = ["negative", "neutral", "positive"]
SAMPLE_TEXTS = ["The crew were wonderful, thank you for a smooth flight!",
                "I hate this, absolutely awful customer service",
                "Flight 2217 departs at 6:40 from gate B12.",
                "Not sure how I feel about driverless cars yet"]


# -- quality and the report -------------------------------------------------------------------
def test_training_on_real_tweets_beats_the_majority_rate_on_a_held_out_split(trained_classifier):
    report, _ = trained_classifier
    test = report["metrics"]["test"]
    assert test["examples"] == 120 and test["majority_rate"] == pytest.approx(1 / 3)
    # Measured 0.575-0.667 accuracy (macro F1 0.575-0.667) over seeds 0-3; chance is 0.333.
    assert test["accuracy"] >= 0.48
    assert test["macro"]["f1"] >= 0.45


def test_report_fields_are_present_and_consistent(trained_classifier):
    report, folder = trained_classifier
    assert report["method"] == "head" and report["labels"] == LABELS and report["encoder"] == "default"
    assert (report["pooling"], report["normalize"], report["max_seq_length"]) == ("mean", True, 256)
    assert report["data"]["train_examples"] + report["data"]["val_examples"] == 180
    assert report["data"]["val_examples"] == 18  # 10% of each label, stratified
    assert report["epochs_run"] == len(report["history"]) <= report["hyperparameters"]["epochs"]
    assert 1 <= report["best_epoch"] <= report["epochs_run"]
    assert report["stopped_early"] == (report["epochs_run"] < report["hyperparameters"]["epochs"])
    # The kept weights are the best epoch's: the final validation accuracy is that epoch's.
    best = report["history"][report["best_epoch"] - 1]
    assert report["metrics"]["validation"]["accuracy"] == pytest.approx(best["val_accuracy"])
    assert best["val_loss"] <= min(h["val_loss"] for h in report["history"]) + 1e-4

    for split in ("validation", "test"):
        m = report["metrics"][split]
        assert set(m["per_class"]) == set(LABELS)
        assert sum(c["support"] for c in m["per_class"].values()) == m["examples"]
        assert sum(c["predicted"] for c in m["per_class"].values()) == m["examples"]
        for c in m["per_class"].values():
            assert 0 <= c["precision"] <= 1 and 0 <= c["recall"] <= 1
            assert min(c["precision"], c["recall"]) - 1e-9 <= c["f1"] <= max(c["precision"], c["recall"]) + 1e-9
        for key in ("precision", "recall", "f1"):
            assert m["macro"][key] == pytest.approx(np.mean([c[key] for c in m["per_class"].values()]))
        # A harmonic mean never exceeds the arithmetic one, class by class, so neither does the macro F1.
        assert m["macro"]["f1"] <= (m["macro"]["precision"] + m["macro"]["recall"]) / 2 + 1e-9
        assert m["accuracy"] == pytest.approx(
            sum(c["recall"] * c["support"] for c in m["per_class"].values()) / m["examples"])

    saved = json.loads((folder / CONFIG_FILE).read_text())
    assert saved == {k: v for k, v in report.items() if k != "out_dir"}
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]


# -- saving and reloading ---------------------------------------------------------------------
def test_saved_folder_reloads_with_identical_deterministic_predictions(trained_classifier, sentiment_csvs):
    report, folder = trained_classifier
    first, second = TextClassifier.load(folder), TextClassifier.load(folder)
    assert first.labels == LABELS
    probabilities = first.predict_proba(SAMPLE_TEXTS)
    assert probabilities.shape == (len(SAMPLE_TEXTS), 3) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(1), 1, atol=1e-6)
    np.testing.assert_array_equal(probabilities, first.predict_proba(SAMPLE_TEXTS))
    np.testing.assert_array_equal(probabilities, second.predict_proba(SAMPLE_TEXTS))

    # Before reload (the report, made by the model in memory) and after: the same test predictions.
    test = read_labeled_texts(sentiment_csvs[1], "text", "label")
    assert first.evaluate(test.texts, test.labels) == report["metrics"]["test"]


def test_predict_gives_the_label_its_score_and_every_probability(trained_classifier):
    classifier = TextClassifier.load(trained_classifier[1])
    results = classifier.predict(SAMPLE_TEXTS[:2])
    assert [r["label"] for r in results] == ["positive", "negative"]  # measured 0.88 and 0.71
    for r in results:
        assert set(r) == {"label", "score", "scores"} and list(r["scores"]) == LABELS
        assert r["score"] == max(r["scores"].values()) == r["scores"][r["label"]]
        assert sum(r["scores"].values()) == pytest.approx(1, abs=1e-6)
    assert classifier.predict([]) == [] and classifier.predict_proba([]).shape == (0, 3)


def test_int8_classifier_agrees_with_float32(trained_classifier):
    folder = trained_classifier[1]
    full, int8 = TextClassifier.load(folder), TextClassifier.load(folder, quantize="int8")
    np.testing.assert_allclose(int8.predict_proba(SAMPLE_TEXTS), full.predict_proba(SAMPLE_TEXTS), atol=0.08)


def test_same_seed_retrains_the_same_head_and_a_failed_save_leaves_no_folder(tiny_sentiment_rows, tmp_path,
                                                                              monkeypatch):
    data = write_csv(tmp_path / "tiny.csv", tiny_sentiment_rows)
    a = train_classifier(data, "text", "label", tmp_path / "a", epochs=4, seed=3, progress=False)
    b = train_classifier(data, "text", "label", tmp_path / "b", epochs=4, seed=3, progress=False)
    assert (tmp_path / "a" / WEIGHTS_FILE).read_bytes() == (tmp_path / "b" / WEIGHTS_FILE).read_bytes()
    assert a["history"] == b["history"]

    def save_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(classifier_module, "save_file", save_then_fail)
    with pytest.raises(InvalidRequestError, match="No space left on device"):
        train_classifier(data, "text", "label", tmp_path / "c", epochs=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "tiny.csv"]  # no c, no temp folder


def test_a_failed_forced_save_keeps_the_old_classifier_intact(trained_classifier, tiny_sentiment_rows, tmp_path,
                                                              monkeypatch):
    old = tmp_path / "model"
    shutil.copytree(trained_classifier[1], old)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    data = write_csv(tmp_path / "tiny.csv", tiny_sentiment_rows)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(classifier_module.json, "dumps", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(data, "text", "label", old, epochs=1, force=True, progress=False)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "tiny.csv"]


def test_atomic_folder_write_replaces_the_old_folder_only_when_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    write_folder_atomically(out, lambda folder: (folder / "new.txt").write_text("new"))
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the old copy is gone too

    def half(folder):
        (folder / "part.txt").write_text("part")
        raise RuntimeError("disk pulled")

    with pytest.raises(RuntimeError):
        write_folder_atomically(out, half)
    assert [p.name for p in out.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_over_long_training_texts_are_cut_with_one_warning_for_the_set(tiny_sentiment_rows, tmp_path, caplog):
    rows = [{"text": " ".join([r["text"]] * 20), "label": r["label"]} for r in tiny_sentiment_rows[:12]]
    data = write_csv(tmp_path / "long.csv", rows)
    with caplog.at_level("WARNING", logger="leapllm.encoders"):
        train_classifier(data, "text", "label", tmp_path / "m", epochs=1, val_fraction=0.25, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"9 of 9 texts in {data} are longer than 256 tokens and were cut",
                        f"3 of 3 texts in {data} (validation split) are longer than 256 tokens and were cut"]


# -- early stopping ---------------------------------------------------------------------------
@pytest.fixture
def noise_labeled_csv(tiny_sentiment_rows, tmp_path):
    """Real tweets with labels that say nothing about them: validation cannot improve for long."""
    rows = [{"text": r["text"], "label": "ab"[i % 2]} for i, r in enumerate(tiny_sentiment_rows)]
    return write_csv(tmp_path / "noise.csv", rows)


def test_early_stopping_stops_once_validation_loss_stops_improving(noise_labeled_csv, tmp_path):
    report = train_classifier(noise_labeled_csv, "text", "label", tmp_path / "m", epochs=60, lr=0.05,
                              patience=2, val_fraction=0.25, progress=False)
    assert report["stopped_early"] and report["epochs_run"] < 60
    assert report["epochs_run"] == report["best_epoch"] + 2
    losses = [h["val_loss"] for h in report["history"]]
    assert losses[report["best_epoch"] - 1] <= min(losses) + 1e-4


def test_patience_zero_runs_every_epoch_and_keeps_the_most_accurate(noise_labeled_csv, tmp_path):
    report = train_classifier(noise_labeled_csv, "text", "label", tmp_path / "m", epochs=6, lr=0.05, patience=0,
                              monitor="accuracy", val_fraction=0.25, progress=False)
    assert report["epochs_run"] == 6 and not report["stopped_early"]
    accuracies = [h["val_accuracy"] for h in report["history"]]
    assert accuracies[report["best_epoch"] - 1] == max(accuracies)
    assert report["best_epoch"] == accuracies.index(max(accuracies)) + 1  # the first of equals
    assert report["metrics"]["validation"]["accuracy"] == pytest.approx(max(accuracies))


# -- bad input --------------------------------------------------------------------------------
GOOD_ROWS = [{"text": "great flight", "label": "positive"}, {"text": "lost my bag", "label": "negative"},
             {"text": "on time again", "label": "positive"}, {"text": "two hour delay", "label": "negative"}]


@pytest.fixture
def no_encoder(monkeypatch):
    """Fails the test if training gets as far as loading the encoder: bad input must be caught first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the encoder was loaded before the input was checked")

    monkeypatch.setattr(classifier_module, "Embedder", refuse)


def bad_data(tmp_path, case):
    """(data path, keyword arguments, expected message) for one kind of bad training input."""
    if case == "missing file":
        return tmp_path / "missing.csv", {}, "no such file"
    if case == "unknown format":
        return write_csv(tmp_path / "data.tsv", GOOD_ROWS), {}, "use .csv"
    if case == "no text column":
        return (write_csv(tmp_path / "d.csv", GOOD_ROWS), {"text_col": "body"},
                "no text column 'body'; its columns: 'text', 'label'")
    if case == "no label column in jsonl":
        return (write_jsonl(tmp_path / "d.jsonl", GOOD_ROWS), {"label_col": "y"},
                "no label column 'y'; its columns: 'text', 'label'")
    if case == "empty text":
        rows = GOOD_ROWS[:2] + [{"text": "   ", "label": "positive"}]
        return write_csv(tmp_path / "d.csv", rows), {}, "line 4: text column 'text' is empty"
    if case == "non-string text":
        rows = GOOD_ROWS + [{"text": 42, "label": "x"}]
        return write_jsonl(tmp_path / "d.jsonl", rows), {}, "line 5: 'text' is not a string"
    if case == "missing label":
        rows = GOOD_ROWS + [{"text": "meh", "label": ""}]
        return write_csv(tmp_path / "d.csv", rows), {}, "line 6: label column 'label' is missing a value"
    if case == "null label in jsonl":
        return write_jsonl(tmp_path / "d.jsonl", GOOD_ROWS + [{"text": "meh", "label": None}]), {}, "missing a value"
    if case == "one label":
        rows = [{"text": r["text"], "label": "positive"} for r in GOOD_ROWS]
        return write_csv(tmp_path / "d.csv", rows), {}, "at least 2 labels, found 1 ('positive')"
    if case == "no rows":
        return write_csv(tmp_path / "d.csv", [], ["text", "label"]), {}, "has no rows"
    if case == "bad json":
        path = tmp_path / "d.jsonl"
        path.write_text('{"text": "a", "label": "b"}\n{"text": oops}\n')
        return path, {}, "line 2: not valid JSON"
    if case == "not utf-8":
        path = tmp_path / "d.csv"
        path.write_bytes("text,label\ncaf\xe9,x\n".encode("latin-1"))
        return path, {}, "not UTF-8"
    if case == "unknown validation labels":
        val = write_csv(tmp_path / "val.csv", [{"text": "so so", "label": "neutral"},
                                               {"text": "meh", "label": "bored"}])
        return write_csv(tmp_path / "d.csv", GOOD_ROWS), {"val": val}, "not trained on: 'bored', 'neutral'"
    if case == "unknown test labels":
        test = write_csv(tmp_path / "test.csv", [{"text": "so so", "label": "neutral"}])
        return write_csv(tmp_path / "d.csv", GOOD_ROWS), {"test": test}, "not trained on: 'neutral'"
    if case == "too few rows to validate":
        rows = [{"text": "great", "label": "positive"}, {"text": "awful", "label": "negative"}]
        return write_csv(tmp_path / "d.csv", rows), {}, "too few rows to hold out a validation split"
    if case == "bad settings":
        return (write_csv(tmp_path / "d.csv", GOOD_ROWS), {"epochs": 0, "val_fraction": 1.5},
                "epochs must be at least 1, got 0; validation fraction must be between 0 and 1, got 1.5")
    raise ValueError(case)


BAD_DATA = ["missing file", "unknown format", "no text column", "no label column in jsonl", "empty text",
            "non-string text", "missing label", "null label in jsonl", "one label", "no rows", "bad json",
            "not utf-8", "unknown validation labels", "unknown test labels", "too few rows to validate", "bad settings"]


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_training_data_is_refused_before_loading_the_encoder(case, tmp_path, no_encoder):
    data, kwargs, message = bad_data(tmp_path, case)
    kwargs = {"text_col": "text", "label_col": "label", **kwargs}
    with pytest.raises(InvalidRequestError) as error:
        train_classifier(data, kwargs.pop("text_col"), kwargs.pop("label_col"), tmp_path / "out", progress=False,
                         **kwargs)
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()


def test_an_output_folder_with_files_needs_force_and_force_replaces_only_a_classifier(tmp_path, no_encoder):
    data = write_csv(tmp_path / "d.csv", GOOD_ROWS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InvalidRequestError, match="exists and is not empty; pass --force"):
        train_classifier(data, "text", "label", out, progress=False)
    with pytest.raises(InvalidRequestError, match="holds no classifier.json; refusing"):
        train_classifier(data, "text", "label", out, force=True, progress=False)
    with pytest.raises(InvalidRequestError, match="is not a folder"):
        train_classifier(data, "text", "label", tmp_path / "d.csv", progress=False)
    assert (out / "notes.txt").read_text() == "mine"


def corrupt(folder, case):
    """Damage a copy of a classifier folder in one way; returns the expected message."""
    config_path = folder / CONFIG_FILE
    config = json.loads(config_path.read_text())
    if case == "no config":
        config_path.unlink()
        return "no classifier.json"
    if case == "config not json":
        config_path.write_text("{not json")
        return "not readable JSON"
    if case == "wrong format":
        config_path.write_text(json.dumps({**config, "format": "something-else"}))
        return "not a leapllm classifier"
    if case == "one label":
        config_path.write_text(json.dumps({**config, "labels": ["positive"]}))
        return "at least 2 distinct strings"
    if case == "no weights":
        (folder / WEIGHTS_FILE).unlink()
        return "no classifier.safetensors"
    if case == "corrupt weights":
        (folder / WEIGHTS_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad")
        return "not a readable safetensors file"
    if case == "labels do not match the head":
        config_path.write_text(json.dumps({**config, "labels": config["labels"] + ["sarcastic"]}))
        return "tensor head.weight has shape (3, 384), expected (4, 384)"
    if case == "fine-tuned without encoder weights":
        config_path.write_text(json.dumps({**config, "method": "finetune"}))
        return "missing tensor encoder."
    raise ValueError(case)


@pytest.mark.parametrize("case", ["no config", "config not json", "wrong format", "one label", "no weights",
                                  "corrupt weights", "labels do not match the head",
                                  "fine-tuned without encoder weights"])
def test_a_corrupt_classifier_folder_is_a_clear_load_error(case, trained_classifier, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(trained_classifier[1], folder)
    message = corrupt(folder, case)
    with pytest.raises(ModelLoadError) as error:
        TextClassifier.load(folder)
    assert message in str(error.value)


def test_a_missing_classifier_folder_is_a_clear_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such classifier folder"):
        TextClassifier.load(tmp_path / "nowhere")


def test_predict_and_evaluate_refuse_empty_texts_and_unknown_labels(trained_classifier):
    classifier = TextClassifier.load(trained_classifier[1])
    with pytest.raises(InvalidRequestError, match="input 1 is empty"):
        classifier.predict(["fine", ""])
    with pytest.raises(InvalidRequestError, match="not trained on: 'bored', 'sarcastic'"):
        classifier.evaluate(["a", "b", "c"], ["positive", "sarcastic", "bored"])
