"""The `leapllm` command line: generate, chat, info, profile, bench, serve, embed and classify.

This module only builds the parser from the subcommand modules and runs the chosen command; the
flags and their checks live in leapllm.cli.args, and no subcommand module imports this one.
User mistakes (a bad path, a corrupt file, an impossible setting) print one line on stderr and
exit with status 2, like argparse's own usage errors.
"""

from __future__ import annotations

import argparse
import sys

from leapllm.cli.attention_cmd import add_attention_parser
from leapllm.cli.bench_cmd import add_bench_parser
from leapllm.cli.classify_cmd import add_classify_parser
from leapllm.cli.common import EXIT_USAGE
from leapllm.cli.distill_cmd import add_distill_parser
from leapllm.cli.embed_cmd import add_embed_parser
from leapllm.cli.eval_cmd import add_eval_parser
from leapllm.cli.generate_cmd import add_generate_parsers
from leapllm.cli.profile_cmd import add_profile_parser
from leapllm.cli.prune_cmd import add_prune_parser
from leapllm.cli.quantize_cmd import add_quantize_parser
from leapllm.cli.seq2seq_cmd import add_seq2seq_parsers
from leapllm.cli.serve_cmd import add_serve_parser
from leapllm.cli.tasks_cmd import add_task_parsers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leapllm", description="Fast LLM inference in PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parsers(sub)  # generate, chat, info
    add_profile_parser(sub)
    add_bench_parser(sub)
    add_serve_parser(sub)
    add_classify_parser(sub)
    add_embed_parser(sub)
    add_task_parsers(sub)  # qa, ner
    add_seq2seq_parsers(sub)  # translate, summarize
    add_quantize_parser(sub)
    add_prune_parser(sub)
    add_distill_parser(sub)
    add_eval_parser(sub)
    add_attention_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from leapllm.errors import LeapLLMError

    try:
        return args.func(args)
    except LeapLLMError as exc:
        sys.stdout.flush()
        print(f"leapllm: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `leapllm generate ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
