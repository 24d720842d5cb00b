"""`leapllm bench compression`: every compression of one model, built and measured in one run.

    leapllm bench compression [--model PATH] [--work-dir DIR] [--only float32,int4-awq,...]
                              [--distill-steps N] [--json OUT.json] [--markdown OUT.md]

Each variant is built with the same commands a user runs (`leapllm quantize`, `leapllm prune`,
`leapllm distill`, each a subprocess writing a folder into the work dir), then measured in a fresh
process of its own, so that peak memory is that variant's alone:

- size: the folder's files (MiB);
- peak memory: the process's peak resident memory (VmHWM) after loading and decoding;
- batch-1 decode: greedy tokens/s after a 128-token prompt, the median of --repeats runs after a
  warm-up (the same generation loop as `leapllm generate`);
- perplexity: sliding windows of 512 tokens (stride 256) over the first --eval-tokens tokens of
  builtin:python-docs-heldout; calibration and distillation read builtin:python-docs, a disjoint
  text (see evaluation/texts.py).

Ratios are to float32 measured in the same run. Exit status 1 when some variant failed (its row
says why); the others are still measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from leapllm.errors import InvalidRequestError

EVAL_TEXT = "builtin:python-docs-heldout"
CALIB_TEXT = "builtin:python-docs"


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    # `leapllm` commands that build it, in order; "{src}" is the source model (the previous step's
    # output, or --model), "{out}" the folder to write.
    steps: tuple[tuple[str, ...], ...] = ()
    dtype: str = "float32"  # the compute dtype it is measured in
    float_folder: str | None = None  # float32/bfloat16: the model saved as a float folder in this dtype


def variants(distill_steps: int | None) -> list[Variant]:
    quantize = ("quantize", "--model", "{src}", "-o", "{out}", "--method")
    magnitude = ("prune", "--model", "{src}", "-o", "{out}", "--method", "magnitude")  # needs no calibration
    prune = ("prune", "--model", "{src}", "-o", "{out}", "--calib", CALIB_TEXT, "--method")
    distill = ("distill", "--teacher", "{model}", "--student", "{src}", "--text", CALIB_TEXT, "-o", "{out}")
    if distill_steps is not None:
        distill += ("--steps", str(distill_steps))
    return [
        Variant("float32", "the model dequantized to float32", dtype="float32", float_folder="float32"),
        Variant("bfloat16", "bfloat16 weights and compute", dtype="bfloat16", float_folder="bfloat16"),
        Variant("int8", "int8 per-channel weights", (quantize + ("int8",),)),
        Variant("int4-rtn", "int4 groups of 32, round to nearest", (quantize + ("int4",),)),
        Variant("int4-rtn+int8-head", "int4-rtn projections, int8 output head (llama.cpp Q4_1's precision)",
                (quantize + ("int4", "--head", "int8"),)),
        Variant("int4-awq", "int4 groups of 32, activation-aware (calibrated)",
                (quantize + ("int4", "--calib", CALIB_TEXT),)),
        Variant("int4-awq+int8-head", "int4-awq projections, int8 output head",
                (quantize + ("int4", "--calib", CALIB_TEXT, "--head", "int8"),)),
        Variant("magnitude-0.3", "30% unstructured, smallest magnitude", (magnitude + ("--sparsity", "0.3"),)),
        Variant("magnitude-0.5", "50% unstructured, smallest magnitude", (magnitude + ("--sparsity", "0.5"),)),
        Variant("wanda-0.3", "30% unstructured, magnitude x input norm", (prune + ("wanda", "--sparsity", "0.3"),)),
        Variant("wanda-0.5", "50% unstructured, magnitude x input norm", (prune + ("wanda", "--sparsity", "0.5"),)),
        Variant("2:4", "2 of every 4 weights (semi-structured)", (prune + ("2:4",),)),
        Variant("heads-0.33", "a third of the query heads removed", (prune + ("heads", "--sparsity", "0.33"),)),
        Variant("heads-0.5", "half of the query heads removed", (prune + ("heads", "--sparsity", "0.5"),)),
        Variant("ffn-0.25", "25% of the FFN channels removed", (prune + ("ffn", "--sparsity", "0.25"),)),
        Variant("ffn-0.5", "50% of the FFN channels removed", (prune + ("ffn", "--sparsity", "0.5"),)),
        Variant("ffn-0.5+distill", "ffn-0.5, then distilled from the float model",
                (prune + ("ffn", "--sparsity", "0.5"), distill)),
        Variant("ffn-0.5+distill+int4-awq", "the distilled student, then int4-awq",
                (prune + ("ffn", "--sparsity", "0.5"), distill, quantize + ("int4", "--calib", CALIB_TEXT))),
    ]


@dataclass
class TableSettings:
    model: str | None = None
    work_dir: str | None = None
    only: list[str] | None = None
    distill_steps: int | None = None
    eval_tokens: int = 6000
    decode_tokens: int = 64
    repeats: int = 3
    threads: int | None = None
    keep: bool = False  # keep every built folder (in --work-dir) instead of removing each once measured
    selected: list[Variant] = field(default_factory=list)

    def validate(self) -> None:
        every = variants(self.distill_steps)
        names = [v.name for v in every]
        if self.only:
            unknown = [n for n in self.only if n not in names]
            if unknown:
                raise InvalidRequestError(f"unknown variant {unknown[0]!r}; choose from {', '.join(names)}")
        self.selected = [v for v in every if not self.only or v.name in self.only]
        if self.eval_tokens < 1024:
            raise InvalidRequestError(f"--eval-tokens must be at least 1024, got {self.eval_tokens}")
        if self.decode_tokens < 2 or self.repeats < 1:
            raise InvalidRequestError("--decode-tokens must be at least 2 and --repeats at least 1")
        if self.distill_steps is not None and self.distill_steps < 1:
            raise InvalidRequestError(f"--distill-steps must be at least 1, got {self.distill_steps}")
        if self.threads is not None and self.threads < 1:
            raise InvalidRequestError(f"--threads must be at least 1, got {self.threads}")


def log(message: str) -> None:
    print(f"[bench compression] {message}", file=sys.stderr, flush=True)


def leapllm_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "leapllm", *args]


def folder_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def run_child(argv: list[str], env: dict, what: str) -> str:
    """Run a child process; its stdout, or RuntimeError with the last line it wrote to stderr."""
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{what} exited with {proc.returncode}: {tail}")
    return proc.stdout


def this_module(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "leapllm.benchmarking.compression_table", *args]


def run_step(step: tuple[str, ...], src: str, out: Path, model: str, env: dict) -> None:
    argv = [a.replace("{src}", src).replace("{out}", str(out)).replace("{model}", model) for a in step]
    log("$ leapllm " + " ".join(argv))
    run_child(leapllm_command(argv), env, f"`leapllm {argv[0]}`")


def step_folder(work: Path, steps: tuple[tuple[str, ...], ...]) -> Path:
    """One folder per chain of steps, so variants that start the same way (ffn-0.5, then distill,
    then int4) build the shared steps once."""
    return work / ("step-" + hashlib.sha1(json.dumps(steps).encode()).hexdigest()[:12])


def build(variant: Variant, model: str, work: Path, env: dict) -> Path:
    """The variant's folder, built unless it already is (a finished folder is reused)."""
    if variant.float_folder:
        out = work / variant.name
        if not out.is_dir():
            argv = ["--write-float-folder", str(out), "--dtype", variant.float_folder, "--model", model]
            run_child(this_module(argv), env, f"writing the {variant.float_folder} folder")
        return out
    src = model
    for i, step in enumerate(variant.steps):
        out = step_folder(work, variant.steps[:i + 1])
        if not out.is_dir():  # the commands write atomically: a folder that exists is complete
            run_step(step, src, out, model, env)
        src = str(out)
    return Path(src)


