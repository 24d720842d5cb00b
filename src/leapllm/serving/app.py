"""The OpenAI-compatible HTTP API over an AsyncEngine: the FastAPI app and its routes.

    app = create_app(AsyncEngine(LLMEngine(model, tokenizer, config)), tokenizer, "smollm2", 8192)
    uvicorn.run(app)      # or leapllm.serving.runner.serve(...), which `leapllm serve` uses

Endpoints: POST /v1/completions (completions.py), POST /v1/chat/completions (chat.py), both with
`stream: true` as server-sent events (streaming.py); GET /v1/models, GET /health, GET /metrics
(Prometheus); with encoders, POST /v1/embeddings, /v1/classify, /v1/qa and /v1/ner (embeddings.py); the chat
page at /, the dashboard at /dashboard and their data (web.py).

Every error is OpenAI-shaped JSON (errors.py), whatever raised it, and a client that goes away
aborts its engine requests (disconnect.py).
"""

from __future__ import annotations

import contextlib

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from leapllm.engine.async_engine import AsyncEngine, EngineStepError
from leapllm.errors import LeapLLMError
from leapllm.serving.auth import ApiKeyMiddleware
from leapllm.serving.body_limit import DEFAULT_MAX_REQUEST_BYTES, BodySizeLimitMiddleware
from leapllm.serving.chat import ChatServing
from leapllm.serving.completions import CompletionServing
from leapllm.serving.disconnect import STATUS_CLIENT_CLOSED, ClientDisconnected
from leapllm.serving.errors import ApiError, error_response, validation_error
from leapllm.serving.generation import GenerationServing
from leapllm.serving.logprobs import TokenStrings
from leapllm.serving.metrics import ServerMetrics
from leapllm.serving.protocol import ModelCard, ModelList
from leapllm.serving.web import WebRoutes, add_web_routes


class StatusRoutes:
    """GET /v1/models, GET /v1/models/{model}, GET /health and GET /metrics: what the server serves
    and whether it is well."""

    def __init__(self, serving: GenerationServing, metrics: ServerMetrics):
        self.serving = serving
        self.metrics = metrics
        self.draining = False  # set at shutdown: /health turns 503 so that load balancers look elsewhere
        self.encoder_model_names: list[str] = []  # embedding model / classifier served beside the LLM

    async def list_models(self) -> Response:
        extra = [ModelCard(id=name) for name in self.encoder_model_names]
        return JSONResponse(ModelList(data=[self.serving.model_card(), *extra]).model_dump())

    async def retrieve_model(self, model: str) -> Response:
        self.serving.check_model(model)
        return JSONResponse(self.serving.model_card().model_dump())

    async def health(self) -> Response:
        engine = self.serving.engine
        if engine.dead is not None:
            return JSONResponse({"status": "error", "detail": f"the engine died: {engine.dead!r}"}, 503)
        if self.draining:
            return JSONResponse({"status": "shutting down"}, 503)
        return JSONResponse({"status": "ok"})

    async def metrics_text(self) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI-shaped JSON (errors.py), whatever raised it; a client that went away gets
    no body (499 in the access log)."""

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


def create_app(async_engine: AsyncEngine, tokenizer, model_name: str, context_length: int,
               api_key: str | None = None, *, shutdown_grace_s: float = 5.0, encoders=None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, model_facts: dict | None = None,
               reports_dir: str | None = None) -> FastAPI:
    """The app owns the engine's lifecycle: its lifespan starts the engine thread and stops it at the end.

    `app.state.drain()` is the graceful part, for the server to call as soon as it starts shutting
    down (runner.py does, on SIGTERM): new requests get 503, running ones get shutdown_grace_s
    seconds to finish, and the rest are aborted and answered with a 503 (an error event in a stream).
    `encoders` (a serving.embeddings.EncoderServing) adds /v1/embeddings, /v1/classify, /v1/qa and /v1/ner. With an
    API key the interactive docs (/docs, /redoc, /openapi.json) are off: they would describe the
    API to anyone without the key. `model_facts` (`LLM.info()`) and `reports_dir` (`--reports`) feed
    the dashboard (web.py).
    """
    metrics = ServerMetrics(async_engine, model_name)
    tokens = TokenStrings(tokenizer)  # one cache of token strings for both endpoints
    completions = CompletionServing(async_engine, tokenizer, model_name, context_length, metrics, tokens)
    chat = ChatServing(async_engine, tokenizer, model_name, context_length, metrics, tokens)
    status = StatusRoutes(completions, metrics)  # either handler would do: both serve the one model
    web = WebRoutes(async_engine, metrics, model_name, model_facts, reports_dir)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        if encoders is not None:
            encoders.start()
        try:
            async with web.sampling():
                yield
        finally:
            await async_engine.shutdown(shutdown_grace_s)
            if encoders is not None:
                encoders.stop()

    docs = {"docs_url": None, "redoc_url": None, "openapi_url": None} if api_key else {}
    app = FastAPI(title="leapllm", summary="OpenAI-compatible LLM server", lifespan=lifespan, **docs)
    app.state.completions = completions
    app.state.chat = chat
    app.state.status = status
    app.state.metrics = metrics
    app.state.engine = async_engine

    async def drain() -> None:
        status.draining = True
        await async_engine.shutdown(shutdown_grace_s)

    app.state.drain = drain

    app.add_api_route("/v1/completions", completions.create_completion, methods=["POST"], response_model=None)
    app.add_api_route("/v1/chat/completions", chat.create_chat_completion, methods=["POST"], response_model=None)
    app.add_api_route("/v1/models", status.list_models, methods=["GET"], response_model=None)
    app.add_api_route("/v1/models/{model:path}", status.retrieve_model, methods=["GET"], response_model=None)
    app.add_api_route("/health", status.health, methods=["GET"], response_model=None)
    if encoders is not None:
        # Imported only when asked for: the encoder stack is not needed to serve the LLM alone.
        from leapllm.serving.embeddings import add_encoder_routes

        status.encoder_model_names = encoders.model_names()
        add_encoder_routes(app, encoders)
    app.add_api_route("/metrics", status.metrics_text, methods=["GET"], response_model=None)
    add_web_routes(app, web)

    add_error_handlers(app)

    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_request_bytes)
    if api_key:  # added last, so it runs first: no body is read for a request without the key
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    return app
