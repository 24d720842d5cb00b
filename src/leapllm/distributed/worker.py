"""A tensor-parallel rank other than 0, as rank 0 starts it on the same machine:

    python -m leapllm.distributed.worker --rank R --world-size N --port PORT [--model PATH] ...

It loads the model, says so in the rendezvous store on 127.0.0.1:PORT (or writes its error there),
connects to the other ranks, takes its shard and runs the forward passes rank 0 sends until rank 0
says stop (exit 0) or goes away (exit 1, one line on stderr).
"""

from __future__ import annotations

import argparse
import signal
import sys

import torch
import torch.distributed as dist

from leapllm.distributed.communicator import COLLECTIVE_TIMEOUT, Communicator
from leapllm.distributed.runtime import (
    RankSettings,
    first_line,
    load_rank_model,
    rank_device,
    run_worker,
)
from leapllm.distributed.tensor_parallel import shard_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m leapllm.distributed.worker")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--port", type=int, required=True, help="rank 0's rendezvous store on 127.0.0.1")
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, required=True)
    args = p.parse_args(argv)
    # Ctrl-C in a terminal reaches the whole process group; rank 0 alone decides when the workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rank, world_size = args.rank, args.world_size
    store = dist.TCPStore("127.0.0.1", args.port, world_size, False, timeout=COLLECTIVE_TIMEOUT)
    try:
        device = rank_device(args.device, rank, world_size)
        if device.type == "cpu":
            torch.set_num_threads(args.threads)
        loaded = load_rank_model(RankSettings(args.model, args.dtype, args.device, args.threads), world_size, device)
    except Exception as exc:  # rank 0 reports it (it usually hits the same error itself first)
        store.set(f"error/{rank}", str(exc) or type(exc).__name__)
        return 2
    try:
        store.set(f"ready/{rank}", "1")
        comm = Communicator(store, rank, world_size, device, hostname="127.0.0.1")
        shard_model(loaded.model, rank, world_size, comm)
        run_worker(loaded.model, comm)
    except RuntimeError as exc:  # a broken connection: rank 0 (or another rank) is gone
        print(f"leapllm: tensor-parallel rank {rank}: lost the other ranks ({first_line(exc)}); exiting",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
