"""`leapllm quantize`: write an int8 or int4 copy of a model as a folder that `--model` loads.

    leapllm quantize --method int4 --group-size 32 -o smollm2-int4
    leapllm quantize --method int8 --model other.gguf -o other-int8
"""

from __future__ import annotations

import argparse
import sys
import time


def add_quantize_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("quantize", help="int8 / int4 weight quantization, saved as a loadable folder",
                              description="Quantize every projection and the output head (round to nearest): "
                                          "int8 per output channel (run as int8 x int8 GEMMs with per-token "
                                          "activation scales) or int4 in groups with a scale and offset each.")
    p.add_argument("--model", metavar="PATH", help="GGUF file or safetensors folder (default: the default model)")
    p.add_argument("--method", required=True, choices=["int8", "int4"])
    p.add_argument("--group-size", type=int, default=32, help="int4 group size: 32, 64 or 128 (default 32)")
    p.add_argument("-o", "--output", required=True, metavar="FOLDER", help="folder to create")
    p.set_defaults(func=cmd_quantize)
    return p


def cmd_quantize(args) -> int:
    from leapllm.compression.model_folder import check_output_folder, save_model_folder
    from leapllm.compression.quantize import check_settings, quantize_model
    from leapllm.loading.loader import load_model

    out = check_output_folder(args.output)  # before the slow load
    start = time.perf_counter()
    loaded = load_model(args.model, dtype="float32", device="cpu")
    check_settings(args.method, args.group_size, loaded.model)
    tensors = quantize_model(loaded.model, args.method, args.group_size)
    quant = {"method": args.method, "group_size": args.group_size if args.method == "int4" else None,
             "algorithm": "round-to-nearest"}
    history = loaded.metadata.get("history", []) + [{**quant, "source": loaded.path.name}]
    save_model_folder(out, loaded.config, loaded.tokenizer, tensors, quant, history)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"leapllm: wrote {args.method} model to {out} ({size / 2**20:.1f} MiB, "
          f"{time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return 0
