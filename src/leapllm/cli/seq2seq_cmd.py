"""`leapllm translate` and `leapllm summarize`: an encoder-decoder (T5, BART, mBART, MarianMT) on text.

    leapllm translate --model opus-mt-en-de "The house is wonderful."
    leapllm translate --model t5-small --target-lang de "The house is wonderful."   # T5's task prefix
    leapllm translate --model mbart-50 --source-lang en_XX --target-lang ro_RO < lines.txt
    leapllm summarize --model bart-large-cnn < article.txt

translate takes the texts as arguments, or one per line from stdin (blank lines skipped), and
prints one translation per line. summarize reads the whole of stdin (or --input) as one text;
a text longer than the encoder takes is summarized chunk by chunk, cut at sentence ends
(engine/seq2seq_lm.py says the rule). Unset generation flags take the model's defaults (its
generation_config.json and, for T5, the task's settings). Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import sys

from leapllm.cli.args import threads_from_args
from leapllm.cli.common import read_text_input
from leapllm.errors import InvalidRequestError


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="FOLDER",
                   help="encoder-decoder folder (config.json, *.safetensors, tokenizer.json or Marian's .spm files)")
    g = p.add_argument_group("generation (unset: the model's defaults)")
    g.add_argument("--num-beams", type=int, default=None, help="beam search width (1: greedy)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="most tokens to generate per text")
    g.add_argument("--length-penalty", type=float, default=None, help="beam score / length ** this")
    g.add_argument("--early-stopping", choices=["true", "false", "never"], default=None,
                   help="when beam search stops (transformers' meaning)")
    g.add_argument("--no-repeat-ngram-size", type=int, default=None, help="never repeat an n-gram of this size")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy / beam search")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    g.add_argument("--seed", type=int, default=None, help="seed of the sampling")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")
    p.add_argument("--int8", action="store_true", help="int8 decoder weights on leapllm's CPU kernels (faster; "
                   "outputs may differ from float32 where two tokens are close)")
    p.add_argument("--stats", action="store_true", help="print timings on stderr")


def add_seq2seq_parsers(subparsers) -> None:
    t = subparsers.add_parser("translate", help="translate text with an encoder-decoder (T5, mBART, MarianMT)",
                              description="Translate each text (arguments, or one per line from stdin).")
    t.add_argument("texts", nargs="*", help="texts to translate (default: one per line from stdin)")
    t.add_argument("--source-lang", default=None, help="source language: T5 task (en), mBART code (en_XX)")
    t.add_argument("--target-lang", default=None, help="target language: T5 task (de), mBART code (ro_RO), "
                   "multilingual Marian >>code<<")
    _add_common(t)
    t.set_defaults(func=cmd_translate)

    s = subparsers.add_parser("summarize", help="summarize a text with an encoder-decoder (BART, T5)",
                              description="Summarize the text on stdin (or --input); long texts chunk by chunk.")
    s.add_argument("--input", metavar="FILE", help="text file (default: stdin)")
    s.add_argument("--no-chunk", action="store_true", help="refuse a text longer than the encoder takes")
    _add_common(s)
    s.set_defaults(func=cmd_summarize)


def params_from_args(args):
    from leapllm.engine.seq2seq import Seq2SeqParams

    early = {"true": True, "false": False, "never": "never", None: None}[args.early_stopping]
    for name in ("num_beams", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return Seq2SeqParams(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                         length_penalty=args.length_penalty, early_stopping=early,
                         no_repeat_ngram_size=args.no_repeat_ngram_size, do_sample=args.sample,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def _load(args):
    from leapllm.engine.seq2seq_lm import Seq2SeqLM

    threads_from_args(args)
    return Seq2SeqLM(args.model, dtype=args.dtype, device=args.device, num_threads=args.threads,
                     quantize="int8" if args.int8 else None)


def _print_stats(outputs) -> None:
    t = outputs[0].timings
    print(f"[{len(outputs)} texts, {int(t['source_tokens'])} source tokens, {int(t['generated_tokens'])} generated "
          f"in {t['total_s']:.2f} s: {t['tokens_per_s']:.1f} tok/s]", file=sys.stderr)


def cmd_translate(args) -> int:
    params = params_from_args(args)
    texts = list(args.texts) or [line.strip() for line in sys.stdin.read().splitlines() if line.strip()]
    if not texts:
        raise InvalidRequestError("no text to translate (give texts as arguments or lines on stdin)")
    lm = _load(args)
    outputs = lm.translate(texts, params, source_lang=args.source_lang, target_lang=args.target_lang)
    sys.stdout.write("".join(out.text + "\n" for out in outputs))
    sys.stdout.flush()
    if args.stats:
        _print_stats(outputs)
    return 0


def cmd_summarize(args) -> int:
    params = params_from_args(args)
    text = read_text_input(args.input)
    if not text.strip():
        raise InvalidRequestError("no text to summarize (the input is empty)")
    lm = _load(args)
    outputs = lm.summarize(text, params, chunk=not args.no_chunk)
    sys.stdout.write(outputs[0].text + "\n")
    sys.stdout.flush()
    if args.stats:
        _print_stats(outputs)
    return 0