def remove_unneeded(folder: Path, later: list[Variant], work: Path) -> None:
    """Free the disk: a measured folder goes unless a later variant builds on it."""
    needed = {step_folder(work, v.steps[:i + 1]) for v in later for i in range(len(v.steps))}
    if folder not in needed:
        shutil.rmtree(folder, ignore_errors=True)


def measure(folder: Path, variant: Variant, settings: TableSettings, env: dict) -> dict:
    argv = ["--measure", str(folder), "--dtype", variant.dtype, "--eval-tokens", str(settings.eval_tokens),
            "--decode-tokens", str(settings.decode_tokens), "--repeats", str(settings.repeats)]
    stdout = run_child(this_module(argv), env, f"measuring {variant.name}")
    return json.loads(stdout.strip().splitlines()[-1])


def run_table(settings: TableSettings, command: str | None = None) -> dict:
    from leapllm.loading.default_model import default_model_path

    settings.validate()
    model = str(Path(settings.model).expanduser()) if settings.model else str(default_model_path())
    if not Path(model).exists():
        raise InvalidRequestError(f"model {model} does not exist")
    if settings.work_dir:
        work = Path(settings.work_dir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="leapllm-compression-"))
    env = dict(os.environ)
    if settings.threads:
        env["LEAPLLM_THREADS"] = str(settings.threads)
    rows = []
    for index, variant in enumerate(settings.selected):
        row = {"name": variant.name, "description": variant.description, "dtype": variant.dtype, "status": "ok"}
        start = time.perf_counter()
        try:
            folder = build(variant, model, work, env)
            row["build_s"] = round(time.perf_counter() - start, 1)
            row["size_mib"] = round(folder_mib(folder), 1)
            log(f"measuring {variant.name} ({row['size_mib']} MiB)")
            row |= measure(folder, variant, settings, env)
            log(f"{variant.name}: {row['decode_tok_s']:.1f} tok/s, perplexity {row['perplexity']:.4f}, "
                f"peak {row['peak_rss_mib']:.0f} MiB")
            if not settings.keep:
                remove_unneeded(folder, settings.selected[index + 1:], work)
        except Exception as exc:  # one variant failing must not lose the others' figures
            row["status"] = "failed"
            row["error"] = str(exc)
            log(f"{variant.name} failed: {exc}")
        rows.append(row)
    add_ratios(rows)
    if not settings.keep and not settings.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return {"command": command, "model": Path(model).name, "eval_text": EVAL_TEXT, "calibration_text": CALIB_TEXT,
            "eval_tokens": settings.eval_tokens, "decode_tokens": settings.decode_tokens, "repeats": settings.repeats,
            "threads": settings.threads, "cpu_count": os.cpu_count(), "rows": rows}


