"""The encoder endpoints: POST /v1/embeddings (OpenAI format) and POST /v1/classify (vLLM's format).

    leapllm serve --embedding-model default --classifier ./my-classifier

Embeddings accept `input` as a string, a list of strings, a list of token ids or a list of such
lists, `encoding_format` float or base64; `dimensions` (shortened embeddings) is not supported by
these models and is refused with a 400. Concurrent requests are merged into shared, length-bucketed
batches by the EmbeddingBatcher. Texts longer than the encoder takes are an error unless the
request says `"truncate": true` (vLLM's `truncate_prompt_tokens` works the same way).
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
import uuid
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ConfigDict, StrictBool, StrictInt, StrictStr

from leapllm.encoders.embedding_batcher import EmbedderBusyError, EmbeddingBatcher
from leapllm.errors import InvalidRequestError
from leapllm.serving.disconnect import until_disconnected
from leapllm.serving.errors import ApiError
from leapllm.serving.protocol import UnicodeText

Input = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class EmbeddingRequest(UnicodeText):
    model_config = ConfigDict(extra="ignore")
    input: Input
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: StrictStr | None = None
    truncate: StrictBool | None = None
    truncate_prompt_tokens: StrictInt | None = None


class ClassifyRequest(UnicodeText):
    model_config = ConfigDict(extra="ignore")
    input: StrictStr | list[StrictStr]
    model: StrictStr | None = None
    truncate: StrictBool | None = None


def check_served(present: bool, served: str | None, asked: str | None, what: str, flag: str) -> None:
    """404 (OpenAI's model_not_found) unless this server has that model under that name."""
    if not present:
        raise ApiError(404, f"this server has no {what} (start it with {flag})", param="model",
                       code="model_not_found")
    if asked is not None and asked != served:
        raise ApiError(404, f"the {what} '{asked}' does not exist; this server serves '{served}'", param="model",
                       code="model_not_found")


class EncoderServing:
    """Handlers for an embedding model and, optionally, a text classifier."""

    def __init__(self, batcher: EmbeddingBatcher | None, embedding_model_name: str | None,
                 classifier=None, classifier_name: str | None = None):
        self.batcher = batcher
        self.embedding_model_name = embedding_model_name
        self.classifier = classifier
        self.classifier_name = classifier_name
        self._classify_lock = threading.Lock()  # one prediction at a time: they share the model's threads

    def model_names(self) -> list[str]:
        return [n for n in (self.embedding_model_name, self.classifier_name) if n]

    def start(self) -> None:
        if self.batcher is not None:
            self.batcher.start()

    def stop(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()

    # -- /v1/embeddings --------------------------------------------------------------------------
    def _inputs(self, body: EmbeddingRequest) -> list[list[int]]:
        embedder = self.batcher.embedder
        truncate = bool(body.truncate) or body.truncate_prompt_tokens is not None
        raw = body.input
        if isinstance(raw, str):
            raw = [raw]
        if not raw:
            raise ApiError(400, "input must not be empty", param="input")
        if all(isinstance(x, str) for x in raw):
            return embedder.tokenize(raw, truncate=truncate)
        if all(isinstance(x, int) for x in raw):
            return embedder.check_ids([raw], truncate=truncate)
        return embedder.check_ids(raw, truncate=truncate)

    async def create_embedding(self, body: EmbeddingRequest, request: Request) -> JSONResponse:
        check_served(self.batcher is not None, self.embedding_model_name, body.model, "embedding model",
                     "--embedding-model FOLDER")
        if body.dimensions is not None:
            raise ApiError(400, f"dimensions is not supported: {self.embedding_model_name} returns "
                           f"{self.batcher.embedder.dimension}-dimensional embeddings only", param="dimensions")
        try:
            ids_list = self._inputs(body)
        except InvalidRequestError as exc:
            raise ApiError(400, str(exc), param="input") from None
        try:
            vectors = await until_disconnected(request, self.batcher.embed_ids(ids_list))
        except EmbedderBusyError as exc:
            raise ApiError(503, str(exc), "server_error", code="overloaded", headers={"Retry-After": "1"}) from None
        data = []
        for i, v in enumerate(vectors):
            emb: Any = base64.b64encode(v.astype("<f4").tobytes()).decode() if body.encoding_format == "base64" \
                else [float(x) for x in v]
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = sum(len(x) for x in ids_list)
        return JSONResponse({"object": "list", "data": data, "model": self.embedding_model_name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    # -- /v1/classify ----------------------------------------------------------------------------
    def _predict(self, texts: list[str], truncate: bool) -> list[dict]:
        with self._classify_lock:
            return self.classifier.predict(texts, truncate=truncate)

    async def classify(self, body: ClassifyRequest, request: Request) -> JSONResponse:
        check_served(self.classifier is not None, self.classifier_name, body.model, "classifier",
                     "--classifier FOLDER")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise ApiError(400, "input must not be empty", param="input")
        try:
            results = await until_disconnected(request, asyncio.to_thread(self._predict, texts, bool(body.truncate)))
        except InvalidRequestError as exc:
            raise ApiError(400, str(exc), param="input") from None
        labels = list(self.classifier.labels)
        data = [{"index": i, "label": r["label"], "score": r["score"],
                 "probs": [r["scores"][label] for label in labels], "num_classes": len(labels)}
                for i, r in enumerate(results)]
        return JSONResponse({"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                             "model": self.classifier_name, "labels": labels, "data": data})


def add_encoder_routes(app, encoders: EncoderServing) -> None:
    app.add_api_route("/v1/embeddings", encoders.create_embedding, methods=["POST"], response_model=None)
    app.add_api_route("/v1/classify", encoders.classify, methods=["POST"], response_model=None)
