"""What the `leapllm` subcommands share: loading the model their flags name, and printing.

Subcommands call `common.load_llm(args)` through the module, so that a test can swap in a model it
has already loaded.
"""

from __future__ import annotations

import sys

from leapllm.cli.args import model_settings_from_args, speculative_from_args
from leapllm.config import ModelSettings

EXIT_USAGE = 2  # a user mistake: the exit status of argparse's own usage errors


def llm_from_settings(model: ModelSettings, speculative: dict | None = None):
    """The LLM of checked settings: one process or split over model.tensor_parallel, with the
    speculative options of speculative_from_args."""
    from leapllm.errors import InvalidRequestError
    from leapllm.llm import LLM
    from leapllm.loading.seq2seq_loader import is_seq2seq_folder

    if model.model is not None and is_seq2seq_folder(model.model):
        # LLM(folder) would hand back a Seq2SeqLM, which the decoder commands cannot drive.
        raise InvalidRequestError(f"{model.model} is an encoder-decoder model; this command runs decoder LLMs "
                                  "(use `leapllm translate`, `summarize`, `attention` or `serve` with it)")
    return LLM(model.model, dtype=model.dtype, device=model.device, num_threads=model.threads,
               tensor_parallel=model.tensor_parallel, **(speculative or {}))


def load_llm(args):
    """The LLM of the model and speculative flags."""
    return llm_from_settings(model_settings_from_args(args), speculative_from_args(args))


def print_stats(out, file=sys.stderr, speculation: dict | None = None) -> None:
    t = out.timings
    spec = ""
    if speculation and speculation.get("proposed"):
        spec = (f", speculative: {speculation['accepted']} of {speculation['proposed']} proposed tokens kept "
                f"({speculation['accepted'] / speculation['proposed']:.0%})")
    print(f"\n[{len(out.prompt_token_ids)} prompt tokens at {t['prefill_tokens_per_s']:.1f} tok/s, "
          f"{len(out.token_ids)} generated at {t['decode_tokens_per_s']:.1f} tok/s, "
          f"first token {t['time_to_first_token_s'] * 1000:.0f} ms, finish: {out.finish_reason}{spec}]", file=file)


def read_text_input(path: str | None, what: str = "input") -> str:
    """The text of a file flag, or of stdin for None or "-": UTF-8 (a BOM dropped), or one clear error."""
    from pathlib import Path

    from leapllm.errors import InvalidRequestError

    if path is None or path == "-":
        return sys.stdin.read()
    file = Path(path)
    if not file.is_file():
        why = "no such file" if not file.exists() else "not a file"
        raise InvalidRequestError(f"cannot read {what} {file}: {why}")
    try:
        return file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidRequestError(f"cannot read {what} {file}: not UTF-8 text") from None
    except OSError as exc:
        raise InvalidRequestError(f"cannot read {what} {file}: {exc.strerror or exc}") from None


def write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
