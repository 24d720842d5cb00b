"""K-quant (and other) GGUF files of the default model, written by llama.cpp's own quantizer.

    .venv/bin/python benchmarks/make_kquant_files.py OUT_DIR [--types Q4_K_M,Q6_K,...] [--source F.gguf]

llama.cpp's `llama_model_quantize` (the code behind its `llama-quantize` tool, reached through the
llama-cpp-python library the benchmarks already use) re-quantizes the default Q4_1 file into each
type (allow_requantize: the Q4_1 weights are the source, so these files test formats, not the best
quality of each type). Default types: Q4_K_M, Q5_K_M, Q6_K, Q3_K_M, Q2_K, Q8_0, Q4_0. The files go
to OUT_DIR as smollm2-135m-<TYPE>.gguf; `leapllm bench --model` and
benchmarks/agreement_llamacpp.py take them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from leapllm.loading.default_model import default_model_path

DEFAULT_TYPES = "Q4_K_M,Q5_K_M,Q6_K,Q3_K_M,Q2_K,Q8_0,Q4_0"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--types", default=DEFAULT_TYPES)
    p.add_argument("--source", default=None, help="the GGUF to re-quantize (default: the default model)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import llama_cpp

    source = Path(args.source) if args.source else default_model_path()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.types.split(","):
        ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}", None)
        if ftype is None:
            raise SystemExit(f"unknown type {name}")
        out = out_dir / f"smollm2-135m-{name}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.nthread, params.ftype, params.allow_requantize = args.threads, ftype, True
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
        if rc != 0:
            raise SystemExit(f"llama_model_quantize failed for {name} (code {rc})")
        print(f"{out}  {out.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
