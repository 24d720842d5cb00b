"""The OpenAI-compatible HTTP API over an AsyncEngine: FastAPI app, handlers, SSE streaming.

    app = create_app(AsyncEngine(LLMEngine(model, tokenizer, config)), tokenizer, "smollm2", 8192)
    uvicorn.run(app)      # or leapllm.serving.runner.serve(...), which `leapllm serve` uses

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as
server-sent events), GET /v1/models, GET /health, GET /metrics (Prometheus).

One HTTP request becomes one engine request per (prompt, choice): `n` choices of `k` prompts are
k*n engine requests, run concurrently and merged into one stream of (choice index, output). The
handler validates everything it can (sampling values, prompt length, logprobs) before anything
reaches the engine, so a bad request fails alone with a 400 and never disturbs others in flight.

Every error is OpenAI-shaped JSON, {"error": {"message", "type", "param", "code"}}. A client that
goes away aborts its engine requests: for streams Starlette cancels the response body on
disconnect; for the rest a watcher task races the generation against the disconnect message.
Either way the cancellation reaches AsyncEngine.generate, whose exit aborts the request and
returns its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from leapllm.engine.async_engine import (
    AsyncEngine,
    EngineOverloadedError,
    EngineStepError,
    EngineStoppedError,
)
from leapllm.engine.llm_engine import MAX_LOGPROBS
from leapllm.engine.sampling import SamplingParams
from leapllm.engine.sequence import RequestOutput, TokenLogprob
from leapllm.errors import LeapLLMError
from leapllm.serving.metrics import ServerMetrics
from leapllm.serving.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobEntry,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    ChatStreamChoice,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    SamplingRequest,
    TopLogprob,
    UsageInfo,
)

log = logging.getLogger("leapllm.serving")

CHAT_ROLES = ("system", "user", "assistant", "tool")  # what chat templates know; "developer" maps to system
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # as OpenAI
INT64 = 2**63
STATUS_CLIENT_CLOSED = 499  # nginx's "client closed request"; only the access log ever sees it


# -- errors ------------------------------------------------------------------------------------

class ApiError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


def as_api_error(exc: BaseException) -> ApiError:
    """The status and OpenAI error fields for any exception a request can end with."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, EngineOverloadedError):
        return ApiError(503, str(exc), "server_error", code="overloaded", headers={"Retry-After": "1"})
    if isinstance(exc, EngineStoppedError):
        return ApiError(503, str(exc), "server_error", code="shutting_down")
    if isinstance(exc, LeapLLMError):  # InvalidRequestError, TokenizerError (a bad conversation), ...
        return ApiError(400, str(exc))
    if isinstance(exc, EngineStepError):
        return ApiError(500, str(exc), "server_error", code="engine_error")
    return ApiError(500, f"internal server error ({type(exc).__name__})", "server_error", code="internal_error")


def error_body(err: ApiError) -> dict:
    return ErrorResponse(error=ErrorInfo(message=err.message, type=err.type, param=err.param,
                                         code=err.code)).model_dump()


def error_response(exc: BaseException) -> JSONResponse:
    err = as_api_error(exc)
    return JSONResponse(error_body(err), status_code=err.status, headers=err.headers)


def _is_union_tag(part) -> bool:
    # pydantic names the member of a union in an error's location ("str", "list[str]", "StreamOptions");
    # field names are snake_case, so anything else is a tag.
    return isinstance(part, str) and (part[:1].isupper() or "[" in part or "-" in part
                                      or part in ("str", "int", "float", "bool", "dict", "list"))


def validation_error(exc: RequestValidationError) -> ApiError:
    """FastAPI's 422 as OpenAI's 400: one message naming the field, the field as `param`."""
    errors = exc.errors()
    first = errors[0]
    if first["type"] == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return ApiError(400, f"the request body is not valid JSON: {detail}".rstrip(": "))
    loc = [p for p in first["loc"] if p != "body" and not _is_union_tag(p)]
    param = ".".join(str(p) for p in loc) or None
    # Every member of a union reports its own error: join them, once each.
    messages = []
    for e in errors:
        if [p for p in e["loc"] if p != "body" and not _is_union_tag(p)] == loc:
            msg = e["msg"].removeprefix("Value error, ")
            if msg not in messages:
                messages.append(msg)
    # "Input should be a valid string or a valid list", not "... or Input should be a valid list"
    text = " or ".join([messages[0]] + [m.removeprefix("Input should be ") for m in messages[1:]])
    if first["type"] == "missing" and not param:
        text = "the request has no JSON body"
    return ApiError(400, f"{param}: {text}" if param else text, param=param)


