"""`leapllm profile`: where the time goes, stage by stage, in prefill and decode.

    leapllm profile [--prompt-len 512] [--gen-len 128] [--batch 1] [--json out.json] [--report out.html]
    leapllm profile --sweep [--sweep-prompt-lens 128,256,...] [--sweep-batches 1,2,4,...]
    leapllm profile --machine        # measure this device's bandwidth and matmul FLOP/s again, print, exit
"""

from __future__ import annotations

import argparse
import sys

from leapllm.cli import common
from leapllm.cli.args import add_model_args, add_speculative_args, model_settings_from_args
from leapllm.errors import InvalidRequestError


def add_profile_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `profile` subcommand to the `leapllm` parser's subparsers."""
    p = subparsers.add_parser(
        "profile", help="time every stage of prefill and decode; FLOPs, bytes, roofline, HTML report",
        description="Time each stage (embedding, norms, projections, rotary, attention, MLP, head, sampling, "
                    "other) in prefill and decode, next to its analytic FLOPs and bytes and the machine's "
                    "measured limits.")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens per sequence (default 512)")
    p.add_argument("--gen-len", type=int, default=128, help="decode steps (default 128)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run each step this many times with and without hooks and keep the fastest (default 1)")
    p.add_argument("--json", metavar="PATH", default=None, help="write the full results as JSON")
    p.add_argument("--report", metavar="PATH", default=None, help="write a self-contained HTML report with plots")
    p.add_argument("--per-layer", action="store_true", help="also print the stage times of every layer")
    p.add_argument("--sweep", action="store_true",
                   help="also time the stages as the prompt grows (prefill) and as the batch grows (decode)")
    p.add_argument("--sweep-prompt-lens", metavar="N,N,...", default=None,
                   help="prompt lengths of the sweep (implies --sweep; default 128,256,512,1024,2048,4096, "
                        "capped by the context)")
    p.add_argument("--sweep-batches", metavar="N,N,...", default=None,
                   help="batch sizes of the sweep (implies --sweep; default 1,2,4,8,16,32,64)")
    p.add_argument("--machine", action="store_true",
                   help="measure this device's peak bandwidth and matmul FLOP/s again, cache and print them, exit")
    add_model_args(p)
    add_speculative_args(p)
    p.set_defaults(func=cmd_profile)
    return p


def _int_list(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InvalidRequestError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise InvalidRequestError(f"{flag} takes positive integers, got {text!r}")
    return values


def _check_args(args) -> tuple[list[int] | None, list[int] | None]:
    """Everything that can be checked before loading the model (fail fast)."""
    from leapllm.output_files import check_writable

    for flag, value in (("--prompt-len", args.prompt_len), ("--gen-len", args.gen_len), ("--batch", args.batch),
                        ("--repeats", args.repeats)):
        if value < 1:
            raise InvalidRequestError(f"{flag} must be at least 1, got {value}")
    model_settings_from_args(args)  # --threads and --dtype, before --machine uses them
    if args.json:
        check_writable(args.json, "JSON")
    if args.report:
        check_writable(args.report, "report")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InvalidRequestError("--report needs matplotlib for its plots: pip install matplotlib") from None
    return _int_list(args.sweep_prompt_lens, "--sweep-prompt-lens"), _int_list(args.sweep_batches, "--sweep-batches")


def _say(message: str) -> None:
    print(f"[profile] {message}", file=sys.stderr, flush=True)


def _measuring(device) -> None:
    _say(f"measuring the limits of {device} once (bandwidth and matmul FLOP/s; cached for next time)")


def cmd_machine(args) -> int:
    import torch

    from leapllm.loading.loader import resolve_device
    from leapllm.profiling.machine import default_cache_path, machine_limits
    from leapllm.profiling.report import machine_line

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    _measuring(device)
    limits = machine_limits(device, remeasure=True)
    for dtype, flops in limits.flops.items():
        print(f"{dtype:>9} matmul: {flops / 1e9:,.1f} GFLOP/s")
    print(f"   bandwidth: {limits.bandwidth / 1e9:,.2f} GB/s (streaming read)")
    print(machine_line(limits.to_dict(), "float32"))
    print(f"cached in {default_cache_path()}")
    return 0


def cmd_profile(args) -> int:
    sweep_lens, sweep_batches = _check_args(args)
    if args.machine:
        return cmd_machine(args)

    from leapllm.profiling.machine import machine_limits
    from leapllm.profiling.profiler import (DEFAULT_SWEEP_BATCHES, check_run, check_sweep,
                                            default_sweep_prompt_lens, profile_model, sweep_model)
    from leapllm.profiling.report import print_tables, write_html, write_json

    llm = common.load_llm(args)
    model = llm.model
    check_run(model.config, args.prompt_len, args.gen_len, args.batch, args.repeats)
    do_sweep = args.sweep or sweep_lens is not None or sweep_batches is not None
    if do_sweep:
        sweep_lens = sweep_lens or default_sweep_prompt_lens(model.config)
        sweep_batches = sweep_batches or list(DEFAULT_SWEEP_BATCHES)
        check_sweep(model.config, sweep_lens, sweep_batches)
    machine = machine_limits(model.device, on_measure=lambda: _measuring(model.device))
    data = profile_model(model, llm.tokenizer, prompt_len=args.prompt_len, gen_len=args.gen_len,
                         batch=args.batch, repeats=args.repeats, machine=machine, progress=_say)
    data["model"]["file"] = llm.path.name  # the name only: reports get shared, paths are local
    if do_sweep:
        data["sweep"] = sweep_model(model, llm.tokenizer, prompt_lens=sweep_lens, batches=sweep_batches,
                                    repeats=args.repeats, machine=machine, progress=_say)
    if llm.speculative is not None:
        from leapllm.profiling.profiler import prompt_rows
        from leapllm.profiling.speculation import describe, profile_speculation

        _say("speculative decoding: the same prompt, plain and speculating")
        data["speculative"] = profile_speculation(model, llm.tokenizer, llm.speculative,
                                                  prompt_rows(llm.tokenizer, args.prompt_len, 1)[0], args.gen_len)
    print_tables(data, per_layer=args.per_layer)
    if "speculative" in data:
        print("\n" + describe(data["speculative"]))
    if args.json:
        write_json(data, args.json)
        _say(f"wrote {args.json}")
    if args.report:
        write_html(data, args.report)
        _say(f"wrote {args.report}")
    return 0
