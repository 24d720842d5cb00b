"""An encoder-decoder (T5, BART, mBART, MarianMT) on the OpenAI API: POST /v1/completions, each
prompt a source text and each choice its generated text.

    lm = Seq2SeqLM("opus-mt-en-de")
    app = create_seq2seq_app(lm, "opus-mt-en-de")   # `leapllm serve --model FOLDER` builds this for such a folder

    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": ["The house is wonderful.", "A cat."], "max_tokens": 64}'

A prompt may also be token ids: the source's own, special tokens included. `max_tokens` is the
new-token budget (default: the model's own, from its generation_config.json); `temperature` 0 or
absent (and no `top_p` / `top_k`) runs the model's own search, greedy or beam search with its
`num_beams`; `temperature` > 0 samples (with `top_p`, `top_k`, `seed`; `n` > 1 only then; choice i
of a seeded request draws with seed + i, as the LLM server's). Like vLLM's extra sampling fields,
`num_beams`, `length_penalty`, `early_stopping`, `no_repeat_ngram_size` and `min_tokens` go to the
search. Fields that would change the output and that this server does not implement (`logprobs`,
`echo`, `suffix`, `best_of` other than n, `stop`, penalties, structured outputs, tools) are a 400,
never silently ignored. /v1/chat/completions is a 400 that points here: the model has no chat.

Batching: the LLM server's engine (engine/llm_engine.py, in an AsyncEngine thread): every choice is
an engine request that joins the running batch at the next step and leaves it when it ends, its
source encoded as it starts and its cross-attention keys and values in the engine's second pool; a
beam search's beams are sequences of that batch. So a request never waits for another to finish,
and a client that goes away frees its blocks at the next step.

Streaming (`stream: true`, server-sent events in OpenAI's chunk format, then `data: [DONE]`):
greedy and sampling stream token by token. Beam search streams each choice's final text as one
chunk: a beam's tokens are only final when the search ends. Metrics are the LLM server's
(serving/metrics.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import field_validator

from leapllm.engine.async_engine import AsyncEngine, EngineStoppedError
from leapllm.engine.seq2seq import GenerationPlan, Seq2SeqParams, engine_request, plan_generation, source_params
from leapllm.engine.seq2seq_lm import Seq2SeqLM
from leapllm.errors import InvalidRequestError
from leapllm.serving.app import add_error_handlers
from leapllm.serving.auth import ApiKeyMiddleware
from leapllm.serving.body_limit import DEFAULT_MAX_REQUEST_BYTES, BodySizeLimitMiddleware
from leapllm.serving.completions import CompletionServing, CompletionStreamRenderer
from leapllm.serving.disconnect import until_disconnected
from leapllm.serving.errors import ApiError
from leapllm.serving.generation import SubRequest
from leapllm.serving.metrics import ServerMetrics
from leapllm.serving.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelList,
    UsageInfo,
)
from leapllm.serving.streaming import stream_response

log = logging.getLogger("leapllm.serving")


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


# -- the routes --------------------------------------------------------------------------------

class Seq2SeqCompletions(CompletionServing):
    """POST /v1/completions on the engine, and the routes that say what is served."""

    def __init__(self, lm: Seq2SeqLM, model_name: str, async_engine: AsyncEngine, metrics: ServerMetrics):
        super().__init__(async_engine, lm.tokenizer, model_name, lm.source_limit, metrics, None)
        self.lm = lm
        self.source_limit = lm.source_limit
        # The decoder's position table holds the start token and the new tokens (T5: the source's limit).
        self.max_new_tokens = lm.source_limit - 1
        self.draining = False

    # -- request -> plan ---------------------------------------------------------------------
    def generation_plan(self, body: Seq2SeqCompletionRequest) -> GenerationPlan:
        """The checked generation plan of a request."""
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
            return plan_generation(params, self.lm.defaults, self.lm.model)
        except InvalidRequestError as exc:
            raise _as_400(exc) from None

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

    def sub_requests(self, plan: GenerationPlan, sources: list[list[int]], n: int) -> list[SubRequest]:
        """One engine request per (source, choice), each checked by the engine before any starts."""
        capacity = self.engine.engine.config.max_num_seqs + self.engine.max_waiting
        if len(sources) * n > capacity:  # never fits, however long the client waits: a 400, not a 503
            raise ApiError(400, f"this request asks for {len(sources) * n} sequences ({len(sources)} prompt(s) x "
                           f"n={n}); the server holds at most {capacity} at once, running and waiting",
                           param="n" if n > 1 else "prompt")
        request = engine_request(plan)
        subs = []
        for p, ids in enumerate(sources):
            for i in range(n):
                index = p * n + i
                params = source_params(request, index)
                if i == 0:
                    try:
                        self.engine.engine.check_request(request.prompt_ids, params, encoder_ids=ids,
                                                         beam_search=request.beam_search)
                    except InvalidRequestError as exc:
                        raise _as_400(exc, default_param="prompt") from None
                args = {"encoder_ids": ids, "logits_processor": request.logits_processor,
                        "beam_search": request.beam_search}
                subs.append(SubRequest(index, p, request.prompt_ids, params, args))
        return subs

    # -- routes ------------------------------------------------------------------------------
    async def create_completion(self, body: Seq2SeqCompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        if self.draining:
            raise EngineStoppedError("the server is shutting down")
        plan = self.generation_plan(body)
        # Tokenizing takes a worker thread: a long text must not stall the event loop.
        sources = await asyncio.to_thread(self.tokenize, body.prompts())
        subs = self.sub_requests(plan, sources, body.n or 1)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        num_prompt_tokens = sum(len(ids) for ids in sources)
        outputs = self.run(request_id, subs, None, None)
        if body.stream:
            renderer = CompletionStreamRenderer(self, request_id, created, subs, body, None, num_prompt_tokens)
            return await stream_response(request, outputs, renderer)
        states = await until_disconnected(request, self.collect(outputs, len(subs)))
        choices = [CompletionChoice(index=sub.index, text=st.text, finish_reason=st.finish_reason)
                   for sub, st in zip(subs, states, strict=True)]
        usage = UsageInfo.of(num_prompt_tokens, sum(st.num_output_tokens for st in states))
        return JSONResponse(CompletionResponse(id=request_id, created=created, model=self.model_name,
                                               choices=choices, usage=usage).model_dump())

    async def chat_completion(self) -> Response:
        raise ApiError(400, f"'{self.model_name}' is an encoder-decoder ({self.lm.model_type}) model: it has no "
                       "chat; it is served on POST /v1/completions, with the source text as the prompt")

    async def list_models(self) -> Response:
        return JSONResponse(ModelList(data=[self.model_card()]).model_dump())

    async def retrieve_model(self, model: str) -> Response:
        self.check_model(model)
        return JSONResponse(self.model_card().model_dump())

    async def health(self) -> Response:
        if self.engine.dead is not None:
            return JSONResponse({"status": "error", "detail": f"the engine died: {self.engine.dead!r}"}, 503)
        if self.draining:
            return JSONResponse({"status": "shutting down"}, 503)
        return JSONResponse({"status": "ok"})

    async def metrics_text(self) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _as_400(exc: InvalidRequestError, default_param: str | None = None) -> ApiError:
    """A plan's or the engine's refusal as a 400 naming the request field it came from."""
    message = str(exc)
    setting = message.split(" ", 1)[0]
    return ApiError(400, message, param=PARAM_OF_SETTING.get(setting, default_param))


def create_seq2seq_app(lm: Seq2SeqLM, model_name: str, api_key: str | None = None, *, max_waiting: int = 256,
                       shutdown_grace_s: float = 5.0,
                       max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The app owns the engine thread: its lifespan starts it and stops it at the end.

    The engine is `lm.engine` (its EngineConfig bounds the running sequences, beams included), which
    the app's thread steps from then on: lm.generate must not run beside it. `max_waiting` bounds
    the requests waiting beyond them. `app.state.drain()` is the graceful
    shutdown runner.py calls on SIGTERM: new requests get 503, running ones get shutdown_grace_s
    seconds, the rest a 503.
    """
    async_engine = AsyncEngine(lm.engine, max_waiting=max_waiting)
    metrics = ServerMetrics(async_engine, model_name)
    serving = Seq2SeqCompletions(lm, model_name, async_engine, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        try:
            yield
        finally:
            await async_engine.shutdown(shutdown_grace_s)

    docs = {"docs_url": None, "redoc_url": None, "openapi_url": None} if api_key else {}
    app = FastAPI(title="leapllm", summary="OpenAI-compatible encoder-decoder server", lifespan=lifespan, **docs)
    app.state.completions = serving
    app.state.engine = async_engine
    app.state.metrics = metrics
    app.state.model_name = model_name

    async def drain() -> None:
        serving.draining = True
        await async_engine.shutdown(shutdown_grace_s)

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
