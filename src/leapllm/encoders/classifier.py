"""Text classification on sentence embeddings: train a head (and optionally the encoder), save, load, predict.

    report = train_classifier("train.csv", "text", "label", "out/sentiment")
    classifier = TextClassifier.load("out/sentiment")
    classifier.predict(["the flight was great"])
    # [{"label": "positive", "score": 0.93, "scores": {"negative": 0.02, "neutral": 0.05, "positive": 0.93}}]

The head is one linear layer on the pooled (and, for all-MiniLM-L6-v2, normalized) sentence
embedding; softmax over it gives the label probabilities. Head-only training (the default) runs
the frozen encoder once over every text and trains the head on the cached vectors, so an epoch
costs almost nothing. With finetune_encoder=True every batch also runs the encoder forward and
backward, and the encoder learns at a much lower rate than the head (AdamW, two parameter groups).

Validation: a stratified `val_fraction` of the training rows, or a separate file. After each epoch
the validation loss (or accuracy) is checked; training stops once it has not improved for
`patience` epochs, and the best epoch's weights are the ones kept.

A classifier folder holds two files, written together into a temporary folder next to the target
and renamed into place, so an interrupted save never leaves a half folder:
  classifier.json         format, method, labels (in output order), base encoder ("default" or
                          a path), pooling, normalize, max_seq_length, hyperparameters, metrics
  classifier.safetensors  head.weight (labels x dim), head.bias, and when the encoder was fine-tuned
                          every encoder tensor as encoder.<our parameter name>

Data files are CSV (header row) or JSONL (one object per line), chosen by extension; the text and
label columns are named by the caller. Every user mistake raises InvalidRequestError (bad data,
settings, output folder) or ModelLoadError (a missing or corrupt classifier folder).
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from leapllm.encoders.embedder import Embedder
from leapllm.errors import InvalidRequestError, ModelLoadError
from leapllm.loading.encoder_loader import load_encoder
from leapllm.output_files import write_folder_atomically

FORMAT = "leapllm-text-classifier"
FORMAT_VERSION = 1
CONFIG_FILE = "classifier.json"
WEIGHTS_FILE = "classifier.safetensors"
TABLE_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
MONITORS = ("loss", "accuracy")
# Head-only epochs are nearly free, fine-tuning epochs are not: each method has its own defaults.
DEFAULTS = {"head": {"epochs": 30, "lr": 1e-2}, "finetune": {"epochs": 3, "lr": 1e-3}}
DEFAULT_ENCODER_LR = 2e-5
MIN_LOSS_DELTA = 1e-4  # a validation loss must drop by more than this to count as an improvement
EMBED_CHUNK = 256  # texts per progress-bar step while embedding

log = logging.getLogger("leapllm.encoders")


# -- reading data ------------------------------------------------------------------------------
@dataclass
class LabeledTexts:
    texts: list[str]
    labels: list[str] | None  # None when no label column was asked for
    source: str


def _rows(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """(column names, [(line number, row dict)]) of a CSV or JSONL file."""
    kind = TABLE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise InvalidRequestError(f"{path}: unknown data format {path.suffix or '(no extension)'!r}; "
                                  "use .csv (with a header row) or .jsonl")
    if not path.is_file():
        raise InvalidRequestError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if kind == "csv":
                reader = csv.DictReader(f)
                columns = list(reader.fieldnames or [])
                rows = [(reader.line_num, row) for row in reader]
            else:
                columns, rows = [], []
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise InvalidRequestError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
                    if not isinstance(row, dict):
                        raise InvalidRequestError(f"{path}, line {number}: expected a JSON object per line")
                    columns += [key for key in row if key not in columns]
                    rows.append((number, row))
    except UnicodeDecodeError:
        raise InvalidRequestError(f"{path}: not UTF-8 text") from None
    except csv.Error as exc:
        raise InvalidRequestError(f"{path}: malformed CSV ({exc})") from None
    except OSError as exc:
        raise InvalidRequestError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return columns, rows


def _label_text(value) -> str | None:
    """A label cell as a string; None when missing (empty, null, NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (dict, list)):
        raise TypeError("a label is a string or a number")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON 1.0 and 1 are the same label
    text = str(value).strip()
    return text or None