# -- the merged stream of one HTTP request's engine requests ------------------------------------

@dataclass
class SubRequest:
    """One engine request: one choice of one prompt."""
    index: int  # the choice index in the response (prompt_index * n + i, as OpenAI and vLLM)
    prompt_index: int
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class ChoiceState:
    """What a non-streaming response accumulates for one choice."""
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    num_output_tokens: int = 0

    def add(self, out: RequestOutput) -> None:
        self.texts.append(out.new_text)
        self.token_ids += out.new_token_ids
        self.logprobs += out.new_logprobs or []
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.num_output_tokens = out.num_output_tokens
        if out.finished:
            self.finish_reason = out.finish_reason

    @property
    def text(self) -> str:
        return "".join(self.texts)


async def wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next message can only be http.disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, coro):
    """Await coro; if the client disconnects first, cancel it (aborting its engine requests) and
    raise ClientDisconnected."""
    work = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled (e.g. at the end of a graceful shutdown)
        watcher.cancel()
        if not work.done():
            work.cancel()
    if work.done() and not work.cancelled():
        return work.result()
    await asyncio.gather(work, return_exceptions=True)  # let the cancellation (and so the abort) run
    raise ClientDisconnected()


async def without_generated_tokens(outputs: AsyncIterator[tuple[int, RequestOutput]]):
    """The outputs with their generated tokens removed, as if max_tokens were 0."""
    async with contextlib.aclosing(outputs):  # closing this closes (and so aborts) the source too
        async for index, out in outputs:
            yield index, dataclasses.replace(
                out, new_token_ids=[], new_text="", new_logprobs=[] if out.new_logprobs is not None else None,
                num_output_tokens=0, finish_reason="length" if out.finished and out.finish_reason != "abort"
                else out.finish_reason)


# -- token strings and bytes for logprobs --------------------------------------------------------

def _gpt2_byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character a byte-level BPE vocabulary writes for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs)}


GPT2_BYTE_OF_CHAR = _gpt2_byte_of_char()


