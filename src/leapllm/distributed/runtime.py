"""Running a tensor-parallel model: starting the ranks, rank 0's view of the model, the other ranks' loop.

Rank 0 is the process that builds `LLM(tensor_parallel=N)` or runs `leapllm serve --tensor-parallel
N`. It runs the engine (scheduler, sampling, detokenization) exactly as a single process does, on
a `TensorParallelModel`: before each forward pass, that object sends the pass's inputs (token ids,
positions, new tokens' slots, block tables and lengths, the logits rows wanted) to ranks 1..N-1, which
run the same pass on their shard and their own part of the KV cache. The all-reduces inside the
pass and the logits gather bring the results together on rank 0.

Ranks 1..N-1 are started here (`python -m leapllm.distributed.worker`, on this machine, over
loopback), or by torchrun on any machines (see docs/scale-out.md); under torchrun every process
runs the same command and the ones with RANK > 0 become workers.

A rank that dies ends the group: rank 0 watches the workers it started, and treats any failed
forward pass as fatal too (the ranks are out of step after it). The group then records a message
naming the rank, every later forward raises TensorParallelError at once, and the callbacks
registered with `on_failure` run (`leapllm serve` stops itself with that message).
"""

from __future__ import annotations

import atexit
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from leapllm.config import available_cpus
from leapllm.distributed.communicator import COLLECTIVE_TIMEOUT, Communicator
from leapllm.distributed.tensor_parallel import (
    check_tensor_parallel,
    local_kv_heads,
    shard_model,
)
from leapllm.errors import InvalidRequestError, LeapLLMError
from leapllm.loading.loader import LoadedModel, load_model, resolve_device
from leapllm.model.kv_cache import KVCache, kv_storage_dtype
from leapllm.model.llama import Transformer
from leapllm.model.paged_kv_cache import (
    DecodeGroup,
    PagedAttentionBatch,
    PagedKVCache,
    PrefillChunk,
    SequenceTables,
)

STARTUP_TIMEOUT_S = 900.0  # for the workers to load the model


class TensorParallelError(LeapLLMError):
    """A tensor-parallel rank could not start, or died: the group cannot run forward passes any more."""


@dataclass
class RankSettings:
    """What every rank loads, as `LLM` and `leapllm serve` were given it."""
    model: str | None
    dtype: str
    device: str
    threads: int | None


