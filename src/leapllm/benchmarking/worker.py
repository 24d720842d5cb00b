"""A benchmark worker: one process that loads ONE system and answers measurement requests.

    python -m leapllm.benchmarking.worker --system NAME --model FILE --device cpu --threads N --max-seq-len L
        [--draft-model PATH] [--num-speculative-tokens K]

It speaks JSON lines. After loading it writes one line to stdout:

    {"event": "ready", "load_s": ..., "memory": {...}, "info": {...}, "pid": ...}
    {"event": "missing", "reason": "..."}            (it could not load; it then exits)

then reads requests on stdin and answers each with one line:

    {"op": "prefill", "ids": [...]}                          -> {"ok": true, "seconds": s}
    {"op": "decode", "ids": [...], "n": n}                   -> {"ok": true, "seconds": s, "tokens": [...]}
    {"op": "decode_many", "prompts": [[...], ...], "n": n}  -> {"ok": true, "seconds": summed s,
                                                                "tokens": [[...], ...]}
    {"op": "batched_decode", "ids": [...], "batch": b, "n": n} -> {"ok": true, "seconds": s, "tokens": [[...], ...]}
    {"op": "serve", "prompts": [[...], ...], "n": n}        -> {"ok": true, "seconds": s, "ttft": [s, ...],
                                                                "tokens": [[...], ...]}
    {"op": "memory"}                                         -> {"ok": true, "memory": {...}}
    {"op": "quit"}                                           -> {"ok": true}, and exits
    a failed request                                         -> {"ok": false, "error": "...", "unsupported": bool}

A system that speculates adds "speculation" to its decode answers: {"proposed": p, "accepted": a,
"speculative_steps": s} for decode, one such dict per prompt for decode_many (what that call proposed
and kept; the system keeps running totals).

End of stdin (the harness went away) also ends it. stdout carries nothing but these lines:
whatever a library prints there is sent to stderr instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from leapllm.benchmarking.systems import (
    System, SystemMissing, Unsupported, make_system, memory_snapshot, release_freed_memory,
)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def protocol_stream() -> IO[str]:
    """A private copy of stdout for the protocol; fd 1 itself now points at stderr."""
    fd = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(fd, "w", encoding="utf-8", buffering=1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m leapllm.benchmarking.worker", description=__doc__.split("\n")[0])
    p.add_argument("--system", required=True)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--max-seq-len", type=int, required=True)
    p.add_argument("--draft-model", type=Path, default=None, help="the draft of a leapllm-<dtype>+draft system")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    return p.parse_args(argv)


def load(system: System, cuda: bool) -> dict:
    """Import, then load; memory before and after loading, so imports are not billed to the model."""
    system.import_libraries()
    release_freed_memory()
    if cuda and system.uses_cuda_allocator():
        import torch
        torch.cuda.reset_peak_memory_stats()
    before = memory_snapshot(cuda and system.uses_cuda_allocator())
    start = time.perf_counter()
    system.load()
    load_s = time.perf_counter() - start
    release_freed_memory()  # what stays resident; the peak (VmHWM) keeps the load's temporaries
    after = memory_snapshot(cuda and system.uses_cuda_allocator())
    return {"event": "ready", "load_s": load_s, "memory": {"before_load": before, "after_load": after},
            "info": system.info(), "pid": os.getpid()}


def counts_since(system: System, before: dict | None) -> dict | None:
    """What the system proposed and kept since `before` (its speculation_counts() then)."""
    after = system.speculation_counts()
    if before is None or after is None:
        return None
    return {k: after[k] - before.get(k, 0) for k in after}


def decode(system: System, ids: list[int], n: int) -> tuple[float, list[int], dict | None]:
    before = system.speculation_counts()
    seconds, tokens = system.decode(ids, n)
    return seconds, tokens, counts_since(system, before)


def answer(system: System, request: dict, cuda: bool) -> dict:
    op = request.get("op")
    if op == "prefill":
        return {"seconds": system.prefill(request["ids"])}
    if op == "decode":
        seconds, tokens, counts = decode(system, request["ids"], request["n"])
        reply = {"seconds": seconds, "tokens": tokens}
        if counts is not None:
            reply["speculation"] = counts
        return reply
    if op == "decode_many":
        # One batch-1 decode per prompt, one after another; only decode time counts (summed).
        results = [decode(system, list(ids), request["n"]) for ids in request["prompts"]]
        reply = {"seconds": sum(r[0] for r in results), "tokens": [r[1] for r in results]}
        if all(r[2] is not None for r in results):
            reply["speculation"] = [r[2] for r in results]
        return reply
    if op == "batched_decode":
        seconds, rows = system.batched_decode([list(request["ids"]) for _ in range(request["batch"])], request["n"])
        return {"seconds": seconds, "tokens": rows}
    if op == "serve":
        seconds, ttft, rows = system.serve([list(p) for p in request["prompts"]], request["n"])
        return {"seconds": seconds, "ttft": ttft, "tokens": rows}
    if op == "memory":
        return {"memory": memory_snapshot(cuda and system.uses_cuda_allocator())}
    raise ValueError(f"unknown request {op!r}")


def serve(system: System, requests: IO[str], send: Callable[[dict], None], cuda: bool) -> int:
    for line in requests:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            if request.get("op") == "quit":
                send({"ok": True})
                return 0
            reply = answer(system, request, cuda)
        except Unsupported as exc:
            reply = {"ok": False, "unsupported": True, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - reported to the harness, which marks the system failed
            reply = {"ok": False, "unsupported": False, "error": one_line(exc)}
        else:
            reply["ok"] = True
        send(reply)
    return 0  # stdin closed: the harness is gone


def main(argv: list[str] | None = None, make: Callable[..., System] = make_system) -> int:
    args = parse_args(argv)
    out = protocol_stream()

    def send(message: dict) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    cuda = args.device == "cuda"
    try:
        system = make(args.system, args.model, args.device, args.threads, args.max_seq_len,
                      draft_model=args.draft_model, num_speculative_tokens=args.num_speculative_tokens)
        ready = load(system, cuda)
    except SystemMissing as exc:
        send({"event": "missing", "reason": str(exc)})
        return 0
    except Exception as exc:  # noqa: BLE001 - whatever the reason, report it instead of a number
        send({"event": "missing", "reason": one_line(exc)})
        return 0
    send(ready)
    return serve(system, sys.stdin, send, cuda)


if __name__ == "__main__":
    sys.exit(main())