def read_labeled_texts(path: str | Path, text_col: str, label_col: str | None = None) -> LabeledTexts:
    """Texts (and labels) from a CSV or JSONL file; every problem names the file, line and column."""
    path = Path(path)
    columns, rows = _rows(path)
    for role, column in (("text", text_col), ("label", label_col)):
        if column is not None and column not in columns:
            raise InvalidRequestError(f"{path} has no {role} column {column!r}; its columns: "
                                      + (", ".join(repr(c) for c in columns) or "none"))
    if not rows:
        raise InvalidRequestError(f"{path} has no rows")
    texts, labels = [], []
    for number, row in rows:
        text = row.get(text_col)
        if text is not None and not isinstance(text, str):
            raise InvalidRequestError(f"{path}, line {number}: {text_col!r} is not a string")
        if text is None or not text.strip():
            raise InvalidRequestError(f"{path}, line {number}: text column {text_col!r} is empty")
        texts.append(text)
        if label_col is not None:
            try:
                label = _label_text(row.get(label_col))
            except TypeError as exc:
                raise InvalidRequestError(f"{path}, line {number}: {exc}, not {row[label_col]!r}") from None
            if label is None:
                raise InvalidRequestError(f"{path}, line {number}: label column {label_col!r} is missing a value")
            labels.append(label)
    return LabeledTexts(texts, labels if label_col is not None else None, str(path))


def check_known_labels(labels: Sequence[str], known: Sequence[str], source: str) -> None:
    unknown = sorted(set(labels) - set(known))
    if unknown:
        raise InvalidRequestError(f"{source} has labels the classifier was not trained on: "
                                  f"{', '.join(map(repr, unknown))} (known: {', '.join(map(repr, known))})")


# -- metrics -----------------------------------------------------------------------------------
def classification_metrics(true: Sequence[int], predicted: Sequence[int], labels: Sequence[str]) -> dict:
    """Accuracy, per-class and macro precision / recall / F1. Macro averages run over the labels that
    occur in `true` or `predicted` (as scikit-learn does); a 0/0 ratio counts as 0."""
    true, predicted = np.asarray(true), np.asarray(predicted)
    per_class = {}
    for index, label in enumerate(labels):
        hits = int(((predicted == index) & (true == index)).sum())
        n_predicted, support = int((predicted == index).sum()), int((true == index).sum())
        precision = hits / n_predicted if n_predicted else 0.0
        recall = hits / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support,
                            "predicted": n_predicted}
    present = [m for m in per_class.values() if m["support"] or m["predicted"]]
    macro = {key: float(np.mean([m[key] for m in present])) if present else 0.0
             for key in ("precision", "recall", "f1")}
    counts = Counter(true.tolist())
    return {
        "examples": len(true),
        "accuracy": float((true == predicted).mean()) if len(true) else 0.0,
        "majority_rate": max(counts.values()) / len(true) if len(true) else 0.0,
        "macro": macro,
        "per_class": per_class,
    }


