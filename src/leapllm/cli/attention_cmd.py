"""`leapllm attention`: a model's attention over a text, as one HTML page or as JSON.

    leapllm attention "The cat sat on the mat because it was tired." --html attention.html
    leapllm attention --model ./bert-folder "A sentence." --json maps.json

The page (evaluation/attention_page.py) has a layer x head grid of heatmaps and a token-to-token
view of the head clicked on; it is one file that opens without a network. The JSON holds every
layer's (heads, queries, keys) probabilities as nested lists.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from leapllm.cli import common
from leapllm.cli.args import add_model_args


def add_attention_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("attention", help="attention maps of a text: an HTML page of heatmaps, or JSON",
                              description="Run the model over a text once and write every layer's and "
                                          "head's attention probabilities.")
    p.add_argument("text", help="the text (a prompt of up to 512 tokens); - reads it from stdin")
    add_model_args(p)
    p.add_argument("--html", metavar="FILE", help="write a self-contained page of heatmaps here")
    p.add_argument("--json", metavar="FILE", help="write the probabilities here as JSON")
    p.add_argument("--target", metavar="TEXT", help="an encoder-decoder's target text (default: its own greedy "
                   "output for the text)")
    p.set_defaults(func=cmd_attention)
    return p


def _checked_output(path: str | None, flag: str) -> Path | None:
    from leapllm.errors import InvalidRequestError

    if path is None:
        return None
    out = Path(path)
    if out.is_dir() or not out.parent.is_dir():
        raise InvalidRequestError(f"{flag} {path}: not a file in an existing folder")
    return out


def attention_of(args, text: str):
    """(the maps, the model's name) of the model --model names: a decoder (LLM), a BERT-family
    encoder folder (with or without a task head), or an encoder-decoder folder (Seq2SeqLM, with --target)."""
    import torch

    from leapllm.errors import InvalidRequestError
    from leapllm.loading.encoder_loader import is_encoder_folder
    from leapllm.loading.seq2seq_loader import is_seq2seq_folder

    if args.model is not None and is_encoder_folder(args.model):
        from leapllm.encoders.embedder import Embedder

        if args.target is not None:
            raise InvalidRequestError("--target is for encoder-decoder models; an encoder reads the text alone")
        embedder = Embedder(args.model, dtype="float32" if args.dtype == "auto" else args.dtype,
                            device="cpu" if args.device == "auto" else args.device)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        return embedder.attention(text), Path(args.model).name
    if args.model is not None and is_seq2seq_folder(args.model):
        from leapllm.engine.seq2seq_lm import Seq2SeqLM

        lm = Seq2SeqLM(args.model, dtype="float32" if args.dtype == "auto" else args.dtype,
                       device="cpu" if args.device == "auto" else args.device, num_threads=args.threads)
        return lm.attention(text, args.target), Path(args.model).name
    if args.target is not None:
        raise InvalidRequestError("--target is for encoder-decoder models; this one reads the text alone")
    llm = common.load_llm(args)
    return llm.attention(text), Path(str(llm.path)).name


def cmd_attention(args) -> int:
    from leapllm.errors import InvalidRequestError

    html_out, json_out = _checked_output(args.html, "--html"), _checked_output(args.json, "--json")
    if html_out is None and json_out is None:
        raise InvalidRequestError("say where to write the maps: --html FILE and/or --json FILE")
    text = sys.stdin.read() if args.text == "-" else args.text
    if not text.strip():
        raise InvalidRequestError("the text is empty")
    maps, name = attention_of(args, text)
    if html_out is not None:
        from leapllm.evaluation.attention_page import write_attention_page

        tokens = len(maps[0].query_tokens)
        write_attention_page(maps, html_out, f"Attention of {name}",
                             f"{tokens} tokens, {len(maps[0].layers)} layers: {text[:160]!r}")
        print(f"wrote {html_out}", file=sys.stderr)
    if json_out is not None:
        json_out.write_text(json.dumps([{"kind": m.kind, "query_tokens": m.query_tokens, "key_tokens": m.key_tokens,
                                         "layers": [layer.tolist() for layer in m.layers]} for m in maps]),
                            encoding="utf-8")
        print(f"wrote {json_out}", file=sys.stderr)
    return 0