def threads_per_rank(threads: int | None, ranks_here: int) -> int:
    """Ranks on one machine share its cores: by default each gets an equal part (at least one)."""
    return threads if threads is not None else max(1, len(available_cpus()) // ranks_here)


def rank_device(device: str, local_rank: int, ranks_here: int) -> torch.device:
    """CPU for every rank, or GPU `local_rank` of this machine."""
    dev = resolve_device(device)
    if dev.type == "cpu":
        return dev
    if dev.index is not None:
        raise InvalidRequestError("with tensor parallelism pass --device cuda, not cuda:N: rank r uses GPU r "
                                  "of its machine")
    if torch.cuda.device_count() < ranks_here:
        raise InvalidRequestError(f"{ranks_here} tensor-parallel ranks on this machine need {ranks_here} GPUs; "
                                  f"it has {torch.cuda.device_count()}")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def torchrun_rank() -> tuple[int, int, int, int] | None:
    """(rank, world size, local rank, ranks on this machine) when torchrun (or its env variables) started us."""
    env = os.environ
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return None
    world = int(env["WORLD_SIZE"])
    return int(env["RANK"]), world, int(env.get("LOCAL_RANK", env["RANK"])), int(env.get("LOCAL_WORLD_SIZE", world))


def load_rank_model(settings: RankSettings, world_size: int, device: torch.device) -> LoadedModel:
    loaded = load_model(settings.model, dtype=settings.dtype, device=device)
    check_tensor_parallel(loaded.model, world_size)
    return loaded


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def exit_description(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


# -- the paged batch on the wire ---------------------------------------------------------------------
# The batch holds, per sequence, the pool slot of every position it attends to, and masks; both
# follow from the block tables and lengths, which are block_size times smaller. So those go over
# the wire, and the other ranks rebuild the very same tensors (as build_paged_batch made them).

def batch_message(batch: PagedAttentionBatch, block_size: int) -> tuple[dict, list[torch.Tensor]]:
    header, tensors = one_batch_message(batch, block_size)
    if batch.windowed is not None:
        header["windowed"], more = one_batch_message(batch.windowed, block_size)
        tensors += more
    return header, tensors


def one_batch_message(batch: PagedAttentionBatch, block_size: int) -> tuple[dict, list[torch.Tensor]]:
    tensors = [batch.slot_mapping, batch.positions]
    if batch.tables is not None:  # attention in place on a GPU: the tables themselves are the message
        t = batch.tables
        tensors += [t.block_tables, t.seq_lens, t.query_start]
        return {"num_decode": batch.num_decode, "max_query_len": t.max_query_len}, tensors
    decode_groups, prefills = [], []
    for g in batch.decode_groups:
        decode_groups.append([g.start, g.end, g.slots.shape[1]])
        tensors += [g.slots[:, ::block_size] // block_size, g.lengths]  # block tables, lengths
    for c in batch.prefills:
        prefills.append([c.start, c.end, c.slots is not None, c.verify])
        if c.slots is not None:
            tensors.append(c.slots[::block_size] // block_size)
    return {"num_decode": batch.num_decode, "decode_groups": decode_groups, "prefills": prefills}, tensors


def slots_of(tables: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    j = torch.arange(length, device=tables.device)
    return tables.clamp(min=0)[..., j // block_size] * block_size + j % block_size  # as slot_table: freed -> 0


def batch_from_message(header: dict, tensors: list[torch.Tensor], block_size: int) -> PagedAttentionBatch:
    it = iter(tensors)
    batch = one_batch_from_message(header, it, block_size)
    if "windowed" in header:
        batch.windowed = one_batch_from_message(header["windowed"], it, block_size)
    return batch


def one_batch_from_message(header: dict, it, block_size: int) -> PagedAttentionBatch:
    slot_mapping, positions = next(it), next(it)
    if "max_query_len" in header:
        tables = SequenceTables(next(it), next(it), next(it), header["max_query_len"])
        return PagedAttentionBatch(slot_mapping, positions, header["num_decode"], [], [], tables=tables)
    groups = []
    for start, end, max_len in header["decode_groups"]:
        tables, lengths = next(it), next(it)
        mask = torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]
        groups.append(DecodeGroup(start, end, slots_of(tables, max_len, block_size), mask[:, None, None, :],
                                  lengths.long()))
    prefills = []
    for start, end, cached, verify in header["prefills"]:
        if not cached:
            prefills.append(PrefillChunk(start, end, 0, None, verify))
            continue
        table = next(it)
        n, context = end - start, int(positions[end - 1]) + 1
        prefills.append(PrefillChunk(start, end, context - n, slots_of(table, context, block_size), verify))
    return PagedAttentionBatch(slot_mapping, positions, header["num_decode"], groups, prefills)


# -- rank 0 ------------------------------------------------------------------------------------------

class TensorParallelGroup:
    """Rank 0's handle on the group: its communicator, the workers it started (if any), and whether it failed."""

    def __init__(self, comm: Communicator, workers: list[subprocess.Popen]):
        self.comm, self.workers = comm, workers
        self.world_size = comm.world_size
        self.failure: str | None = None
        self._callbacks: list[Callable[[str], None]] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._closed = False
        if workers:
            threading.Thread(target=self._watch, name="leapllm-tp-monitor", daemon=True).start()
        atexit.register(self.close)

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """Call callback(message) (from some thread) when a rank dies or a forward pass fails."""
        with self._lock:
            self._callbacks.append(callback)
            failure = self.failure
        if failure is not None:
            callback(failure)

    def fail(self, message: str) -> None:
        with self._lock:
            if self.failure is not None:
                return
            self.failure = message
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback(message)

    def failed(self, exc: BaseException) -> TensorParallelError:
        """After a forward pass raised on rank 0: the group is over. The error to raise, naming a dead rank if any."""
        deadline = time.monotonic() + 2.0
        while self.failure is None and self.workers and time.monotonic() < deadline:
            # A dead peer usually shows up first as a broken connection; give the monitor a moment to name it.
            if any(p.poll() is not None for p in self.workers):
                self._check_workers()
                break
            time.sleep(0.05)
        self.fail(f"tensor-parallel forward failed on rank 0 ({first_line(exc)}); the ranks are out of step")
        return TensorParallelError(self.failure)

    def _check_workers(self) -> bool:
        for rank, proc in enumerate(self.workers, start=1):
            code = proc.poll()
            if code is not None and not self._closing.is_set():
                self.fail(f"tensor-parallel rank {rank} (pid {proc.pid}) {exit_description(code)}")
                return True
        return False

    def _watch(self) -> None:
        while not self._closing.is_set() and not self._check_workers():
            self._closing.wait(0.2)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the other ranks (they leave their loop and exit) and wait for the ones started here."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        atexit.unregister(self.close)
        if self.failure is None:
            try:
                self.comm.send({"op": "stop", "freed": []})
            except Exception:  # a rank died meanwhile: the ones left get a closed connection instead
                pass
        deadline = time.monotonic() + timeout
        for proc in self.workers:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()) if self.failure is None else 0.5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def stored_kv_dtype(values: torch.Tensor) -> str:
    """The config.KV_DTYPES name the other ranks build the same storage as rank 0's cache from."""
    return {torch.float16: "float16", torch.float32: "float32"}.get(values.dtype, "auto")


class TensorParallelModel(nn.Module):
    """Rank 0's model: its own shard, and every forward pass announced to the other ranks first.

    It stands in for a Transformer wherever the engine and LLM use one (forward, forward_paged,
    new_kv_cache, config, device, dtype). `config` is the full model's; the KV caches hold only
    this rank's kv heads (`num_cached_kv_heads`, which the model runner reads when it sizes its pool).
    """

    def __init__(self, shard: Transformer, group: TensorParallelGroup):
        super().__init__()
        self.shard, self.group = shard, group
        self.config = shard.config
        self.num_cached_kv_heads = local_kv_heads(shard)
        self._cache_ids: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._next_cache_id = itertools.count()
        self._freed: list[int] = []  # ids of caches garbage-collected here; the workers drop theirs next time
        self._lock = threading.Lock()  # one pass at a time: every rank must see the same order

    @property
    def device(self) -> torch.device:
        return self.shard.device

    @property
    def rope_threshold(self) -> int | None:
        return self.shard.rope_threshold

    @property
    def dtype(self) -> torch.dtype:
        return self.shard.dtype

    def new_kv_cache(self, batch_size: int, max_seq_len: int, kv_cache_dtype: str = "auto") -> KVCache:
        c = self.config
        dtype = kv_storage_dtype(kv_cache_dtype, self.dtype, self.device)
        return KVCache(c.num_layers, batch_size, self.num_cached_kv_heads, max_seq_len, c.head_dim, dtype,
                       self.device)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, kv_cache: KVCache | None = None,
                last_only: bool = False, verify: bool = False) -> torch.Tensor:
        with self._lock:
            header = {"op": "forward", "cache": self._worker_cache(kv_cache), "start_pos": start_pos,
                      "last_only": last_only, "verify": verify}
            return self._run(header, [tokens], lambda: self.shard(tokens, start_pos, kv_cache, last_only, verify))

    def forward_paged(self, tokens: torch.Tensor, kv_cache: PagedKVCache, batch: PagedAttentionBatch,
                      logits_indices: torch.Tensor) -> torch.Tensor:
        with self._lock:
            header, batch_tensors = batch_message(batch, kv_cache.block_size)
            header.update(op="paged", cache=self._worker_cache(kv_cache))
            return self._run(header, [tokens, logits_indices, *batch_tensors],
                             lambda: self.shard.forward_paged(tokens, kv_cache, batch, logits_indices))

    def _worker_cache(self, cache: KVCache | PagedKVCache | None) -> int | None:
        """The id the other ranks know `cache` by; the first time, they allocate their own part of it."""
        if cache is None:
            return None
        cache_id = self._cache_ids.get(cache)
        if cache_id is None:
            cache_id = next(self._next_cache_id)
            if isinstance(cache, PagedKVCache):
                header = {"op": "paged_cache", "num_blocks": cache.num_blocks, "block_size": cache.block_size,
                          "kv_dtype": "int8" if cache.quantized else stored_kv_dtype(cache.k[0]),
                          "windowed_layers": sorted(cache.windowed_layers),
                          "num_window_blocks": cache.num_window_blocks}
            else:
                header = {"op": "cache", "batch_size": cache.k[0].shape[0], "max_seq_len": cache.max_seq_len,
                          "kv_dtype": stored_kv_dtype(cache.k[0])}
            self._send({**header, "cache": cache_id})
            self._cache_ids[cache] = cache_id
            weakref.finalize(cache, self._freed.append, cache_id)
        return cache_id

    def _send(self, header: dict, tensors=()) -> None:
        if self.group.failure is not None:
            raise TensorParallelError(self.group.failure)
        freed = list(self._freed)
        del self._freed[:len(freed)]
        try:
            self.group.comm.send({**header, "freed": freed}, tensors)
        except Exception as exc:
            raise self.group.failed(exc) from exc

    def _run(self, header: dict, tensors: list[torch.Tensor], forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        self._send(header, tensors)
        try:
            return forward()
        except BaseException as exc:  # also KeyboardInterrupt: the other ranks are mid-pass either way
            error = self.group.failed(exc)
            if not isinstance(exc, Exception):
                raise
            raise error from exc


# -- the other ranks ---------------------------------------------------------------------------------

@torch.inference_mode()
def run_worker(shard: Transformer, comm: Communicator) -> None:
    """Ranks 1..N-1: run every forward pass rank 0 announces, on this shard, until it says stop."""
    c, device = shard.config, comm.device
    kv_heads = local_kv_heads(shard)
    caches: dict[int, KVCache | PagedKVCache] = {}
    while True:
        header, tensors = comm.receive()
        for cache_id in header["freed"]:
            caches.pop(cache_id, None)
        op = header["op"]
        tensors = [t.to(device) for t in tensors]
        if op == "stop":
            return
        if op == "paged_cache":
            # The same storage as rank 0's pool (an int8 pool with --kv-cache-dtype int8).
            caches[header["cache"]] = PagedKVCache(c.num_layers, header["num_blocks"], header["block_size"], kv_heads,
                                                   c.head_dim, shard.dtype, device, header["kv_dtype"],
                                                   windowed_layers=header["windowed_layers"],
                                                   num_window_blocks=header["num_window_blocks"])
        elif op == "cache":
            caches[header["cache"]] = KVCache(c.num_layers, header["batch_size"], kv_heads, header["max_seq_len"],
                                              c.head_dim, kv_storage_dtype(header["kv_dtype"], shard.dtype, device),
                                              device)
        elif op == "forward":
            cache = caches[header["cache"]] if header["cache"] is not None else None
            shard(tensors[0], header["start_pos"], cache, header["last_only"], header["verify"])
        elif op == "paged":
            cache = caches[header["cache"]]
            tokens, logits_indices, *batch_tensors = tensors
            batch = batch_from_message(header, batch_tensors, cache.block_size)
            shard.forward_paged(tokens, cache, batch, logits_indices)
        else:
            raise ValueError(f"unknown tensor-parallel message {op!r}")


# -- starting a group --------------------------------------------------------------------------------

def start_workers(settings: RankSettings, world_size: int,
                  threads: int) -> tuple[dist.TCPStore, list[subprocess.Popen]]:
    """Ranks 1..N-1 as child processes on this machine, meeting rank 0 at a store on a free loopback port."""
    store = dist.TCPStore("127.0.0.1", 0, world_size, True, timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False)
    workers = []
    for rank in range(1, world_size):
        cmd = [sys.executable, "-m", "leapllm.distributed.worker", "--rank", str(rank), "--world-size",
               str(world_size), "--port", str(store.port), "--dtype", settings.dtype, "--device", settings.device,
               "--threads", str(threads)]
        if settings.model is not None:
            cmd += ["--model", settings.model]
        # Rank 0 shows the loading progress bar; N of them on one terminal would only garble it.
        env = {**os.environ, "TQDM_DISABLE": "1"}
        workers.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env))
    return store, workers


def wait_for_workers(store: dist.TCPStore, workers: list[subprocess.Popen], timeout: float = STARTUP_TIMEOUT_S) -> None:
    """Until every worker has loaded its model (a worker writes ready/RANK or error/RANK to the store)."""
    deadline = time.monotonic() + timeout
    waiting = set(range(1, len(workers) + 1))
    while waiting:
        for rank in sorted(waiting):
            if store.check([f"error/{rank}"]):
                raise TensorParallelError(f"tensor-parallel rank {rank} could not start: "
                                          f"{store.get(f'error/{rank}').decode()}")
            if store.check([f"ready/{rank}"]):
                waiting.discard(rank)
                continue
            code = workers[rank - 1].poll()
            if code is not None:
                raise TensorParallelError(f"tensor-parallel rank {rank} {exit_description(code)} while starting")
        if time.monotonic() > deadline:
            raise TensorParallelError(f"tensor-parallel ranks {sorted(waiting)} did not load the model "
                                      f"in {timeout:.0f} s")
        time.sleep(0.05)


def stop_workers(workers: list[subprocess.Popen]) -> None:
    for proc in workers:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def load_tensor_parallel(settings: RankSettings, world_size: int) -> tuple[LoadedModel, TensorParallelModel]:
    """Rank 0's loaded model (tokenizer and all) and its TensorParallelModel, the other ranks running.

    Starts ranks 1..N-1 on this machine, or under torchrun joins the ranks it started; on a rank
    other than 0 under torchrun, serves rank 0 until it closes the group and then exits the process.
    """
    if world_size < 1:
        raise InvalidRequestError(f"tensor_parallel must be at least 1, got {world_size}")
    launched = torchrun_rank()
    if launched is not None:
        return join_torchrun(settings, world_size, launched)
    threads = threads_per_rank(settings.threads, world_size)
    device = rank_device(settings.device, 0, world_size)
    store, workers = start_workers(settings, world_size, threads)  # they load while we do
    try:
        if device.type == "cpu":
            torch.set_num_threads(threads)
        loaded = load_rank_model(settings, world_size, device)
        wait_for_workers(store, workers)
        comm = Communicator(store, 0, world_size, device, hostname="127.0.0.1")
        shard_model(loaded.model, 0, world_size, comm)
        group = TensorParallelGroup(comm, workers)
    except BaseException:
        stop_workers(workers)
        raise
    return loaded, TensorParallelModel(loaded.model, group)


def join_torchrun(settings: RankSettings, world_size: int, launched: tuple[int, int, int, int]):
    rank, world, local_rank, ranks_here = launched
    if world != world_size:
        raise InvalidRequestError(f"tensor parallelism over {world_size} ranks, but torchrun started {world} "
                                  "processes (WORLD_SIZE); they must match")
    device = rank_device(settings.device, local_rank, ranks_here)
    if device.type == "cpu":
        torch.set_num_threads(threads_per_rank(settings.threads, ranks_here))
    loaded = load_rank_model(settings, world_size, device)
    store, _, _ = next(dist.rendezvous("env://", timeout=COLLECTIVE_TIMEOUT))
    comm = Communicator(store, rank, world_size, device)
    shard_model(loaded.model, rank, world_size, comm)
    if rank != 0:
        try:
            run_worker(loaded.model, comm)
        except Exception as exc:
            sys.exit(f"leapllm: tensor-parallel rank {rank}: lost rank 0 ({first_line(exc)})")
        sys.exit(0)
    return loaded, TensorParallelModel(loaded.model, TensorParallelGroup(comm, []))
