"""The engine for asyncio callers (the HTTP server): LLMEngine stepping in a background thread.

    engine = AsyncEngine(LLMEngine(model, tokenizer), max_waiting=128)
    engine.start()
    async for out in engine.generate("req-1", prompt_ids, params):
        ...                                   # RequestOutput deltas; the last has finished=True
    await engine.shutdown()

Requests and aborts travel to the engine thread through a queue, and each step's outputs come
back to the event loop with call_soon_threadsafe, so the event loop never waits for a forward
pass. A caller that stops iterating (a client that disconnects, a cancelled task) aborts its
request, and the engine returns its blocks at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from leapllm.engine.beam_search import BeamSearchParams
from leapllm.engine.llm_engine import LLMEngine
from leapllm.engine.request import LogitsProcessor, RequestOutput
from leapllm.engine.sampling import SamplingParams
from leapllm.errors import LeapLLMError

log = logging.getLogger("leapllm.engine")


class EngineOverloadedError(LeapLLMError):
    """Too many requests are already waiting; the caller should retry later."""


class EngineStoppedError(LeapLLMError):
    """The engine is shutting down (or failed) and takes no new requests."""


class EngineStepError(Exception):
    """A forward step failed: a bug, not a user error. Every request in flight then fails with it."""


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    logprobs: int | None
    prompt_logprobs: int | None
    extra: dict  # an encoder-decoder's: encoder_ids, logits_processor, beam_search


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int = 256):
        self.engine = engine
        self.max_waiting = max_waiting
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._stop = threading.Event()
        self.dead: BaseException | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="leapllm-engine", daemon=True)
        self._thread.start()

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    async def shutdown(self, grace_s: float = 30.0) -> None:
        """Stop taking requests, let running ones finish for up to grace_s, abort the rest, stop the thread."""
        self._accepting = False
        deadline = self._loop.time() + grace_s
        while self._streams and self._loop.time() < deadline:
            await asyncio.sleep(0.05)
        for request_id in list(self._streams):
            self.abort(request_id)
        while self._streams and self._loop.time() < deadline + 5.0:
            await asyncio.sleep(0.02)
        self._stop.set()
        self._commands.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)

    # -- requests ------------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams, *,
                       logprobs: int | None = None, prompt_logprobs: int | None = None,
                       encoder_ids: list[int] | None = None, logits_processor: LogitsProcessor | None = None,
                       beam_search: BeamSearchParams | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as they come (LLMEngine.add_request's arguments). Raises
        InvalidRequestError (bad request), EngineOverloadedError, EngineStoppedError, or
        EngineStepError (a failed step)."""
        if not self._accepting or self.dead is not None:
            raise EngineStoppedError("the engine is shutting down")
        if request_id in self._streams:
            raise LeapLLMError(f"request id {request_id!r} is already in use")
        if len(self._streams) >= self.engine.config.max_num_seqs + self.max_waiting:
            raise EngineOverloadedError(
                f"{len(self._streams)} requests are already in flight (at most {self.engine.config.max_num_seqs} "
                f"running and {self.max_waiting} waiting); retry later")
        # Validate here, in the caller, so a bad request fails at once with its own message.
        prompt_ids = self.engine.check_request(prompt_ids, params, logprobs, prompt_logprobs, encoder_ids, beam_search)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        extra = {"encoder_ids": encoder_ids, "logits_processor": logits_processor, "beam_search": beam_search}
        self._commands.put(_Add(request_id, prompt_ids, params, logprobs, prompt_logprobs, extra))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:  # the caller went away (disconnect, cancellation): free its blocks
                self.abort(request_id)
            self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def stats(self) -> dict[str, float]:
        s = self.engine.stats()
        s["num_in_flight"] = len(self._streams)
        return s

    # -- the engine thread ---------------------------------------------------------------------
    def _deliver(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put_nowait(item)

    def _send(self, items) -> None:
        if items:
            self._loop.call_soon_threadsafe(self._deliver, items)

    def _apply(self, cmd) -> list:
        eng = self.engine
        if isinstance(cmd, _Add):
            try:
                eng.add_request(cmd.request_id, cmd.prompt_ids, cmd.params, logprobs=cmd.logprobs,
                                prompt_logprobs=cmd.prompt_logprobs, **cmd.extra)
            except Exception as exc:  # checked before, so only a race (e.g. a reused id) lands here
                return [(cmd.request_id, exc)]
        elif isinstance(cmd, _Abort):
            out = eng.abort_request(cmd.request_id)
            if out is not None:
                return [(cmd.request_id, out)]
        return []

    def _run(self) -> None:
        try:
            self._loop_forever()
        except BaseException as exc:  # a bug outside a step: fail everything in flight, refuse new work
            log.exception("engine thread died")
            self.dead = exc
            error = EngineStepError(f"the engine stopped: {exc!r}")
            try:
                self._loop.call_soon_threadsafe(self._fail_all, error)
            except RuntimeError:  # the event loop is already closed
                pass

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.put_nowait(error)

    def _loop_forever(self) -> None:
        eng = self.engine
        while not self._stop.is_set():
            # Block for work only when there is nothing to step.
            try:
                cmd = self._commands.get(timeout=None if not eng.has_unfinished() else 0)
            except queue.Empty:
                cmd = None
            items = []
            while cmd is not None:
                items += self._apply(cmd)
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if self._stop.is_set():
                break
            if eng.has_unfinished():
                try:
                    items += [(o.request_id, o) for o in eng.step()]
                except Exception as exc:  # a bug: fail what is in flight, keep serving new requests
                    log.exception("engine step failed")
                    error = EngineStepError(f"engine step failed: {exc!r}")
                    for request_id in list(eng.sequences):
                        eng.abort_request(request_id)
                        items.append((request_id, error))
            self._send(items)