class TokenStrings:
    """A token's text and bytes as OpenAI's logprobs report them, cached per token id."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = functools.lru_cache(maxsize=1 << 16)(self._text)
        self.bytes = functools.lru_cache(maxsize=1 << 16)(self._bytes)

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _bytes(self, token_id: int) -> list[int]:
        text = self.text(token_id)
        if "\ufffd" not in text:
            return list(text.encode("utf-8"))
        # Part of a multi-byte character: recover the raw bytes from the vocabulary entry.
        piece = self.tokenizer.id_to_token(token_id) or ""
        if m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece):  # SentencePiece byte fallback
            return [int(m.group(1), 16)]
        if piece and all(ch in GPT2_BYTE_OF_CHAR for ch in piece):  # byte-level BPE
            return [GPT2_BYTE_OF_CHAR[ch] for ch in piece]
        return list(text.encode("utf-8"))

    def completion_logprobs(self, entries: list[TokenLogprob | None], token_ids: list[int],
                            offset: int) -> tuple[CompletionLogprobs, int]:
        """Completions' logprobs for tokens whose text starts at `offset`; returns them and the next offset.
        An entry of None (the prompt's first token, which has no context) has null logprobs."""
        lp = CompletionLogprobs()
        for token_id, entry in zip(token_ids, entries):
            text = self.text(token_id)
            lp.tokens.append(text)
            lp.text_offset.append(offset)
            offset += len(text)
            if entry is None:
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
                continue
            lp.token_logprobs.append(entry.logprob)
            top = {self.text(t): v for t, v in reversed(entry.top)}  # the likelier one wins a clash of strings
            top = dict(sorted(top.items(), key=lambda kv: -kv[1]))
            top.setdefault(text, entry.logprob)  # OpenAI always includes the chosen token
            lp.top_logprobs.append(top)
        return lp, offset

    def chat_logprobs(self, entries: list[TokenLogprob]) -> ChatLogprobs:
        return ChatLogprobs(content=[
            ChatLogprobEntry(token=self.text(e.token_id), logprob=e.logprob, bytes=self.bytes(e.token_id),
                             top_logprobs=[TopLogprob(token=self.text(t), logprob=v, bytes=self.bytes(t))
                                           for t, v in e.top])
            for e in entries])


def sse(chunk, include_usage: bool) -> str:
    return f"data: {chunk.model_dump_json(exclude=None if include_usage else {'usage'})}\n\n"


# -- the API -----------------------------------------------------------------------------------

class OpenAIServing:
    def __init__(self, async_engine: AsyncEngine, tokenizer, model_name: str, context_length: int,
                 metrics: ServerMetrics):
        self.engine = async_engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.context_length = context_length
        self.metrics = metrics
        self.tokens = TokenStrings(tokenizer)
        self.draining = False  # set at shutdown: /health turns 503 so that load balancers look elsewhere
        self.encoder_model_names: list[str] = []  # embedding model / classifier served beside the LLM
        eng = async_engine.engine
        # The most tokens (prompt + output) one sequence can hold: the context, or the KV pool if smaller.
        self.token_capacity = min(context_length, eng.allocator.num_blocks * eng.config.block_size)

    # -- request checks ------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(404, f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def resolve_max_tokens(self, requested: int | None, prompt_len: int, default: int | None,
                           param: str = "max_tokens") -> int:
        if requested is None:
            if default is not None:
                return default
            # Chat without max_tokens: the rest of the context, as OpenAI does.
            if prompt_len >= self.token_capacity:
                raise ApiError(400, f"the prompt ({prompt_len} tokens) leaves no room to generate: the server "
                               f"holds at most {self.token_capacity} tokens per sequence", param="messages")
            return self.token_capacity - prompt_len
        if requested < 1:
            raise ApiError(400, f"{param} must be at least 1, got {requested}", param=param)
        if requested >= self.context_length:
            raise ApiError(400, f"{param} ({requested}) must be less than the model's context length "
                           f"({self.context_length} tokens)", param=param)
        return requested

    def sampling_params(self, req: SamplingRequest, max_tokens: int, choice: int) -> SamplingParams:
        def pick(value, default):
            return default if value is None else value

        seed = None
        if req.seed is not None:
            seed = req.seed + choice  # so that the n choices differ, reproducibly
            if not -INT64 <= seed < INT64:
                raise ApiError(400, f"seed must be a 64-bit signed integer, got {req.seed}", param="seed")
        return SamplingParams(
            max_tokens=max_tokens, temperature=pick(req.temperature, 1.0), top_p=pick(req.top_p, 1.0),
            top_k=pick(req.top_k, 0), min_p=pick(req.min_p, 0.0),
            repetition_penalty=pick(req.repetition_penalty, 1.0),
            presence_penalty=pick(req.presence_penalty, 0.0), frequency_penalty=pick(req.frequency_penalty, 0.0),
            seed=seed, stop=req.stop, stop_token_ids=req.stop_token_ids or [], ignore_eos=bool(req.ignore_eos),
        )

    def plan(self, req: SamplingRequest, prompts: list[list[int]], default_max_tokens: int | None,
             logprobs: int | None, prompt_logprobs: int | None, max_tokens_param: str = "max_tokens",
             requested_max_tokens: int | None = None) -> list[SubRequest]:
        """One SubRequest per (prompt, choice), every one checked by the engine before any starts."""
        n = req.n or 1
        subs = []
        for p, ids in enumerate(prompts):
            max_tokens = self.resolve_max_tokens(requested_max_tokens, len(ids), default_max_tokens,
                                                 max_tokens_param)
            for i in range(n):
                params = self.sampling_params(req, max_tokens, i)
                if i == 0:  # the n choices differ only in their seed: one check per prompt
                    ids = self.engine.engine.check_request(ids, params, logprobs, prompt_logprobs)
                subs.append(SubRequest(p * n + i, p, ids, params))
        return subs

    # -- running -------------------------------------------------------------------------------
    async def run(self, request_id: str, subs: list[SubRequest], logprobs: int | None,
                  prompt_logprobs: int | None) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Run the sub-requests concurrently; yield (choice index, output) as outputs arrive.

        Stops at the first engine error (raising it). Leaving early (a disconnect, a cancellation)
        cancels every pump, and so aborts every engine request still running.
        """
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(sub: SubRequest) -> None:
            try:
                async for out in self.engine.generate(f"{request_id}-{sub.index}", sub.prompt_ids, sub.params,
                                                      logprobs=logprobs, prompt_logprobs=prompt_logprobs):
                    queue.put_nowait((sub.index, out))
            except Exception as exc:
                queue.put_nowait((sub.index, exc))

        tasks = [asyncio.create_task(pump(sub)) for sub in subs]
        unfinished, failed = len(subs), False
        try:
            while unfinished:
                index, item = await queue.get()
                if isinstance(item, Exception):
                    failed = True
                    raise item
                if item.finished:
                    unfinished -= 1
                    self.metrics.observe_finished(item)
                yield index, item
        finally:
            for task in tasks:
                task.cancel()
            if unfinished and not failed:
                self.metrics.observe_aborted(unfinished)

    async def collect(self, outputs: AsyncIterator[tuple[int, RequestOutput]], num_choices: int) -> list[ChoiceState]:
        choices = [ChoiceState() for _ in range(num_choices)]
        async for index, out in outputs:
            choices[index].add(out)
        if any(c.finish_reason == "abort" for c in choices):
            raise EngineStoppedError("the server shut down before the request finished")
        return choices

    async def stream(self, request: Request, outputs: AsyncIterator[tuple[int, RequestOutput]],
                     renderer: StreamRenderer) -> Response:
        """An SSE response. Waits for the first output, so that a request the engine refuses
        (overloaded, shutting down) still gets its proper status code instead of a 200 stream."""
        first = await until_disconnected(request, anext(outputs))

        async def body():
            try:
                for chunk in renderer.start():
                    yield sse(chunk, renderer.include_usage)
                for chunk in renderer.on_output(*first):
                    yield sse(chunk, renderer.include_usage)
                async for index, out in outputs:
                    for chunk in renderer.on_output(index, out):
                        yield sse(chunk, renderer.include_usage)
                if renderer.include_usage:
                    yield sse(renderer.usage_chunk(), True)
            except Exception as exc:  # after the 200 went out: report it in the stream, as OpenAI does
                err = as_api_error(exc)
                if err.status >= 500 and not isinstance(exc, (ApiError, LeapLLMError, EngineStepError)):
                    log.exception("stream failed")
                yield f"data: {json.dumps(error_body(err), separators=(',', ':'))}\n\n"
            finally:
                await outputs.aclose()  # on a disconnect: cancels the pumps, which aborts the requests
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- completions ---------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    async def create_completion(self, body: CompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        n = body.n or 1
        if body.best_of is not None and body.best_of != n:
            raise ApiError(400, "best_of is not supported (it may only equal n)", param="best_of")
        if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
            raise ApiError(400, f"logprobs must be between 0 and {MAX_LOGPROBS}, got {body.logprobs}",
                           param="logprobs")
        prompts = body.prompts()
        prompt_ids = [self.encode_prompt(p) for p in prompts]
        prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
        # echo with max_tokens 0 scores the prompt (lm-eval-harness does this): generate one token, drop it.
        score_prompt_only = bool(body.echo) and body.max_tokens == 0
        subs = self.plan(body, prompt_ids, COMPLETIONS_DEFAULT_MAX_TOKENS, body.logprobs, prompt_logprobs,
                         requested_max_tokens=1 if score_prompt_only else body.max_tokens)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        outputs = self.run(request_id, subs, body.logprobs, prompt_logprobs)
        if score_prompt_only:
            outputs = without_generated_tokens(outputs)
        prompt_texts = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in prompts] if body.echo else None
        num_prompt_tokens = sum(len(ids) for ids in prompt_ids)
        if body.stream:
            renderer = CompletionStreamRenderer(self, request_id, created, subs, body, prompt_texts, num_prompt_tokens)
            return await self.stream(request, outputs, renderer)

        states = await until_disconnected(request, self.collect(outputs, len(subs)))
        choices = []
        for sub, st in zip(subs, states):
            prompt_text = prompt_texts[sub.prompt_index] if body.echo else ""
            logprobs = None
            if body.logprobs is not None:
                logprobs = CompletionLogprobs()
                if body.echo:  # the prompt's tokens first; the first has no logprob (nothing before it)
                    logprobs, _ = self.tokens.completion_logprobs(st.prompt_logprobs or [], sub.prompt_ids, 0)
                logprobs.extend(self.tokens.completion_logprobs(st.logprobs, st.token_ids, len(prompt_text))[0])
            text = prompt_text + st.text
            choices.append(CompletionChoice(index=sub.index, text=text, logprobs=logprobs,
                                            finish_reason=st.finish_reason))
        completion_tokens = sum(st.num_output_tokens for st in states)
        usage = UsageInfo(prompt_tokens=num_prompt_tokens, completion_tokens=completion_tokens,
                          total_tokens=num_prompt_tokens + completion_tokens)
        response = CompletionResponse(id=request_id, created=created, model=self.model_name, choices=choices,
                                      usage=usage)
        return JSONResponse(response.model_dump())

    # -- chat ----------------------------------------------------------------------------------
    def chat_prompt_ids(self, messages: list[ChatMessage]) -> list[int]:
        if not messages:
            raise ApiError(400, "messages must not be empty", param="messages")
        conversation = []
        for i, m in enumerate(messages):
            role = "system" if m.role == "developer" else m.role
            if role not in CHAT_ROLES:
                raise ApiError(400, f"messages[{i}].role is {m.role!r}; expected one of "
                               f"{', '.join(CHAT_ROLES + ('developer',))}", param=f"messages.{i}.role")
            content = m.content
            if content is None:
                content = ""
            elif isinstance(content, list):
                texts = []
                for j, part in enumerate(content):
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise ApiError(400, f"messages[{i}].content[{j}] has type {part.get('type')!r}; only text "
                                       "parts ({\"type\": \"text\", \"text\": ...}) are supported",
                                       param=f"messages.{i}.content")
                    texts.append(part["text"])
                content = "\n".join(texts)
            message = {"role": role, "content": content}
            if m.name is not None:
                message["name"] = m.name
            conversation.append(message)
        return self.tokenizer.encode_chat(conversation, add_generation_prompt=True)

    async def create_chat_completion(self, body: ChatCompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        if body.top_logprobs is not None:
            if not 0 <= body.top_logprobs <= MAX_LOGPROBS:
                raise ApiError(400, f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {body.top_logprobs}",
                               param="top_logprobs")
            if body.top_logprobs > 0 and not body.logprobs:
                raise ApiError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
        if max_tokens is None:
            max_tokens, param = body.max_tokens, "max_tokens"
        prompt_ids = self.chat_prompt_ids(body.messages)
        subs = self.plan(body, [prompt_ids], None, logprobs, None, max_tokens_param=param,
                         requested_max_tokens=max_tokens)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        outputs = self.run(request_id, subs, logprobs, None)
        if body.stream:
            renderer = ChatStreamRenderer(self, request_id, created, subs, body, len(prompt_ids))
            return await self.stream(request, outputs, renderer)

        states = await until_disconnected(request, self.collect(outputs, len(subs)))
        choices = [ChatChoice(index=sub.index, message=ChatResponseMessage(content=st.text),
                              logprobs=self.tokens.chat_logprobs(st.logprobs) if logprobs is not None else None,
                              finish_reason=st.finish_reason)
                   for sub, st in zip(subs, states)]
        completion_tokens = sum(st.num_output_tokens for st in states)
        usage = UsageInfo(prompt_tokens=len(prompt_ids), completion_tokens=completion_tokens,
                          total_tokens=len(prompt_ids) + completion_tokens)
        response = ChatCompletionResponse(id=request_id, created=created, model=self.model_name, choices=choices,
                                          usage=usage)
        return JSONResponse(response.model_dump())

    # -- the rest ------------------------------------------------------------------------------
    def model_card(self) -> ModelCard:
        return ModelCard(id=self.model_name, max_model_len=self.context_length)

    async def list_models(self) -> Response:
        extra = [ModelCard(id=name) for name in self.encoder_model_names]
        return JSONResponse(ModelList(data=[self.model_card(), *extra]).model_dump())

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


# -- stream renderers: engine outputs to OpenAI chunks --------------------------------------------

class StreamRenderer:
    """Turns one request's engine outputs into its stream's chunks: start() first, on_output() for
    each output, usage_chunk() at the end when the client asked for usage."""
    chunk_type: type

    def __init__(self, serving: OpenAIServing, request_id: str, created: int, subs: list[SubRequest],
                 body: SamplingRequest, num_prompt_tokens: int):
        self.serving, self.request_id, self.created, self.subs = serving, request_id, created, subs
        self.include_usage = body.include_usage_in_stream
        self.num_prompt_tokens = num_prompt_tokens
        self.num_output_tokens = [0] * len(subs)

    def chunk(self, choices, usage=None):
        return self.chunk_type(id=self.request_id, created=self.created, model=self.serving.model_name,
                               choices=choices, usage=usage)

    def start(self) -> list:
        return []

    def on_output(self, index: int, out: RequestOutput) -> list:
        if out.finish_reason == "abort":  # the server shut down: report an error, not a short answer
            raise EngineStoppedError("the server shut down before the request finished")
        self.num_output_tokens[index] = out.num_output_tokens
        return self.render(index, out)

    def render(self, index: int, out: RequestOutput) -> list:
        raise NotImplementedError

    def usage_chunk(self):
        completion = sum(self.num_output_tokens)
        return self.chunk([], UsageInfo(prompt_tokens=self.num_prompt_tokens, completion_tokens=completion,
                                        total_tokens=self.num_prompt_tokens + completion))


class CompletionStreamRenderer(StreamRenderer):
    chunk_type = CompletionChunk

    def __init__(self, serving: OpenAIServing, request_id: str, created: int, subs: list[SubRequest],
                 body: CompletionRequest, prompt_texts: list[str] | None, num_prompt_tokens: int):
        super().__init__(serving, request_id, created, subs, body, num_prompt_tokens)
        self.body = body
        self.prompt_texts = prompt_texts
        self.started = [False] * len(subs)
        self.offsets = [0] * len(subs)  # text_offset of each choice's next token

    def render(self, index: int, out: RequestOutput) -> list:
        tokens = self.serving.tokens
        text, logprobs = out.new_text, None
        if self.body.logprobs is not None:
            logprobs = CompletionLogprobs()
        if not self.started[index]:
            self.started[index] = True
            if self.body.echo:  # the prompt comes first, with its logprobs when asked
                sub = self.subs[index]
                prompt_text = self.prompt_texts[sub.prompt_index]
                text = prompt_text + text
                if logprobs is not None:
                    logprobs, _ = tokens.completion_logprobs(out.prompt_logprobs or [], sub.prompt_ids, 0)
                self.offsets[index] = len(prompt_text)
        if logprobs is not None and out.new_logprobs:
            generated, self.offsets[index] = tokens.completion_logprobs(out.new_logprobs, out.new_token_ids,
                                                                        self.offsets[index])
            logprobs.extend(generated)
        if not text and not (logprobs and logprobs.tokens) and not out.finished:
            return []  # a token whose text is held back (part of a character or of a stop string)
        return [self.chunk([CompletionChoice(index=index, text=text, logprobs=logprobs,
                                             finish_reason=out.finish_reason if out.finished else None)])]


class ChatStreamRenderer(StreamRenderer):
    chunk_type = ChatCompletionChunk

    def __init__(self, serving: OpenAIServing, request_id: str, created: int, subs: list[SubRequest],
                 body: ChatCompletionRequest, num_prompt_tokens: int):
        super().__init__(serving, request_id, created, subs, body, num_prompt_tokens)
        self.logprobs = bool(body.logprobs)

    def start(self) -> list:
        # OpenAI opens every choice with a delta that carries only the role.
        return [self.chunk([ChatStreamChoice(index=sub.index, delta={"role": "assistant", "content": ""})])
                for sub in self.subs]

    def render(self, index: int, out: RequestOutput) -> list:
        logprobs = None
        if self.logprobs and out.new_logprobs:
            logprobs = self.serving.tokens.chat_logprobs(out.new_logprobs)
        if not out.new_text and logprobs is None and not out.finished:
            return []
        delta = {"content": out.new_text} if out.new_text or logprobs is not None else {}
        return [self.chunk([ChatStreamChoice(index=index, delta=delta, logprobs=logprobs,
                                             finish_reason=out.finish_reason if out.finished else None)])]


# -- the app -----------------------------------------------------------------------------------

class ApiKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on /v1/*; /health and /metrics stay open (probes, scrapers).

    Plain ASGI, so that it answers before the body is read and never wraps streaming responses."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not token.strip():
                err = ApiError(401, "missing API key: send it as 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
            elif not hmac.compare_digest(token.strip(), self.api_key):
                err = ApiError(401, "incorrect API key provided", code="invalid_api_key")
            else:
                err = None
            if err is not None:
                response = JSONResponse(error_body(err), status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(async_engine: AsyncEngine, tokenizer, model_name: str, context_length: int,
               api_key: str | None = None, *, shutdown_grace_s: float = 5.0, encoders=None) -> FastAPI:
    """The app owns the engine's lifecycle: its lifespan starts the engine thread and stops it at the end.

    `app.state.drain()` is the graceful part, for the server to call as soon as it starts shutting
    down (runner.py does, on SIGTERM): new requests get 503, running ones get shutdown_grace_s
    seconds to finish, and the rest are aborted and answered with a 503 (an error event in a stream).
    `encoders` (a serving.encoder_api.EncoderServing) adds /v1/embeddings and /v1/classify.
    """
    metrics = ServerMetrics(async_engine, model_name)
    serving = OpenAIServing(async_engine, tokenizer, model_name, context_length, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        if encoders is not None:
            encoders.start()
        try:
            yield
        finally:
            await async_engine.shutdown(shutdown_grace_s)
            if encoders is not None:
                encoders.stop()

    app = FastAPI(title="leapllm", summary="OpenAI-compatible LLM server", lifespan=lifespan)
    app.state.serving = serving
    app.state.metrics = metrics
    app.state.engine = async_engine

    async def drain() -> None:
        serving.draining = True
        await async_engine.shutdown(shutdown_grace_s)

    app.state.drain = drain

    app.add_api_route("/v1/completions", serving.create_completion, methods=["POST"], response_model=None)
    app.add_api_route("/v1/chat/completions", serving.create_chat_completion, methods=["POST"],
                      response_model=None)
    app.add_api_route("/v1/models", serving.list_models, methods=["GET"], response_model=None)
    app.add_api_route("/v1/models/{model:path}", serving.retrieve_model, methods=["GET"], response_model=None)
    app.add_api_route("/health", serving.health, methods=["GET"], response_model=None)
    if encoders is not None:
        from leapllm.serving.encoder_api import add_encoder_routes

        serving.encoder_model_names = encoders.model_names()
        add_encoder_routes(app, encoders)
    app.add_api_route("/metrics", serving.metrics_text, methods=["GET"], response_model=None)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        content_type = request.headers.get("content-type", "application/json")
        if "json" not in content_type:  # e.g. `curl -d` without -H: FastAPI then reads no JSON at all
            return error_response(ApiError(400, f"the request body must be JSON sent with 'Content-Type: "
                                                f"application/json', got '{content_type}'"))
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):  # unknown path, wrong method
        err = ApiError(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500
                       else "server_error", code="not_found" if exc.status_code == 404 else None)
        err.headers = getattr(exc, "headers", None)
        return error_response(err)

    @app.exception_handler(ClientDisconnected)
    async def on_disconnect(request: Request, exc: ClientDisconnected):
        return Response(status_code=STATUS_CLIENT_CLOSED)

    async def on_expected_error(request: Request, exc: Exception):
        return error_response(exc)

    for expected in (ApiError, LeapLLMError, EngineStepError):  # no traceback: these are reported, not bugs
        app.add_exception_handler(expected, on_expected_error)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception):  # Starlette logs the traceback too
        return error_response(exc)

    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    return app
