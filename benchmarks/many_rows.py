"""Many activation rows on leapllm's packed kernels: the int8 tiles against a GEMM on weights
dequantized for the call, and both against the machine's int8 and float ceilings.

    python benchmarks/many_rows.py --out benchmarks/many-rows-cpu.json [--threads 2] [--repeats 20]

What decides `packing.tile_row_limit` (the path a prefill and the engine's batched steps take):
for SmolLM2-135M's projection shapes (576 -> 1536 and 1536 -> 576), random weights, the int4
(group 32, as Q4_1), int8 (per row, the full byte range) and int8-16 (bytes below 64 with a scale
and minimum per 16 weights, as GGUF's Q6_K) packed layouts, and 1 to 512 rows:
- tiles: `PackedLinear.forward` (activations quantized to int8 per block of 32, integer dot
  products, the same bits at every row count);
- gemm: `PackedLinear.dequantize` to the GEMM dtype this CPU gets (`packing.gemm_dtype`: bfloat16
  where AVX-512 BF16 multiplies it natively, else float32) plus `torch.nn.functional.linear`, as the
  dequantizing path runs it, dequantization included.
GOP/s counts 2 operations per multiply-add of the matmul, for both. The ceilings: the int8
instruction the tiles are made of, on every thread (`int8_peak_ops`, what `leapllm profile
--machine` measures), and a 2048^3 float32 matmul. Median of --repeats calls after a warm-up; run
on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from leapllm.benchmarking.timing import median_seconds
from leapllm.kernels import cpu_kernels, packing
from leapllm.kernels.packing import pack_int4, pack_int8, pack_int8_sub_blocks, packed_linear
from leapllm.profiling.machine import device_name, measure_int8_ops, measure_matmul_flops

SHAPES = ((1536, 576), (576, 1536))  # (out, in): gate/up-sized and down-sized projections
ROWS = (1, 8, 32, 64, 128, 512)


def packed_layers(out_features: int, in_features: int) -> dict:
    g = torch.Generator().manual_seed(0)
    q4 = torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8, generator=g)
    scale = torch.rand(out_features, in_features // 32, generator=g) * 0.01
    q8 = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=g)
    q6 = torch.randint(0, 64, (out_features, in_features), dtype=torch.uint8, generator=g)
    scale16 = torch.rand(out_features, in_features // 16, generator=g) * 0.01
    return {"int4": packed_linear(*pack_int4(q4, scale, -8 * scale), None, bits=4),
            "int8": packed_linear(*pack_int8(q8, torch.rand(out_features, generator=g) * 0.01), None, None, bits=8),
            "int8-16": packed_linear(*pack_int8_sub_blocks(q6, scale16, -32 * scale16), None, bits=8)}


def measure(repeats: int) -> list[dict]:
    dtype = packing.gemm_dtype()
    results = []
    for out_features, in_features in SHAPES:
        for form, layer in packed_layers(out_features, in_features).items():
            for rows in ROWS:
                x = torch.randn(rows, in_features)
                ops = 2 * rows * out_features * in_features
                tiles = median_seconds(lambda layer=layer, x=x: layer.forward(x), repeats)
                gemm = median_seconds(
                    lambda layer=layer, x=x: torch.nn.functional.linear(x.to(dtype), layer.dequantize(dtype)), repeats)
                results.append({"out_features": out_features, "in_features": in_features, "form": form, "rows": rows,
                                "tiles_ms": tiles * 1e3, "gemm_ms": gemm * 1e3, "tiles_gops": ops / tiles / 1e9,
                                "gemm_gops": ops / gemm / 1e9, "tiles_over_gemm": gemm / tiles})
                print(f"{out_features}x{in_features} {form} rows {rows:4d}: tiles {ops / tiles / 1e9:6.1f} GOP/s, "
                      f"dequantize + {str(dtype).removeprefix('torch.')} GEMM {ops / gemm / 1e9:6.1f} GOP/s, "
                      f"tiles {gemm / tiles:.2f}x", file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    if cpu_kernels() is None:
        print("leapllm's CPU kernels are not built here: nothing to measure", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    ext = cpu_kernels()
    report = {
        "cpu": device_name(torch.device("cpu")), "threads": args.threads, "torch": torch.__version__,
        "tiles": "VNNI" if ext.vnni_compiled() else "AVX2" if ext.avx2_compiled() else "portable",
        "gemm_dtype": str(packing.gemm_dtype()).removeprefix("torch."),
        "many_rows_kernel": packing.many_rows_kernel(),
        "int8_peak_gops": (measure_int8_ops() or 0.0) / 1e9,
        "float32_matmul_gflops": measure_matmul_flops(torch.device("cpu"), torch.float32, 2048) / 1e9,
        "command": "python benchmarks/many_rows.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "results": measure(args.repeats),
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(f"int8 ceiling {report['int8_peak_gops']:.0f} GOP/s, float32 matmul {report['float32_matmul_gflops']:.0f} "
          f"GFLOP/s; wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
