"""The collectives of one tensor-parallel group, on process groups it owns.

Two process groups over the same rendezvous store:

- `data`: the all-reduces and the logits gather inside every forward pass (NCCL on CUDA, gloo on
  CPU). Its timeout is short: all ranks run the same forward at the same time, so a collective
  that waits long means a rank is stuck.
- `control` (always gloo, on CPU): rank 0 sends each step's inputs to the other ranks. Those
  ranks wait there while the server is idle, so their receive has no practical timeout; a rank 0
  that dies still ends the wait at once, because its sockets close.

The groups are objects of this class, not torch.distributed's global default group, so one
process can hold several groups (two `LLM(tensor_parallel=2)` in one program, tests).
"""

from __future__ import annotations

import json
import math
from datetime import timedelta

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = timedelta(seconds=120)
IDLE_TIMEOUT = timedelta(days=365)  # a worker waiting for the next step: as long as the server runs


def gloo_group(store, rank: int, world_size: int, timeout: timedelta, hostname: str | None):
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    # On one machine, loopback; across machines, the interface GLOO_SOCKET_IFNAME names (or the host name's).
    device = (dist.ProcessGroupGloo.create_device(hostname=hostname) if hostname
              else dist.ProcessGroupGloo.create_default_device())
    options._devices = [device]
    return dist.ProcessGroupGloo(store, rank, world_size, options)


class Communicator:
    def __init__(self, store, rank: int, world_size: int, device: torch.device, hostname: str | None = None):
        """Connect to the other ranks; every rank calls this with the same store (it blocks until all have)."""
        self.rank, self.world_size, self.device = rank, world_size, device
        self.control = gloo_group(dist.PrefixStore("control", store), rank, world_size, COLLECTIVE_TIMEOUT, hostname)
        data_store = dist.PrefixStore("data", store)
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = COLLECTIVE_TIMEOUT
            self.data = dist.ProcessGroupNCCL(data_store, rank, world_size, options)
        else:
            self.data = gloo_group(data_store, rank, world_size, COLLECTIVE_TIMEOUT, hostname)

    # -- inside the forward pass -----------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over all ranks, in place."""
        self.data.allreduce([tensor]).wait()

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `tensor` (same shape on all), on rank 0; None on the others."""
        options = dist.GatherOptions()
        options.rootRank = 0
        out = [[torch.empty_like(tensor) for _ in range(self.world_size)]] if self.rank == 0 else []
        self.data.gather(out, [tensor], options).wait()
        return out[0] if self.rank == 0 else None

    # -- between steps ---------------------------------------------------------------------------
    # A message is a JSON header and a list of tensors, sent as one byte buffer (no pickle: a
    # rank never runs code it receives).
    def send(self, header: dict, tensors: list[torch.Tensor] = ()) -> None:
        """Rank 0: send `header` (JSON-able) and `tensors` to every other rank."""
        tensors = [t.detach().to("cpu").contiguous() for t in tensors]
        meta = json.dumps({"header": header, "tensors": [[str(t.dtype).removeprefix("torch."), list(t.shape)]
                                                          for t in tensors]}).encode()
        parts = [torch.frombuffer(bytearray(meta), dtype=torch.uint8)]
        parts += [t.reshape(-1).view(torch.uint8) for t in tensors]
        self.control.broadcast(torch.tensor([len(meta), sum(p.numel() for p in parts)]), 0).wait()
        self.control.broadcast(torch.cat(parts), 0).wait()

    def receive(self) -> tuple[dict, list[torch.Tensor]]:
        """Ranks other than 0: wait for rank 0's next message, as long as it takes; (header, tensors)."""
        sizes = torch.zeros(2, dtype=torch.long)
        self.control.broadcast(sizes, 0, IDLE_TIMEOUT).wait()
        meta_len, total = sizes.tolist()
        buffer = torch.empty(total, dtype=torch.uint8)
        self.control.broadcast(buffer, 0).wait()
        meta = json.loads(buffer[:meta_len].numpy().tobytes())
        tensors, offset = [], meta_len
        for dtype_name, shape in meta["tensors"]:
            dtype = getattr(torch, dtype_name)
            nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            tensors.append(buffer[offset:offset + nbytes].clone().view(dtype).reshape(shape))
            offset += nbytes
        return meta["header"], tensors
