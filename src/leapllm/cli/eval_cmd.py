"""`leapllm eval`: quality yardsticks on a text, for comparing models, dtypes and compressed copies.

    leapllm eval perplexity [--model PATH] --text FILE|builtin:NAME [--ctx 512] [--stride N]
                            [--max-tokens N] [--json OUT]
    leapllm eval agree [--model PATH] --reference PATH --text FILE|builtin:NAME [--ctx 512]
                       [--max-tokens N] [--json OUT]

The text is tokenized once with the model's tokenizer (BOS prepended when the model asks for it);
see leapllm.evaluation.perplexity for the windows and what is scored. Bad settings, an unreadable,
binary or empty text, or two models with different vocabularies raise InvalidRequestError, which
the `leapllm` command prints as one line (exit 2).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys

from leapllm.cli import common
from leapllm.cli.args import add_model_args
from leapllm.config import DTYPES


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="quality of a model on a text: perplexity, agreement with a reference",
                              description="Measure a model's quality on a text: sliding-window perplexity, "
                                          "or agreement with a reference model (top-1, KL, top-5).")
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="{perplexity,agree}")

    pp = sub.add_parser("perplexity", help="sliding-window perplexity over a text",
                        description="Perplexity = exp(mean NLL) of the text's tokens, in windows of --ctx "
                                    "tokens advanced by --stride; each token is scored once.")
    add_text_args(pp)
    add_model_args(pp)
    pp.set_defaults(func=cmd_perplexity)

    pa = sub.add_parser("agree", help="agreement of a model with a reference model on a text",
                        description="Top-1 agreement (same greedy next token), mean KL(reference || model) "
                                    "and top-5 overlap, over the same windows as perplexity.")
    add_text_args(pa)
    add_model_args(pa)
    pa.add_argument("--reference", metavar="PATH", required=True,
                    help="the reference model (GGUF file or safetensors folder), with the same tokenizer")
    pa.add_argument("--reference-dtype", default="auto", choices=list(DTYPES),
                    help="the reference's compute dtype (auto: float32 on CPU, bfloat16 on CUDA)")
    pa.set_defaults(func=cmd_agree)
    return p


def add_text_args(p: argparse.ArgumentParser) -> None:
    from leapllm.evaluation.texts import BUILTIN_PREFIX, BUILTIN_TEXTS

    builtins = ", ".join(BUILTIN_PREFIX + name for name in BUILTIN_TEXTS)
    p.add_argument("--text", required=True, metavar="FILE",
                   help=f"a UTF-8 text file, or a built-in text: {builtins}")
    p.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts, 1..ctx (default ctx/2; = ctx: non-overlapping)")
    p.add_argument("--max-tokens", type=int, default=None, help="only the first N tokens of the text (quick runs)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass (default: automatic)")
    p.add_argument("--json", metavar="OUT", help="write the figures as JSON")


def check_text_args(args) -> None:
    """The settings that need no model, checked before anything is loaded."""
    from leapllm.errors import InvalidRequestError
    from leapllm.evaluation.perplexity import check_window_settings

    check_window_settings(args.ctx, args.ctx // 2 if args.stride is None else args.stride)
    if args.max_tokens is not None and args.max_tokens < 2:
        raise InvalidRequestError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    if args.batch_size is not None and args.batch_size < 1:
        raise InvalidRequestError(f"--batch-size must be at least 1, got {args.batch_size}")


def read_inputs(args) -> str:
    """Check the settings and the JSON output path and read the text: all that needs no model, so
    that a mistake is reported before a model loads."""
    from leapllm.evaluation.texts import load_text
    from leapllm.output_files import check_writable

    check_text_args(args)
    text = load_text(args.text)
    if args.json is not None:
        check_writable(args.json)
    return text


def tokenize(llm, text: str, max_tokens: int | None) -> list[int]:
    ids = llm.tokenizer.encode(text)  # BOS only when the model wants one, as in generation
    return ids[:max_tokens] if max_tokens is not None else ids


def dtype_name(llm) -> str:
    return str(llm.model.dtype).removeprefix("torch.")


def run_facts(args, llm, text: str, ids: list[int]) -> dict:
    """What was measured: model, dtype, device, and which text (its hash says whether two runs match)."""
    tokenizer = llm.tokenizer
    return {
        "model": str(llm.path), "dtype": dtype_name(llm), "device": str(llm.model.device),
        # The whole text (chars, hash), then the tokens evaluated (after --max-tokens).
        "text": args.text, "text_chars": len(text), "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "text_tokens": len(ids), "max_tokens": args.max_tokens,
        "bos": bool(tokenizer.add_bos and tokenizer.bos_token_id is not None),  # prepended to the text
        "python": platform.python_version(),  # the built-in texts are docstrings of this Python
    }


def finish(args, report: dict, lines: list[str]) -> int:
    for line in lines:
        print(line)
    if args.json is not None:
        from leapllm.output_files import atomic_write

        atomic_write(args.json, json.dumps(report, indent=2) + "\n")
        print(f"leapllm: wrote {args.json}", file=sys.stderr)
    return 0


def cmd_perplexity(args) -> int:
    from leapllm.evaluation.perplexity import perplexity

    text = read_inputs(args)
    llm = common.load_llm(args)
    ids = tokenize(llm, text, args.max_tokens)
    result = perplexity(llm.model, ids, ctx=args.ctx, stride=args.stride, batch_size=args.batch_size, progress=True)
    report = {"command": "eval perplexity", **run_facts(args, llm, text, ids), **result.summary()}
    return finish(args, report, [
        f"perplexity {result.perplexity:.4f} (mean NLL {result.mean_nll:.4f} nats) over {result.tokens} tokens",
        (f"{result.windows} windows of {result.ctx} tokens, stride {result.stride}; {result.seconds:.1f} s, "
         f"{result.tokens_per_s:.1f} tokens/s"),
        (f"model {report['model']} ({report['dtype']}, {report['device']}); text {args.text} "
         f"({report['text_tokens']} tokens, sha256 {report['text_sha256'][:12]})"),
    ])


def cmd_agree(args) -> int:
    from leapllm.errors import InvalidRequestError
    from leapllm.evaluation.agreement import agreement, check_same_vocab

    text = read_inputs(args)
    llm = common.load_llm(args)
    reference = common.load_llm(argparse.Namespace(model=args.reference, dtype=args.reference_dtype,
                                                   device=args.device, threads=args.threads))
    check_same_vocab(llm.config.vocab_size, reference.config.vocab_size)
    ids = tokenize(llm, text, args.max_tokens)
    if tokenize(reference, text, args.max_tokens) != ids:
        raise InvalidRequestError("the model and the reference tokenize the text differently; "
                                  "agreement needs two models with the same tokenizer")
    result = agreement(llm.model, reference.model, ids, ctx=args.ctx, stride=args.stride,
                       batch_size=args.batch_size, progress=True)
    report = {"command": "eval agree", **run_facts(args, llm, text, ids), "reference": str(reference.path),
              "reference_dtype": dtype_name(reference), **result.summary()}
    return finish(args, report, [
        (f"top-1 agreement {result.agreement:.4f}, mean KL(reference || model) {result.mean_kl:.5f} nats, "
         f"top-5 overlap {result.top5_overlap:.4f} over {result.tokens} tokens"),
        f"perplexity: model {result.model_perplexity:.4f}, reference {result.reference_perplexity:.4f}",
        f"{result.windows} windows of {result.ctx} tokens, stride {result.stride}; {result.seconds:.1f} s",
        (f"model {report['model']} ({report['dtype']}); reference {report['reference']} "
         f"({report['reference_dtype']}); text {args.text} ({report['text_tokens']} tokens)"),
    ])