# -- the output folder -------------------------------------------------------------------------
def check_output_folder(out_dir: str | Path, force: bool) -> Path:
    """Refuse an output folder that would lose data: an existing non-empty folder needs force, and
    even then only a classifier folder (one with classifier.json) is replaced."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InvalidRequestError(f"output {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise InvalidRequestError(f"output folder {str(out)!r} exists and is not empty; "
                                      "pass --force (force=True) to replace it")
        if not (out / CONFIG_FILE).is_file():
            raise InvalidRequestError(f"output folder {str(out)!r} is not empty and holds no {CONFIG_FILE}; "
                                      "refusing to replace a folder that is not a classifier, even with --force")
    ancestor = out.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise InvalidRequestError(f"cannot write output folder {str(out)!r}: {str(ancestor)!r} is not writable")
    return out


# -- training ----------------------------------------------------------------------------------
def _progress(iterable=None, *, enabled: bool, **kwargs):
    return tqdm(iterable, disable=not enabled, dynamic_ncols=True, leave=False, **kwargs)


def _embed(embedder: Embedder, ids: list[list[int]], desc: str, progress: bool) -> torch.Tensor:
    """(n, dim) float32 embeddings, in chunks so that a progress bar can follow."""
    out = []
    with _progress(total=len(ids), desc=desc, unit="text", enabled=progress) as bar:
        for start in range(0, len(ids), EMBED_CHUNK):
            chunk = ids[start:start + EMBED_CHUNK]
            out.append(torch.from_numpy(embedder.embed_ids(chunk)))
            bar.update(len(chunk))
    return torch.cat(out) if out else torch.empty(0, embedder.dimension)


class _CountRecords(logging.Filter):
    """Counts, and holds back, the records of a logger."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        self.count += 1
        return False


def _tokenize(embedder: Embedder, data: LabeledTexts) -> list[list[int]]:
    """Token ids of every text, cut to the encoder's limit; one warning for the whole set, not one a text."""
    truncations = _CountRecords()
    log.addFilter(truncations)
    try:
        ids = embedder.tokenize(data.texts, truncate=True)
    finally:
        log.removeFilter(truncations)
    if truncations.count:
        log.warning("%d of %d texts in %s are longer than %d tokens and were cut", truncations.count,
                    len(ids), data.source, embedder.max_tokens)
    return ids


def stratified_split(labels: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, validation indices): `fraction` of every label's rows, at least one per label
    that has two or more rows (a label with one row stays in training)."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    train, val = [], []
    for label in sorted(by_label):
        indices = by_label[label]
        rng.shuffle(indices)
        n_val = min(max(round(fraction * len(indices)), 1), len(indices) - 1)
        val += indices[:n_val]
        train += indices[n_val:]
    return sorted(train), sorted(val)


def _check_settings(epochs, lr, encoder_lr, batch_size, val_fraction, patience, monitor) -> None:
    problems = []
    if epochs < 1:
        problems.append(f"epochs must be at least 1, got {epochs}")
    if not lr > 0 or not encoder_lr > 0:
        problems.append(f"learning rates must be positive, got lr={lr}, encoder_lr={encoder_lr}")
    if batch_size < 1:
        problems.append(f"batch size must be at least 1, got {batch_size}")
    if val_fraction is not None and not 0 < val_fraction < 1:
        problems.append(f"validation fraction must be between 0 and 1, got {val_fraction}")
    if patience < 0:
        problems.append(f"patience must be 0 (no early stopping) or more, got {patience}")
    if monitor not in MONITORS:
        problems.append(f"monitor must be one of {', '.join(MONITORS)}, got {monitor!r}")
    if problems:
        raise InvalidRequestError("; ".join(problems))


class _EarlyStopping:
    """Keeps the best epoch by validation loss (lower) or accuracy (higher)."""

    def __init__(self, monitor: str, patience: int):
        self.monitor, self.patience = monitor, patience
        self.best_epoch, self.best_value = 0, None

    def improved(self, epoch: int, val_loss: float, val_accuracy: float) -> bool:
        if self.monitor == "loss":
            better = self.best_value is None or val_loss < self.best_value - MIN_LOSS_DELTA
            value = val_loss
        else:
            better = self.best_value is None or val_accuracy > self.best_value
            value = val_accuracy
        if better:
            self.best_epoch, self.best_value = epoch, value
        return better

    def should_stop(self, epoch: int) -> bool:
        return self.patience > 0 and epoch - self.best_epoch >= self.patience


def _evaluate_head(head: nn.Linear, vectors: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, list[int]]:
    """(mean cross-entropy, accuracy, predicted indices) of the head on ready-made vectors."""
    device = head.weight.device
    with torch.no_grad():
        logits = head(vectors.to(device))
        targets = targets.to(device)
        predicted = logits.argmax(1)
        return (F.cross_entropy(logits, targets).item(), (predicted == targets).float().mean().item(),
                predicted.tolist())


