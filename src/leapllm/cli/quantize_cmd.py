"""`leapllm quantize`: write an int8 or int4 copy of a model as a folder that `--model` loads.

    leapllm quantize --method int4 --group-size 32 -o smollm2-int4                        # round to nearest
    leapllm quantize --method int4 --calib builtin:python-docs -o smollm2-int4-awq        # activation-aware
    leapllm quantize --method int8 --model other.gguf -o other-int8
"""

from __future__ import annotations

import argparse
import sys
import time


def add_quantize_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("quantize", help="int8 / int4 weight quantization, saved as a loadable folder",
                              description="Quantize every projection and the output head: int8 per output "
                                          "channel (run as int8 GEMMs on two int8 digits of activation, "
                                          "weight-only accuracy) or int4 in groups with a scale and offset each, "
                                          "round to nearest or, with --calib, activation-aware (AWQ-style).")
    p.add_argument("--model", metavar="PATH", help="GGUF file, safetensors folder or leapllm folder "
                                                   "(default: the default model)")
    p.add_argument("--method", required=True, choices=["int8", "int4"])
    p.add_argument("--group-size", type=int, default=32, help="int4 group size: 32, 64 or 128 (default 32)")
    p.add_argument("--calib", metavar="TEXT", default=None,
                   help="int4 only: calibration text (a UTF-8 file or builtin:python-docs) for activation-aware "
                        "scaling and range search; without it, round to nearest")
    p.add_argument("--calib-tokens", type=int, default=8192,
                   help="calibration tokens used, in windows of 512 (default 8192)")
    p.add_argument("--head", choices=["int8", "int4"], default=None,
                   help="quantize the output head differently from --method (default: the same); an int8 head "
                        "keeps int4's quality close to float at 12 MiB more on the default model")
    p.add_argument("-o", "--output", required=True, metavar="FOLDER", help="folder to create")
    p.set_defaults(func=cmd_quantize)
    return p


def calibration_ids(tokenizer, spec: str, max_tokens: int):
    """The first max_tokens token ids of a calibration text (file or builtin:NAME)."""
    import torch

    from leapllm.errors import InvalidRequestError
    from leapllm.evaluation.texts import load_text

    if max_tokens < 512:
        raise InvalidRequestError(f"--calib-tokens must be at least 512, got {max_tokens}")
    ids = tokenizer.encode(load_text(spec))[:max_tokens]
    if len(ids) < 512:
        raise InvalidRequestError(f"calibration text {spec} has {len(ids)} tokens; it needs at least 512")
    return torch.tensor(ids)


def cmd_quantize(args) -> int:
    from leapllm.loading.model_folder import check_output_folder, save_model_folder
    from leapllm.compression.quantize import check_settings, quantize_model
    from leapllm.errors import InvalidRequestError
    from leapllm.loading.loader import load_model

    out = check_output_folder(args.output)  # before the slow load
    if args.calib is not None and args.method != "int4":
        raise InvalidRequestError("--calib is for --method int4 (activation-aware); int8 needs no calibration")
    if args.calib is not None:
        from leapllm.evaluation.texts import load_text
        load_text(args.calib)  # a missing file fails here, before the slow load
    start = time.perf_counter()
    loaded = load_model(args.model, dtype="float32", device="cpu")
    head = args.head if args.head != args.method else None
    check_settings(args.method, args.group_size, loaded.model, head)
    calib = None if args.calib is None else calibration_ids(loaded.tokenizer, args.calib, args.calib_tokens)
    tensors = quantize_model(loaded.model, args.method, args.group_size, calib, head_method=head)
    uses_int4 = "int4" in (args.method, head)
    quant = {"method": args.method, "group_size": args.group_size if uses_int4 else None,
             "algorithm": "round-to-nearest" if calib is None else "activation-aware", "head_method": head}
    if calib is not None:
        quant |= {"calibration": args.calib, "calibration_tokens": len(calib)}
    history = loaded.metadata.get("history", []) + [{**quant, "source": loaded.path.name}]
    save_model_folder(out, loaded.config, loaded.tokenizer, tensors, quant, history)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"leapllm: wrote {args.method} model to {out} ({size / 2**20:.1f} MiB, "
          f"{time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return 0
