"""The `leapllm` command line: generate, chat, info, profile, bench, serve, embed and classify.

This module only builds the parser from the subcommand modules and runs the chosen command; the
flags and their checks live in leapllm.cli.args, and no subcommand module imports this one.
User mistakes (a bad path, a corrupt file, an impossible setting) print one line on stderr and
exit with status 2, like argparse's own usage errors.
"""

from __future__ import annotations

import argparse
import gc
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
    """Parse argv (default: the process's arguments) and run the command."""
    return run_command(build_parser().parse_args(argv))


def run() -> int:
    """The `leapllm` console script: main() in a process of its own, whose start it shortens.

    Importing PyTorch creates a few hundred thousand objects, which the cyclic garbage collector
    would walk again and again, during the import and after it. So the collector is off while
    PyTorch imports, and what the import created is then frozen (gc.freeze; vLLM freezes its heap
    once its engine is up): later collections skip it. Unlike vLLM, no collection comes first: the
    import's own cyclic garbage (well under a MiB) stays, as a full pass would cost most of what
    the freeze saves. Only the command line does this, once its flags are parsed: a library must
    not freeze its user's objects."""
    args = build_parser().parse_args()
    collecting = gc.isenabled()
    gc.disable()
    try:
        import torch  # noqa: F401  (every command runs on it)
    finally:
        gc.freeze()
        if collecting:
            gc.enable()
    return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command; a LeapLLMError becomes one line on stderr and exit status 2."""
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
    sys.exit(run())