def train_classifier(data: str | Path, text_col: str, label_col: str, out_dir: str | Path, *,
                     encoder: str | Path | None = None, epochs: int | None = None, lr: float | None = None,
                     encoder_lr: float = DEFAULT_ENCODER_LR, batch_size: int = 32,
                     val_fraction: float | None = 0.1, val: str | Path | None = None,
                     test: str | Path | None = None, patience: int = 3, monitor: str = "loss",
                     finetune_encoder: bool = False, seed: int = 0, force: bool = False,
                     device: str = "cpu", progress: bool = True) -> dict:
    """Train a classifier on `data` (CSV or JSONL), save it to `out_dir`, return the report.

    epochs and lr default by method: 30 epochs at 1e-2 for head-only training, 3 epochs with a
    head lr of 1e-3 (and encoder_lr 2e-5 for the encoder) for fine-tuning. `val` (a file) replaces
    the `val_fraction` split. `test` is scored once, with the kept weights. patience 0 disables early
    stopping. Inputs, settings and the output folder are all checked before the encoder is loaded.
    """
    method = "finetune" if finetune_encoder else "head"
    epochs = DEFAULTS[method]["epochs"] if epochs is None else epochs
    lr = DEFAULTS[method]["lr"] if lr is None else lr
    if val is not None:
        val_fraction = None
    _check_settings(epochs, lr, encoder_lr, batch_size, val_fraction, patience, monitor)
    out = check_output_folder(out_dir, force)

    train_set = read_labeled_texts(data, text_col, label_col)
    labels = sorted(set(train_set.labels))
    if len(labels) < 2:
        raise InvalidRequestError(f"{train_set.source}: a classifier needs at least 2 labels, found "
                                  f"{len(labels)} ({', '.join(map(repr, labels))}) in column {label_col!r}")
    if val is not None:
        val_set = read_labeled_texts(val, text_col, label_col)
        check_known_labels(val_set.labels, labels, val_set.source)
    else:
        train_idx, val_idx = stratified_split(train_set.labels, val_fraction, seed)
        if not val_idx:
            raise InvalidRequestError(f"{train_set.source}: too few rows to hold out a validation split (a label "
                                      "needs 2 rows to give one away); add rows or pass a validation file")
        val_set = LabeledTexts([train_set.texts[i] for i in val_idx], [train_set.labels[i] for i in val_idx],
                               f"{train_set.source} (validation split)")
        train_set = LabeledTexts([train_set.texts[i] for i in train_idx], [train_set.labels[i] for i in train_idx],
                                 train_set.source)
    test_set = None
    if test is not None:
        test_set = read_labeled_texts(test, text_col, label_col)
        check_known_labels(test_set.labels, labels, test_set.source)

    started = time.perf_counter()
    embedder = Embedder(encoder, device=device)
    # Tokenize everything now: an over-long text is cut the same way at predict time.
    train_ids, val_ids = _tokenize(embedder, train_set), _tokenize(embedder, val_set)
    test_ids = _tokenize(embedder, test_set) if test_set else None
    index_of = {label: i for i, label in enumerate(labels)}
    train_y = torch.tensor([index_of[x] for x in train_set.labels])
    val_y = torch.tensor([index_of[x] for x in val_set.labels])

    # Head-only training works on cached CPU vectors; fine-tuning keeps the head beside the encoder.
    head_device = embedder.model.device if finetune_encoder else torch.device("cpu")
    with torch.random.fork_rng(devices=[]):  # seed the head's init without touching the caller's RNG
        torch.manual_seed(seed)
        head = nn.Linear(embedder.dimension, len(labels)).to(head_device)
    shuffler = torch.Generator().manual_seed(seed)
    stopper = _EarlyStopping(monitor, patience)
    history = []

    settings = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "shuffler": shuffler, "stopper": stopper,
                "history": history, "progress": progress}
    if finetune_encoder:
        best_state = _finetune(embedder, head, train_ids, train_y, val_ids, val_y, encoder_lr=encoder_lr, **settings)
        val_vectors = None  # the encoder changed since validation vectors were last made
    else:
        best_state, val_vectors = _train_head(embedder, head, train_ids, train_y, val_ids, val_y, **settings)
    head.load_state_dict(best_state["head"])
    if finetune_encoder:
        embedder.model.load_state_dict(best_state["encoder"])

    if val_vectors is None:
        val_vectors = _embed(embedder, val_ids, "embedding validation", progress)
    _, _, val_pred = _evaluate_head(head, val_vectors, val_y)
    metrics = {"validation": classification_metrics(val_y.tolist(), val_pred, labels), "test": None}
    if test_set is not None:
        test_y = torch.tensor([index_of[x] for x in test_set.labels])
        _, _, test_pred = _evaluate_head(head, _embed(embedder, test_ids, "embedding test", progress), test_y)
        metrics["test"] = classification_metrics(test_y.tolist(), test_pred, labels)
    train_seconds = time.perf_counter() - started

    loaded = embedder.loaded
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "method": method, "labels": labels,
        "encoder": "default" if encoder is None else str(Path(encoder).absolute()),
        "encoder_name": loaded.name, "dimension": embedder.dimension,
        "pooling": loaded.pooling, "normalize": loaded.normalize, "max_seq_length": loaded.max_seq_length,
        "text_col": text_col, "label_col": label_col,
        "hyperparameters": {"epochs": epochs, "lr": lr, "encoder_lr": encoder_lr if finetune_encoder else None,
                            "batch_size": batch_size, "val_fraction": val_fraction,
                            "val": None if val is None else str(val), "patience": patience, "monitor": monitor,
                            "seed": seed},
        "data": {"train": train_set.source, "train_examples": len(train_set.texts),
                 "val_examples": len(val_set.texts), "test": None if test_set is None else test_set.source,
                 "test_examples": None if test_set is None else len(test_set.texts)},
        "epochs_run": len(history), "best_epoch": stopper.best_epoch,
        "stopped_early": len(history) < epochs, "train_seconds": round(train_seconds, 3),
        "history": history, "metrics": metrics,
    }
    tensors = {"head.weight": head.weight, "head.bias": head.bias}
    if finetune_encoder:
        tensors.update({f"encoder.{k}": v for k, v in embedder.model.state_dict().items()})
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}

    def write_files(folder: Path) -> None:
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    write_folder_atomically(out, write_files)
    return {**config, "out_dir": str(out)}


