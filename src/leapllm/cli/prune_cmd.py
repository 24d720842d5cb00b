"""`leapllm prune`: write a pruned copy of a model as a folder that `--model` loads.

    leapllm prune --method ffn --sparsity 0.5 -o smollm2-ffn50          # MLP channels removed
    leapllm prune --method heads --sparsity 0.33 -o smollm2-heads33     # query heads removed
    leapllm prune --method wanda --sparsity 0.5 --calib notes.txt -o smollm2-wanda50
    leapllm prune --method 2:4 -o smollm2-2of4
"""

from __future__ import annotations

import argparse
import sys
import time

from leapllm.config import PRUNING_ALLOCATIONS, PRUNING_METHODS

DEFAULT_CALIBRATION = "builtin:python-docs"
DEFAULT_CALIBRATION_TOKENS = 8192


def add_prune_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("prune", help="unstructured, 2:4 or structured (heads, MLP channels) pruning, "
                                            "saved as a loadable folder",
                              description="Prune the projections of every block: zero weights (magnitude, wanda, "
                                          "2:4; same shapes) or remove whole query heads or MLP channels (heads, "
                                          "ffn; smaller and faster). wanda, 2:4, heads and ffn score weights with "
                                          "activations of calibration text.")
    p.add_argument("--model", metavar="PATH", help="GGUF file, safetensors folder or leapllm model folder "
                                                   "(default: the default model)")
    p.add_argument("--method", required=True, choices=PRUNING_METHODS)
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction to remove, in (0, 1): of each row's weights (magnitude, wanda), of the query "
                        "heads (heads) or of the MLP channels (ffn); 2:4 is always 0.5")
    p.add_argument("--calib", metavar="FILE", default=None,
                   help=f"calibration text: a UTF-8 file or builtin:NAME (default for wanda, 2:4, heads, ffn: "
                        f"{DEFAULT_CALIBRATION}; magnitude uses none)")
    p.add_argument("--calib-tokens", type=int, default=DEFAULT_CALIBRATION_TOKENS,
                   help=f"calibration tokens, from the start of the text (default {DEFAULT_CALIBRATION_TOKENS})")
    p.add_argument("--allocation", choices=PRUNING_ALLOCATIONS, default=None,
                   help="heads/ffn: remove the same number of units in every layer (uniform) or the lowest-scored "
                        "across all layers (global) (default: uniform)")
    p.add_argument("--multiple-of", type=int, default=None,
                   help="ffn: every layer keeps a multiple of this many channels (default 128, so int4 group "
                        "sizes 32/64/128 still divide the widths)")
    p.add_argument("-o", "--output", required=True, metavar="FOLDER", help="folder to create")
    p.set_defaults(func=cmd_prune)
    return p


def calibration_spec(method: str, calib: str | None) -> str | None:
    from leapllm.errors import InvalidRequestError

    if method == "magnitude":
        if calib is not None:
            raise InvalidRequestError("magnitude pruning uses no calibration text; leave out --calib")
        return None
    return calib or DEFAULT_CALIBRATION


def cmd_prune(args) -> int:
    from leapllm.loading.model_folder import (
        check_output_folder,
        float_tensors,
        save_model_folder,
    )
    from leapllm.compression.prune import check_settings, prune_model
    from leapllm.errors import InvalidRequestError
    from leapllm.evaluation.texts import load_text
    from leapllm.loading.loader import load_model

    # Everything that needs no model is checked before the slow load.
    check_settings(args.method, args.sparsity, args.allocation, args.multiple_of)
    out = check_output_folder(args.output)
    if args.calib_tokens < 2:
        raise InvalidRequestError(f"--calib-tokens must be at least 2, got {args.calib_tokens}")
    calib = calibration_spec(args.method, args.calib)
    text = load_text(calib) if calib is not None else None
    start = time.perf_counter()
    loaded = load_model(args.model, dtype="float32", device="cpu")
    ids = loaded.tokenizer.encode(text)[:args.calib_tokens] if text is not None else None
    report = prune_model(loaded.model, args.method, args.sparsity, ids, allocation=args.allocation,
                         multiple_of=args.multiple_of)
    step = {**report, "calibration": calib, "source": loaded.path.name}
    history = loaded.metadata.get("history", []) + [step]
    save_model_folder(out, loaded.config, loaded.tokenizer, float_tensors(loaded.model), None, history)
    size = sum(f.stat().st_size for f in out.iterdir())
    before, after = report["block_parameters_before"], report["block_parameters_after"]
    detail = (f"{report['zero_fraction']:.1%} of block weights zero" if "zero_fraction" in report
              else f"block parameters {before:,} -> {after:,}")
    print(f"leapllm: wrote {args.method}-pruned model to {out} ({detail}, {size / 2**20:.1f} MiB, "
          f"{time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return 0
