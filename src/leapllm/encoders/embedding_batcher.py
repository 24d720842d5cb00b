"""Dynamic batching for a server: concurrent embedding requests share forward passes.

Requests queue up while a batch runs; the worker thread then takes everything waiting, merges
their texts into one list, and lets the Embedder cut it into length buckets. So 32 clients with
one sentence each cost a few batched passes, not 32 single ones, and a long text from one client
does not pad another client's short ones. Results go back to each caller's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Sequence

import numpy as np

from leapllm.encoders.embedder import Embedder
from leapllm.errors import LeapLLMError

log = logging.getLogger("leapllm.encoders")


class EmbedderBusyError(LeapLLMError):
    """More texts are waiting than the batcher accepts; retry later."""


class EmbeddingBatcher:
    def __init__(self, embedder: Embedder, max_waiting_texts: int = 4096):
        self.embedder = embedder
        self.max_waiting_texts = max_waiting_texts
        self._queue: queue.Queue = queue.Queue()
        self._waiting_texts = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.batches_run = 0  # forward passes' worth of merged requests, for tests and metrics

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="leapllm-embedder", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    async def embed_ids(self, ids_list: Sequence[Sequence[int]]) -> np.ndarray:
        """Embeddings of already tokenized, checked inputs, computed together with other callers'."""
        with self._lock:
            if self._waiting_texts + len(ids_list) > self.max_waiting_texts:
                raise EmbedderBusyError(f"{self._waiting_texts} texts are already waiting to be embedded; retry later")
            self._waiting_texts += len(ids_list)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((list(ids_list), loop, future))
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
            merged = [ids for ids_list, _, _ in items for ids in ids_list]
            with self._lock:
                self._waiting_texts -= len(merged)
            try:
                vectors = self.embedder.embed_ids(merged)
                error = None
            except Exception as exc:  # a bug: fail these requests, keep serving
                log.exception("embedding batch failed")
                vectors, error = None, exc
            self.batches_run += 1
            start = 0
            for ids_list, loop, future in items:
                part = None if vectors is None else vectors[start:start + len(ids_list)]
                start += len(ids_list)
                loop.call_soon_threadsafe(_resolve, future, part, error)


def _resolve(future: asyncio.Future, value, error) -> None:
    if future.done():  # the caller was cancelled (client went away)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