def add_ratios(rows: list[dict]) -> None:
    base = next((r for r in rows if r["name"] == "float32" and r["status"] == "ok"), None)
    for r in rows:
        if base is None or r["status"] != "ok":
            continue
        r["size_x"] = r["size_mib"] / base["size_mib"]
        r["peak_x"] = r["peak_rss_mib"] / base["peak_rss_mib"]
        r["decode_x"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["perplexity_change"] = r["perplexity"] / base["perplexity"] - 1
        if "perplexity_decode_kernels" in r:
            r["perplexity_decode_kernels_change"] = r["perplexity_decode_kernels"] / base["perplexity"] - 1


def markdown(report: dict) -> str:
    head = ("| variant | what | size MiB | x f32 | peak MiB | x f32 | decode tok/s | x f32 | perplexity | vs f32 "
            "| perplexity, decode kernels | vs f32 |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | {r['description']} | failed: {r.get('error', '')} |||||||||")
            continue
        change = r.get("perplexity_change")
        kernel_ppl, kernel_change = r.get("perplexity_decode_kernels"), r.get("perplexity_decode_kernels_change")
        lines.append(
            f"| {r['name']} | {r['description']} | {r['size_mib']:.0f} | {r.get('size_x', float('nan')):.2f} | "
            f"{r['peak_rss_mib']:.0f} | {r.get('peak_x', float('nan')):.2f} | {r['decode_tok_s']:.1f} | "
            f"{r.get('decode_x', float('nan')):.2f} | {r['perplexity']:.3f} | "
            f"{'' if change is None else f'{change:+.1%}'} | "
            f"{'' if kernel_ppl is None else f'{kernel_ppl:.3f}'} | "
            f"{'' if kernel_change is None else f'{kernel_change:+.1%}'} |")
    notes = (f"\nPerplexity: {report['eval_tokens']} tokens of `{report['eval_text']}`, windows of 512, stride 256; "
             "for models on leapllm's CPU kernels also through the int8-activation tiles that generation uses "
             "(scoring's many rows otherwise take their bfloat16 GEMM path). "
             f"Decode: batch 1, greedy, {report['decode_tokens']} tokens after a 128-token prompt, median of "
             f"{report['repeats']}. Calibration and distillation text: `{report['calibration_text']}`. "
             f"{report['cpu_count']} CPUs.\n")
    cmd = f"\nCommand: `{report['command']}`\n" if report.get("command") else ""
    return head + "\n".join(lines) + "\n" + notes + cmd


# -- the measuring process ------------------------------------------------------------------------

def write_float_folder(model: str, dtype: str, out: Path) -> None:
    import torch

    from leapllm.loading.model_folder import float_tensors, save_model_folder
    from leapllm.loading.loader import load_model

    loaded = load_model(model, dtype=dtype, device="cpu")
    tensors = {k: v.to(getattr(torch, dtype)) for k, v in float_tensors(loaded.model).items()}
    save_model_folder(out, loaded.config, loaded.tokenizer, tensors, None,
                      [{"method": dtype, "source": loaded.path.name}])


def measure_in_this_process(folder: str, dtype: str, eval_tokens: int, decode_tokens: int, repeats: int) -> dict:
    from leapllm import LLM, SamplingParams
    from leapllm.benchmarking.systems import memory_snapshot
    from leapllm.evaluation.perplexity import perplexity
    from leapllm.evaluation.texts import load_text
    from leapllm.model.quantized.layers import packed_linear_of

    threads = os.environ.get("LEAPLLM_THREADS")
    start = time.perf_counter()
    llm = LLM(folder, dtype=dtype, device="cpu", num_threads=int(threads) if threads else None)
    load_s = time.perf_counter() - start
    ids = llm.tokenizer.encode(load_text(EVAL_TEXT))
    prompt = ids[:128]
    params = SamplingParams(max_tokens=decode_tokens, temperature=0, ignore_eos=True)
    llm.run(prompt, params)  # warm-up
    rates = [llm.run(prompt, params).timings["decode_tokens_per_s"] for _ in range(repeats)]
    peak = memory_snapshot()["peak_rss_mib"]  # before perplexity, whose batched logits would dominate
    ppl = perplexity(llm.model, ids[:eval_tokens], ctx=512, stride=256)
    result = {"load_s": round(load_s, 2), "decode_tok_s": statistics.median(rates), "decode_runs": rates,
              "peak_rss_mib": peak, "perplexity": ppl.perplexity, "eval_tokens_scored": ppl.tokens}
    if any(packed_linear_of(m) is not None for m in llm.model.modules()):
        # Scoring runs many rows per matmul, which leapllm's kernels compute as a bfloat16 GEMM;
        # generation runs a few rows at a time through the int8-activation tiles. Score those too.
        from leapllm.kernels import packing

        packing.DOT_KERNEL_MAX_ROWS = 1 << 30
        result["perplexity_decode_kernels"] = perplexity(llm.model, ids[:eval_tokens], ctx=512, stride=256).perplexity
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m leapllm.benchmarking.compression_table",
                                description="one variant's measurement (run by `leapllm bench compression`)")
    p.add_argument("--measure", metavar="FOLDER")
    p.add_argument("--write-float-folder", metavar="FOLDER")
    p.add_argument("--model")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--eval-tokens", type=int, default=6000)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.write_float_folder:
        write_float_folder(args.model, args.dtype, Path(args.write_float_folder))
        return 0
    result = measure_in_this_process(args.measure, args.dtype, args.eval_tokens, args.decode_tokens, args.repeats)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
