"""Dynamic batching for a server: concurrent encoder requests share forward passes.

Requests queue up while a batch runs; the worker thread then takes everything waiting, merges
their inputs into one list, and runs one call over it (the Embedder's, or a task head's forward),
which cuts it into length buckets. So 32 clients with one sentence each cost a few batched passes,
not 32 single ones, and a long text from one client does not pad another client's short ones.
Results go back to each caller's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Sequence

import numpy as np

from leapllm.encoders.embedder import Embedder
from leapllm.errors import LeapLLMError

log = logging.getLogger("leapllm.encoders")


class EmbedderBusyError(LeapLLMError):
    """More inputs are waiting than the batcher accepts; retry later."""


class MergingBatcher:
    """Runs `compute(merged inputs) -> outputs in the same order` over every waiting request's inputs at once."""

    def __init__(self, compute: Callable[[list], Sequence], max_waiting: int = 4096, name: str = "leapllm-encoder",
                 what: str = "inputs"):
        self.compute = compute
        self.max_waiting = max_waiting
        self.name, self.what = name, what
        self._queue: queue.Queue = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.batches_run = 0  # forward passes' worth of merged requests, for tests and metrics

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    async def submit(self, inputs: Sequence):
        """compute's outputs for these inputs, computed together with other callers'."""
        with self._lock:
            if self._waiting + len(inputs) > self.max_waiting:
                raise EmbedderBusyError(f"{self._waiting} {self.what} are already waiting; retry later")
            self._waiting += len(inputs)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((list(inputs), loop, future))
        return await future

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            items = [item]
            while True:  # everything that queued while the last batch ran
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                items.append(nxt)
            merged = [x for inputs, _, _ in items for x in inputs]
            with self._lock:
                self._waiting -= len(merged)
            try:
                outputs = self.compute(merged)
                error = None
            except Exception as exc:  # a bug: fail these requests, keep serving
                log.exception("%s batch failed", self.name)
                outputs, error = None, exc
            self.batches_run += 1
            start = 0
            for inputs, loop, future in items:
                part = None if outputs is None else outputs[start:start + len(inputs)]
                start += len(inputs)
                loop.call_soon_threadsafe(_resolve, future, part, error)


class EmbeddingBatcher(MergingBatcher):
    def __init__(self, embedder: Embedder, max_waiting_texts: int = 4096):
        super().__init__(embedder.embed_ids, max_waiting_texts, "leapllm-embedder", "texts")
        self.embedder = embedder

    async def embed_ids(self, ids_list: Sequence[Sequence[int]]) -> np.ndarray:
        """Embeddings of already tokenized, checked inputs, computed together with other callers'."""
        return await self.submit(ids_list)


def _resolve(future: asyncio.Future, value, error) -> None:
    if future.done():  # the caller was cancelled (client went away)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