def _train_head(embedder, head, train_ids, train_y, val_ids, val_y, *, epochs, lr, batch_size, shuffler,
                stopper, history, progress):
    """Head-only: embed once, then epochs over the cached vectors. Returns (best state, validation vectors)."""
    train_x = _embed(embedder, train_ids, "embedding train", progress)
    val_x = _embed(embedder, val_ids, "embedding validation", progress)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    best_state = {"head": copy.deepcopy(head.state_dict())}
    with _progress(range(1, epochs + 1), desc="training head", unit="epoch", enabled=progress) as bar:
        for epoch in bar:
            order = torch.randperm(len(train_y), generator=shuffler)
            total = 0.0
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                loss = F.cross_entropy(head(train_x[batch]), train_y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(batch)
            val_loss, val_acc, _ = _evaluate_head(head, val_x, val_y)
            history.append({"epoch": epoch, "train_loss": total / len(order), "val_loss": val_loss,
                            "val_accuracy": val_acc})
            bar.set_postfix(val_loss=f"{val_loss:.4f}", val_acc=f"{val_acc:.3f}")
            if stopper.improved(epoch, val_loss, val_acc):
                best_state = {"head": copy.deepcopy(head.state_dict())}
            if stopper.should_stop(epoch):
                break
    return best_state, val_x


def _finetune(embedder, head, train_ids, train_y, val_ids, val_y, *, epochs, lr, encoder_lr, batch_size, shuffler,
              stopper, history, progress):
    """Encoder and head together; every batch runs the encoder forward and backward. Returns the best state."""
    model = embedder.model
    model.requires_grad_(True)
    optimizer = torch.optim.AdamW([{"params": model.parameters(), "lr": encoder_lr},
                                   {"params": head.parameters(), "lr": lr}], weight_decay=0.01)

    def snapshot():
        return {"head": copy.deepcopy(head.state_dict()),
                "encoder": {k: v.detach().clone() for k, v in model.state_dict().items()}}

    best_state = snapshot()
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(train_y), generator=shuffler).tolist()
        total = 0.0
        with _progress(range(0, len(order), batch_size), desc=f"fine-tuning epoch {epoch}/{epochs}", unit="batch",
                       enabled=progress) as bar:
            for start in bar:
                batch = order[start:start + batch_size]
                vectors = embedder.pooled([train_ids[i] for i in batch])
                loss = F.cross_entropy(head(vectors), train_y[batch].to(vectors.device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(batch)
                bar.set_postfix(loss=f"{loss.item():.4f}")
        model.eval()
        val_loss, val_acc, _ = _evaluate_head(head, _embed(embedder, val_ids, "validating", progress), val_y)
        history.append({"epoch": epoch, "train_loss": total / len(order), "val_loss": val_loss,
                        "val_accuracy": val_acc})
        if progress:
            tqdm.write(f"epoch {epoch}: train loss {total / len(order):.4f}, val loss {val_loss:.4f}, "
                       f"val accuracy {val_acc:.3f}", file=sys.stderr)
        if stopper.improved(epoch, val_loss, val_acc):
            best_state = snapshot()
        if stopper.should_stop(epoch):
            break
    model.requires_grad_(False)
    return best_state


# -- loading and predicting --------------------------------------------------------------------
class TextClassifier:
    """A trained classifier: the encoder (base or fine-tuned) plus the linear head.

        classifier = TextClassifier.load("out/sentiment", device="cpu", quantize=None)
        classifier.labels                     # ["negative", "neutral", "positive"]
        classifier.predict(["great flight"])  # [{"label", "score", "scores": {label: probability}}]
        classifier.predict_proba(texts)       # (len(texts), len(labels)) float32, rows sum to 1
    """

    def __init__(self, embedder: Embedder, head: nn.Linear, labels: list[str], config: dict, path: Path):
        self.embedder, self.head, self.labels, self.config, self.path = embedder, head, labels, config, path

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", quantize: str | None = None,
             max_batch_size: int = 32) -> TextClassifier:
        """Load a classifier folder; quantize="int8" runs the encoder's linear layers as int8 GEMMs."""
        folder = Path(path)
        if not folder.is_dir():
            raise ModelLoadError(f"{folder}: no such classifier folder" if not folder.exists()
                                 else f"{folder}: a classifier is a folder ({CONFIG_FILE}, {WEIGHTS_FILE})")
        config = _read_config(folder)
        labels = config["labels"]
        if not (folder / WEIGHTS_FILE).is_file():
            raise ModelLoadError(f"{folder}: no {WEIGHTS_FILE}; the classifier folder is incomplete")
        try:
            tensors = load_file(str(folder / WEIGHTS_FILE))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(f"{folder / WEIGHTS_FILE}: not a readable safetensors file ({exc})") from None

        loaded = load_encoder(None if config["encoder"] == "default" else config["encoder"], device=device)
        dimension = loaded.model.config.hidden_size
        if dimension != config["dimension"]:
            raise ModelLoadError(f"{folder}: trained on a {config['dimension']}-dimensional encoder, but "
                                 f"{config['encoder']!r} gives {dimension} dimensions")
        expected = {"head.weight": (len(labels), dimension), "head.bias": (len(labels),)}
        if config["method"] == "finetune":
            expected.update({f"encoder.{k}": tuple(v.shape) for k, v in loaded.model.state_dict().items()})
        for name, shape in expected.items():
            if name not in tensors:
                raise ModelLoadError(f"{folder / WEIGHTS_FILE}: missing tensor {name}")
            if tuple(tensors[name].shape) != shape:
                raise ModelLoadError(f"{folder / WEIGHTS_FILE}: tensor {name} has shape "
                                     f"{tuple(tensors[name].shape)}, expected {shape}")
        if config["method"] == "finetune":
            dtype = loaded.model.embeddings.word_embeddings.weight.dtype
            loaded.model.load_state_dict({k[len("encoder."):]: v.to(dtype) for k, v in tensors.items()
                                          if k.startswith("encoder.")})
        # The head was trained on vectors made this way; the base folder's settings must not drift.
        loaded.pooling, loaded.normalize = config["pooling"], config["normalize"]
        loaded.max_seq_length = config["max_seq_length"]
        embedder = Embedder(loaded=loaded, quantize=quantize, max_batch_size=max_batch_size)

        head = nn.Linear(dimension, len(labels))
        head.load_state_dict({"weight": tensors["head.weight"], "bias": tensors["head.bias"]})
        head.requires_grad_(False)
        return cls(embedder, head.to(loaded.model.device).eval(), labels, config, folder)

    def predict_proba(self, texts: Sequence[str], truncate: bool = True) -> np.ndarray:
        """(len(texts), len(labels)) float32 probabilities, in the order of self.labels."""
        ids = self.embedder.tokenize(texts, truncate)
        if not ids:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        vectors = torch.from_numpy(self.embedder.embed_ids(ids)).to(self.head.weight.device)
        with torch.inference_mode():
            return torch.softmax(self.head(vectors), dim=1).float().cpu().numpy()

    def predict(self, texts: Sequence[str], truncate: bool = True) -> list[dict]:
        """One dict per text: label (the most probable), score (its probability), scores (every label's)."""
        out = []
        for row in self.predict_proba(texts, truncate):
            best = int(row.argmax())
            out.append({"label": self.labels[best], "score": float(row[best]),
                        "scores": {label: float(p) for label, p in zip(self.labels, row, strict=True)}})
        return out

    def evaluate(self, texts: Sequence[str], labels: Sequence[str], truncate: bool = True,
                 source: str = "the input") -> dict:
        """Metrics (as train_classifier reports them) of the predictions against known true labels."""
        if len(texts) != len(labels):
            raise InvalidRequestError(f"{len(texts)} texts but {len(labels)} labels")
        check_known_labels(labels, self.labels, source)
        predicted = self.predict_proba(texts, truncate).argmax(1).tolist()
        index_of = {label: i for i, label in enumerate(self.labels)}
        return classification_metrics([index_of[x] for x in labels], predicted, self.labels)


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ModelLoadError(f"{folder}: no {CONFIG_FILE}; not a classifier folder (train one with "
                             "`leapllm classify train`)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelLoadError(f"{path}: not a leapllm classifier (format is not {FORMAT!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(f"{path}: format version {config.get('format_version')!r} is not supported "
                             f"(this leapllm reads version {FORMAT_VERSION})")
    labels = config.get("labels")
    if (not isinstance(labels, list) or len(labels) < 2 or len(set(labels)) != len(labels)
            or not all(isinstance(x, str) for x in labels)):
        raise ModelLoadError(f"{path}: 'labels' must be a list of at least 2 distinct strings")
    checks = {"method": lambda v: v in ("head", "finetune"), "encoder": lambda v: isinstance(v, str),
              "dimension": lambda v: isinstance(v, int), "pooling": lambda v: isinstance(v, str),
              "normalize": lambda v: isinstance(v, bool), "max_seq_length": lambda v: isinstance(v, int) and v > 1}
    for key, valid in checks.items():
        if not valid(config.get(key)):
            raise ModelLoadError(f"{path}: {key!r} is missing or invalid ({config.get(key)!r})")
    return config
