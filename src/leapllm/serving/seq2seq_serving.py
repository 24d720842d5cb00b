"""An encoder-decoder (T5, BART, mBART, MarianMT) on the OpenAI API: POST /v1/completions, each
prompt a source text and each choice its generated text.

    lm = Seq2SeqLM("opus-mt-en-de")
    app = create_seq2seq_app(lm, "opus-mt-en-de")   # `leapllm serve --model FOLDER` builds this for such a folder

    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": ["The house is wonderful.", "A cat."], "max_tokens": 64}'

A prompt may also be token ids: the source's own, special tokens included. `max_tokens` is the
new-token budget (default: the model's own, from its generation_config.json); `temperature` 0 or
absent (and no `top_p` / `top_k`) runs the model's own search, greedy or beam search with its
`num_beams`; `temperature` > 0 samples (with `top_p`, `top_k`, `seed`; `n` > 1 only then). Like
vLLM's extra sampling fields, `num_beams`, `length_penalty`, `early_stopping`,
`no_repeat_ngram_size` and `min_tokens` go to the search.
Fields that would change the output and that this server does not implement (`logprobs`, `echo`,
`suffix`, `best_of` other than n, `stop`, penalties, structured outputs, tools) are a 400, never
silently ignored. /v1/chat/completions is a 400 that points here: the model has no chat.

Batching: a worker thread runs one `generate_ids` call at a time (engine/seq2seq.py). Requests
wait in a bounded queue (full: 503); when a batch ends the worker takes the oldest waiting request
and every other waiting request with the same generation plan (same search, budget and settings),
up to --max-num-seqs rows (sources x beams), and generates all their sources in one batch. So a
request waits for the batch running when it arrives and for the batches of other plans queued
before it, never behind a stream of later ones. A request is never split; seeded sampling runs
alone, so that its draws do not depend on who else is in the batch (the same request gives the
same text, and the same as `Seq2SeqLM.generate`). A client that goes away is taken out of the
queue; a running greedy / sampling batch whose clients have all gone stops at its next step.

Streaming (`stream: true`, server-sent events in OpenAI's chunk format, then `data: [DONE]`):
greedy and sampling stream token by token (generate_ids' per-step callback). Beam search streams
each choice's final text as one chunk: a beam's tokens are only final when the search ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections import deque
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import field_validator

from leapllm.engine.async_engine import EngineOverloadedError, EngineStoppedError
from leapllm.engine.seq2seq import GeneratedIds, GenerationPlan, Seq2SeqParams, generate_ids, plan_generation
from leapllm.engine.seq2seq_lm import Seq2SeqLM
from leapllm.errors import InvalidRequestError
from leapllm.serving.app import add_error_handlers
from leapllm.serving.auth import ApiKeyMiddleware
from leapllm.serving.body_limit import DEFAULT_MAX_REQUEST_BYTES, BodySizeLimitMiddleware
from leapllm.serving.disconnect import until_disconnected
from leapllm.serving.errors import ApiError, as_api_error, error_body
from leapllm.serving.metrics import LATENCY_BUCKETS, PREFIX
from leapllm.serving.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    UsageInfo,
)
from leapllm.serving.streaming import sse
from leapllm.tokenization.detokenizer import IncrementalDetokenizer

log = logging.getLogger("leapllm.serving")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SHUT_DOWN = "the server shut down before the request finished"


# -- the request -------------------------------------------------------------------------------

class Seq2SeqCompletionRequest(CompletionRequest):
    """/v1/completions' body with the search settings of an encoder-decoder (vLLM-style extras)."""
    num_beams: int | None = None
    length_penalty: float | None = None
    early_stopping: bool | Literal["never"] | None = None
    no_repeat_ngram_size: int | None = None
    min_tokens: int | None = None  # vLLM's: EOS is forbidden before this many new tokens
    # Not for completions, and not implemented here: refused rather than ignored.
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None

    @field_validator("num_beams")
    @classmethod
    def _check_num_beams(cls, v):
        if v is not None and v < 1:
            raise ValueError(f"must be at least 1, got {v}")
        return v

    @field_validator("no_repeat_ngram_size", "min_tokens")
    @classmethod
    def _check_non_negative(cls, v):
        if v is not None and v < 0:
            raise ValueError(f"must be at least 0, got {v}")
        return v


def refused_field(body: Seq2SeqCompletionRequest, n: int) -> tuple[str, str] | None:
    """(field, why) of the first field set that this server does not implement, or None."""
    refused = [
        ("logprobs", body.logprobs is not None, "token logprobs are not returned by the encoder-decoder server"),
        ("echo", bool(body.echo), "echo is not supported: the output of an encoder-decoder does not continue "
                                  "its prompt"),
        ("best_of", body.best_of is not None and body.best_of != n, "best_of is not supported (it may only equal n)"),
        ("stop", bool(body.stop), "stop strings are not supported by the encoder-decoder server"),
        ("stop_token_ids", bool(body.stop_token_ids), "stop_token_ids are not supported by the encoder-decoder "
                                                      "server"),
        ("ignore_eos", bool(body.ignore_eos), "ignore_eos is not supported by the encoder-decoder server"),
        ("presence_penalty", bool(body.presence_penalty), "presence_penalty is not supported; "
                                                          "use no_repeat_ngram_size"),
        ("frequency_penalty", bool(body.frequency_penalty), "frequency_penalty is not supported; "
                                                            "use no_repeat_ngram_size"),
        ("repetition_penalty", body.repetition_penalty not in (None, 1.0), "repetition_penalty is not supported; "
                                                                            "use no_repeat_ngram_size"),
        ("min_p", bool(body.min_p), "min_p is not supported by the encoder-decoder server"),
    ]
    for name in ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                 "guided_grammar"):
        value = getattr(body, name)
        plain_text = name == "response_format" and value == {"type": "text"}
        refused.append((name, value is not None and not plain_text, f"{name}: structured outputs are not "
                                                                    "supported by the encoder-decoder server"))
    for name in ("tools", "tool_choice", "functions"):
        refused.append((name, getattr(body, name) is not None, f"{name}: an encoder-decoder model does not call "
                                                               "tools"))
    for name, given, why in refused:
        if given:
            return name, why
    return None


# Where a message of plan_generation / SamplingParams names a setting, the request field it came from.
PARAM_OF_SETTING = {"max_new_tokens": "max_tokens", "min_length": "min_tokens", "num_beams": "num_beams",
                    "length_penalty": "length_penalty", "early_stopping": "early_stopping",
                    "no_repeat_ngram_size": "no_repeat_ngram_size", "sampling": "num_beams",
                    "temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "seed": "seed"}


# -- the batching worker -----------------------------------------------------------------------

class Seq2SeqJob:
    """One HTTP request: its sources (each prompt n times), generated together in one batch.

    The worker sends its events to the request's event loop: ("tokens", [(source, token), ...])
    after each step when it streams, then ("done", GeneratedIds) or ("error", exception)."""

    def __init__(self, sources: list[list[int]], plan: GenerationPlan, solo: bool, stream: bool):
        self.sources = sources
        self.plan = plan
        self.solo = solo  # seeded sampling: its draws must not depend on the rest of the batch
        self.stream = stream and plan.num_beams == 1  # beam search has nothing final to stream before the end
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False  # set from the event loop when the client goes away; read by the worker
        self.finished = False  # its answer (or error) has arrived
        self.arrival = time.perf_counter()

    @property
    def rows(self) -> int:
        return len(self.sources) * self.plan.num_beams

    def joins(self, other: Seq2SeqJob) -> bool:
        return not self.solo and not other.solo and self.plan == other.plan

    def send(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    async def next_event(self) -> tuple[str, Any]:
        kind, value = await self.events.get()
        if kind != "tokens":
            self.finished = True  # nothing is left to cancel
        return kind, value

    async def result(self) -> GeneratedIds:
        while True:
            kind, value = await self.next_event()
            if kind == "done":
                return value
            if kind == "error":
                raise value


class BatchAbandoned(Exception):
    """Raised from the step callback: every client of the batch has gone (or the server stops)."""


class Seq2SeqMetrics:
    """Prometheus metrics of the encoder-decoder server, on its own registry (vLLM's names where they exist)."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        self.request_success = Counter(
            PREFIX + "request_success", "Sequences (choices) that finished, by finish reason.",
            labels + ["finished_reason"], registry=self.registry)
        for reason in ("stop", "length"):
            self.request_success.labels(model_name, reason)
        self.request_aborted = Counter(
            PREFIX + "request_aborted", "Requests given up before finishing: the client went away, or the server "
            "shut down.", labels, registry=self.registry).labels(model_name)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Source tokens encoded.", labels,
                                     registry=self.registry).labels(model_name)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", labels,
                                         registry=self.registry).labels(model_name)
        self.batch_sources = Histogram(
            PREFIX + "batch_size_sources", "Sources generated together in one batch.", labels,
            buckets=BATCH_BUCKETS, registry=self.registry).labels(model_name)
        self.batch_requests = Histogram(
            PREFIX + "batch_size_requests", "Requests merged into one batch.", labels,
            buckets=BATCH_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Time from arrival to the answer of a finished request.",
            labels, buckets=LATENCY_BUCKETS, registry=self.registry).labels(model_name)
        self.waiting = Gauge(PREFIX + "num_requests_waiting", "Requests waiting for a batch.", labels,
                             registry=self.registry).labels(model_name)
        self.running = Gauge(PREFIX + "num_requests_running", "Requests in the running batch.", labels,
                             registry=self.registry).labels(model_name)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Seq2SeqBatcher:
    """The worker thread that merges waiting requests with the same plan into generate_ids calls
    (module docstring). `submit` and `cancel` are called from the event loop."""

    def __init__(self, lm: Seq2SeqLM, metrics: Seq2SeqMetrics, max_batch_rows: int = 64, max_waiting: int = 256):
        self.lm = lm
        self.metrics = metrics
        self.max_batch_rows = max_batch_rows
        self.max_waiting = max_waiting  # requests; with an idle worker one is always taken
        self._waiting: deque[Seq2SeqJob] = deque()
        self._running: list[Seq2SeqJob] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False  # takes no new requests (shutting down)
        self._stop = False  # the worker exits once the queue is empty
        self._abort = False  # the running batch stops at its next step
        self.dead: BaseException | None = None  # a bug killed the worker

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="leapllm-seq2seq", daemon=True)
            self._thread.start()

    def submit(self, sources: list[list[int]], plan: GenerationPlan, *, solo: bool = False,
               stream: bool = False) -> Seq2SeqJob:
        job = Seq2SeqJob(sources, plan, solo, stream)
        with self._cond:
            if self._closed or self.dead is not None:
                raise EngineStoppedError("the server is shutting down" if self.dead is None
                                         else f"the generation worker died: {self.dead!r}")
            if len(self._waiting) >= self.max_waiting and (self._waiting or self._running):
                raise EngineOverloadedError(f"{len(self._waiting)} requests are already waiting; retry later")
            self._waiting.append(job)
            self.metrics.waiting.set(len(self._waiting))
            self._cond.notify_all()
        return job

    def cancel(self, job: Seq2SeqJob) -> None:
        """The client went away: drop the job if it still waits; a running batch checks the flag each step."""
        if job.finished:
            return
        job.cancelled = True
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self.metrics.waiting.set(len(self._waiting))
                self._cond.notify_all()  # close() may be waiting for the queue to empty
        self.metrics.request_aborted.inc()

    def close(self, grace_s: float) -> None:
        """Take no new requests; the waiting and running ones get grace_s seconds, then fail with 503."""
        deadline = time.monotonic() + grace_s
        with self._cond:
            self._closed = True
            while (self._waiting or self._running) and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            dropped = list(self._waiting)
            self._waiting.clear()
            self.metrics.waiting.set(0)
            if self._running:
                self._abort = True  # greedy / sampling stop at the next step; beam search runs out
        for job in dropped:
            job.send("error", EngineStoppedError(SHUT_DOWN))

    def stop(self, grace_s: float = 0.0) -> None:
        self.close(grace_s)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._waiting and not self._stop:
                        self._cond.wait()
                    if not self._waiting:
                        return
                    batch = self._take_batch()
                    self._running = batch
                    self.metrics.waiting.set(len(self._waiting))
                    self.metrics.running.set(len(batch))
                try:
                    self._generate(batch)
                finally:
                    with self._cond:
                        self._running = []
                        self.metrics.running.set(0)
                        self._cond.notify_all()
        except BaseException as exc:  # a bug in the worker itself: fail everything, report it on /health
            log.exception("the encoder-decoder worker died")
            with self._cond:
                self.dead = exc
                dropped = list(self._waiting)
                self._waiting.clear()
            for job in dropped:
                job.send("error", exc)

    def _take_batch(self) -> list[Seq2SeqJob]:
        """The oldest waiting job and every other waiting one with its plan, within max_batch_rows
        (the first is taken whatever its size)."""
        first = self._waiting.popleft()
        batch, rows = [first], first.rows
        for job in list(self._waiting):
            if job.joins(first) and rows + job.rows <= self.max_batch_rows:
                self._waiting.remove(job)
                batch.append(job)
                rows += job.rows
        return batch

    def _generate(self, batch: list[Seq2SeqJob]) -> None:
        sources = [ids for job in batch for ids in job.sources]
        owners = [(job, i) for job in batch for i in range(len(job.sources))]  # batch row -> (job, its source)
        streams = any(job.stream for job in batch)

        def on_step(active: list[int], tokens: list[int]) -> None:
            if self._abort or all(job.cancelled for job in batch):
                raise BatchAbandoned()
            if not streams:
                return
            per_job: dict[int, tuple[Seq2SeqJob, list]] = {}
            for row, token in zip(active, tokens, strict=True):
                job, i = owners[row]
                if job.stream and not job.cancelled:
                    per_job.setdefault(id(job), (job, []))[1].append((i, token))
            for job, items in per_job.values():
                job.send("tokens", items)

        self.metrics.batch_sources.observe(len(sources))
        self.metrics.batch_requests.observe(len(batch))
        try:
            out = generate_ids(self.lm.model, sources, batch[0].plan, on_step)
        except BatchAbandoned:
            for job in batch:
                job.send("error", EngineStoppedError(SHUT_DOWN))
            return
        except Exception as exc:  # checked requests should not fail here: a bug, reported to these clients
            if not isinstance(exc, InvalidRequestError):
                log.exception("an encoder-decoder batch failed")
            for job in batch:
                job.send("error", exc)
            return
        start = 0
        for job in batch:
            end = start + len(job.sources)
            job.send("done", GeneratedIds(out.token_ids[start:end], out.finish_reasons[start:end],
                                          out.scores[start:end], dict(out.timings)))
            start = end


# -- the HTTP side -----------------------------------------------------------------------------

class _DecodeAdapter:
    """The encoder-decoder tokenizer as IncrementalDetokenizer calls a tokenizer (it always skips
    special tokens)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids)


class Seq2SeqCompletions:
    """POST /v1/completions over the batcher, and the routes that say what is served."""

    def __init__(self, lm: Seq2SeqLM, model_name: str, batcher: Seq2SeqBatcher, metrics: Seq2SeqMetrics):
        self.lm = lm
        self.model_name = model_name
        self.batcher = batcher
        self.metrics = metrics
        self.source_limit = lm.source_limit
        # The decoder's position table holds the start token and the new tokens (T5: the source's limit).
        self.max_new_tokens = lm.source_limit - 1
        self.draining = False

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(404, f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def model_card(self) -> ModelCard:
        return ModelCard(id=self.model_name, max_model_len=self.source_limit)

    # -- request -> plan ---------------------------------------------------------------------
    def plan(self, body: Seq2SeqCompletionRequest) -> tuple[GenerationPlan, bool]:
        """The checked generation plan of a request, and whether it samples."""
        n = body.n or 1
        refused = refused_field(body, n)
        if refused is not None:
            raise ApiError(400, refused[1], param=refused[0])
        if body.max_tokens is not None and not 1 <= body.max_tokens <= self.max_new_tokens:
            raise ApiError(400, f"max_tokens must be between 1 and {self.max_new_tokens} for this model, "
                           f"got {body.max_tokens}", param="max_tokens")
        if body.min_tokens and body.max_tokens is not None and body.min_tokens > body.max_tokens:
            raise ApiError(400, f"min_tokens ({body.min_tokens}) must not exceed max_tokens ({body.max_tokens})",
                           param="min_tokens")
        # temperature 0 is greedy whatever else is set; absent, top_p / top_k alone ask for sampling.
        if body.temperature is not None:
            sampling = body.temperature > 0
        else:
            sampling = (body.top_p is not None and body.top_p < 1.0) or (body.top_k is not None and body.top_k > 0)
        if n > 1 and not sampling:
            raise ApiError(400, f"n={n} needs sampling (temperature > 0): greedy and beam search give one answer "
                           "per prompt", param="n")
        params = Seq2SeqParams(
            max_new_tokens=body.max_tokens,
            min_length=None if body.min_tokens is None else body.min_tokens + 1,  # min_length counts the start token
            # Sampling is one sequence per choice: the folder's num_beams applies to its own search only.
            num_beams=body.num_beams if body.num_beams is not None or not sampling else 1,
            length_penalty=body.length_penalty, early_stopping=body.early_stopping,
            no_repeat_ngram_size=body.no_repeat_ngram_size, do_sample=sampling,
            temperature=body.temperature if body.temperature else 1.0,
            top_k=body.top_k if body.top_k is not None else 0,
            top_p=body.top_p if body.top_p is not None else 1.0, seed=body.seed)
        try:
            plan = plan_generation(params, self.lm.defaults, self.lm.model)
        except InvalidRequestError as exc:
            message = str(exc)
            setting = message.split(" ", 1)[0]
            raise ApiError(400, message, param=PARAM_OF_SETTING.get(setting)) from None
        return plan, sampling

    def tokenize(self, prompts: list[str | list[int]]) -> list[list[int]]:
        vocab = self.lm.model.config.vocab_size
        sources = []
        for i, prompt in enumerate(prompts):
            what = "the prompt" if len(prompts) == 1 else f"prompt {i}"
            if isinstance(prompt, str):
                ids = self.lm.encode(prompt)
            else:  # token ids: the source's own, special tokens included
                bad = next((t for t in prompt if not 0 <= t < vocab), None)
                if bad is not None:
                    raise ApiError(400, f"{what} holds token id {bad}, outside the vocabulary (0 to {vocab - 1})",
                                   param="prompt")
                ids = list(prompt)
            if not ids:
                raise ApiError(400, f"{what} has no tokens", param="prompt")
            if len(ids) > self.source_limit:
                raise ApiError(400, f"{what} has {len(ids)} tokens; this model reads at most {self.source_limit} "
                               "(special tokens included)", param="prompt")
            sources.append(ids)
        return sources

    # -- routes ------------------------------------------------------------------------------
    async def create_completion(self, body: Seq2SeqCompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        if self.draining:
            raise EngineStoppedError("the server is shutting down")
        plan, sampling = self.plan(body)
        n = body.n or 1
        # Tokenizing takes a worker thread: a long text must not stall the event loop.
        prompt_ids = await asyncio.to_thread(self.tokenize, body.prompts())
        sources = [ids for ids in prompt_ids for _ in range(n)]  # choice index = prompt_index * n + i
        rows = len(sources) * plan.num_beams
        if rows > self.batcher.max_batch_rows:  # never fits a batch: a 400, not a 503
            raise ApiError(400, f"this request asks for {rows} sequences ({len(prompt_ids)} prompt(s) x n={n} x "
                           f"{plan.num_beams} beam(s)); the server generates at most {self.batcher.max_batch_rows} "
                           "at once", param="n" if n > 1 else "prompt")
        job = self.batcher.submit(sources, plan, solo=sampling and body.seed is not None, stream=bool(body.stream))
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        num_prompt_tokens = sum(len(ids) for ids in prompt_ids)
        if body.stream:
            return self.stream(job, request_id, created, num_prompt_tokens, body.include_usage_in_stream)
        try:
            out = await until_disconnected(request, job.result())
        finally:
            self.batcher.cancel(job)  # a no-op once it finished
        choices = [CompletionChoice(index=i, text=self.lm.tokenizer.decode(ids), finish_reason=reason)
                   for i, (ids, reason) in enumerate(zip(out.token_ids, out.finish_reasons, strict=True))]
        self.observe_finished(job, out, num_prompt_tokens)
        usage = UsageInfo.of(num_prompt_tokens, sum(len(ids) for ids in out.token_ids))
        return JSONResponse(CompletionResponse(id=request_id, created=created, model=self.model_name,
                                               choices=choices, usage=usage).model_dump())

    def observe_finished(self, job: Seq2SeqJob, out: GeneratedIds, num_prompt_tokens: int) -> None:
        for reason in out.finish_reasons:
            self.metrics.request_success.labels(self.model_name, reason).inc()
        self.metrics.prompt_tokens.inc(num_prompt_tokens)
        self.metrics.generation_tokens.inc(sum(len(ids) for ids in out.token_ids))
        self.metrics.e2e_latency.observe(time.perf_counter() - job.arrival)

    def stream(self, job: Seq2SeqJob, request_id: str, created: int, num_prompt_tokens: int,
               include_usage: bool) -> StreamingResponse:
        detokenizers = [IncrementalDetokenizer(_DecodeAdapter(self.lm.tokenizer)) for _ in job.sources]

        def chunk(index: int, text: str, finish_reason: str | None = None) -> str:
            return sse(CompletionChunk(id=request_id, created=created, model=self.model_name,
                                       choices=[CompletionChoice(index=index, text=text,
                                                                 finish_reason=finish_reason)]), include_usage)

        async def body():
            try:
                while True:
                    kind, value = await job.next_event()
                    if kind == "error":
                        raise value
                    if kind == "tokens":
                        for index, token in value:
                            if text := detokenizers[index].push(token):
                                yield chunk(index, text)
                        continue
                    # done: the rest of each choice's text (all of it for beam search), and why it ended
                    for index, (ids, reason) in enumerate(zip(value.token_ids, value.finish_reasons, strict=True)):
                        text = detokenizers[index].flush() if job.stream else self.lm.tokenizer.decode(ids)
                        yield chunk(index, text, reason)
                    self.observe_finished(job, value, num_prompt_tokens)
                    if include_usage:
                        usage = UsageInfo.of(num_prompt_tokens, sum(len(ids) for ids in value.token_ids))
                        yield sse(CompletionChunk(id=request_id, created=created, model=self.model_name, choices=[],
                                                  usage=usage), True)
                    break
            except Exception as exc:  # after the 200 went out: an error event, as OpenAI does
                yield f"data: {json.dumps(error_body(as_api_error(exc)), separators=(',', ':'))}\n\n"
            finally:
                self.batcher.cancel(job)  # the client went away (Starlette cancels the body): drop its work
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def chat_completion(self) -> Response:
        raise ApiError(400, f"'{self.model_name}' is an encoder-decoder ({self.lm.model_type}) model: it has no "
                       "chat; it is served on POST /v1/completions, with the source text as the prompt")

    async def list_models(self) -> Response:
        return JSONResponse(ModelList(data=[self.model_card()]).model_dump())

    async def retrieve_model(self, model: str) -> Response:
        self.check_model(model)
        return JSONResponse(self.model_card().model_dump())

    async def health(self) -> Response:
        if self.batcher.dead is not None:
            return JSONResponse({"status": "error", "detail": f"the worker died: {self.batcher.dead!r}"}, 503)
        if self.draining:
            return JSONResponse({"status": "shutting down"}, 503)
        return JSONResponse({"status": "ok"})

    async def metrics_text(self) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def create_seq2seq_app(lm: Seq2SeqLM, model_name: str, api_key: str | None = None, *, max_batch_size: int = 64,
                       max_waiting: int = 256, shutdown_grace_s: float = 5.0,
                       max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The app owns the batcher: its lifespan starts the worker thread and stops it at the end.

    `max_batch_size` bounds the rows (sources x beams) of one batch, `max_waiting` the requests
    waiting for one. `app.state.drain()` is the graceful shutdown runner.py calls on SIGTERM: new
    requests get 503, waiting and running ones get shutdown_grace_s seconds, the rest a 503.
    """
    metrics = Seq2SeqMetrics(model_name)
    batcher = Seq2SeqBatcher(lm, metrics, max_batch_rows=max_batch_size, max_waiting=max_waiting)
    serving = Seq2SeqCompletions(lm, model_name, batcher, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.stop, shutdown_grace_s)

    docs = {"docs_url": None, "redoc_url": None, "openapi_url": None} if api_key else {}
    app = FastAPI(title="leapllm", summary="OpenAI-compatible encoder-decoder server", lifespan=lifespan, **docs)
    app.state.completions = serving
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.state.model_name = model_name

    async def drain() -> None:
        serving.draining = True
        await asyncio.to_thread(batcher.close, shutdown_grace_s)

    app.state.drain = drain

    app.add_api_route("/v1/completions", serving.create_completion, methods=["POST"], response_model=None)
    app.add_api_route("/v1/chat/completions", serving.chat_completion, methods=["POST"], response_model=None)
    app.add_api_route("/v1/models", serving.list_models, methods=["GET"], response_model=None)
    app.add_api_route("/v1/models/{model:path}", serving.retrieve_model, methods=["GET"], response_model=None)
    app.add_api_route("/health", serving.health, methods=["GET"], response_model=None)
    app.add_api_route("/metrics", serving.metrics_text, methods=["GET"], response_model=None)
    add_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_request_bytes)
    if api_key:  # added last, so it runs first: no body is read for a request without the key
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    return app
