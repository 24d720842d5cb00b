"""The encoder endpoints: POST /v1/embeddings (OpenAI format), POST /v1/classify (vLLM's format), and
the fine-tuned task heads' POST /v1/qa and POST /v1/ner.

    leapllm serve --embedding-model default --classifier ./my-classifier --qa-model ./squad --ner-model ./conll

Embeddings accept `input` as a string, a list of strings, a list of token ids or a list of such
lists, `encoding_format` float or base64; `dimensions` (shortened embeddings) is not supported by
these models and is refused with a 400. Concurrent requests are merged into shared, length-bucketed
batches by the EmbeddingBatcher. Texts longer than the encoder takes are an error unless the
request says `"truncate": true` (vLLM's `truncate_prompt_tokens` works the same way).

/v1/classify serves a classifier trained by `leapllm classify train` or a fine-tuned
*ForSequenceClassification folder (scores as transformers' text-classification pipeline gives them).
/v1/qa answers `question` from `context` (strings, or lists of them; one context may serve many
questions) as the question-answering pipeline does, with its top_k, doc_stride, max_seq_len,
max_answer_len and handle_impossible_answer; /v1/ner gives each `input` text's entities as the
token-classification pipeline does, with aggregation_strategy (default simple), stride and
ignore_labels. The task heads' inputs (texts, or the windows of long contexts) from concurrent
requests share forward passes too; a request needing more than MAX_WINDOWS_PER_REQUEST forward
inputs gets a 413.
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

from leapllm.encoders.embedding_batcher import EmbedderBusyError, EmbeddingBatcher, MergingBatcher
from leapllm.encoders.question_answering import check_answer_settings
from leapllm.encoders.task_runner import TaskRunner
from leapllm.errors import InvalidRequestError
from leapllm.serving.disconnect import until_disconnected
from leapllm.serving.errors import ApiError
from leapllm.serving.protocol import UnicodeText

Input = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
MAX_WINDOWS_PER_REQUEST = 1024  # forward inputs (texts, windows of long contexts) one task request may need


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


class QARequest(UnicodeText):
    model_config = ConfigDict(extra="ignore")
    question: StrictStr | list[StrictStr]
    context: StrictStr | list[StrictStr]
    model: StrictStr | None = None
    top_k: StrictInt = 1
    doc_stride: StrictInt | None = None
    max_seq_len: StrictInt | None = None
    max_answer_len: StrictInt = 15
    handle_impossible_answer: StrictBool = False
    align_to_words: StrictBool = True


class NERRequest(UnicodeText):
    model_config = ConfigDict(extra="ignore")
    input: StrictStr | list[StrictStr]
    model: StrictStr | None = None
    aggregation_strategy: Literal["none", "simple", "first", "average", "max"] = "simple"
    stride: StrictInt | None = None
    ignore_labels: list[StrictStr] | None = None


def check_served(present: bool, served: str | None, asked: str | None, what: str, flag: str) -> None:
    """404 (OpenAI's model_not_found) unless this server has that model under that name."""
    if not present:
        raise ApiError(404, f"this server has no {what} (start it with {flag})", param="model",
                       code="model_not_found")
    if asked is not None and asked != served:
        raise ApiError(404, f"the {what} '{asked}' does not exist; this server serves '{served}'", param="model",
                       code="model_not_found")


class EncoderServing:
    """Handlers for an embedding model and, optionally, a text classifier (leapllm-trained or a
    fine-tuned head), an extractive QA model and a token-classification (NER) model."""

    def __init__(self, batcher: EmbeddingBatcher | None, embedding_model_name: str | None,
                 classifier=None, classifier_name: str | None = None, qa=None, ner=None):
        self.batcher = batcher
        self.embedding_model_name = embedding_model_name
        self.classifier = classifier
        self.classifier_name = classifier_name
        self.qa, self.ner = qa, ner
        self._classify_lock = threading.Lock()  # one prediction at a time: they share the model's threads
        # The fine-tuned heads' forward passes, merged across concurrent requests.
        self.task_batchers: dict[str, MergingBatcher] = {}
        for key, runner in (("classify", classifier), ("qa", qa), ("ner", ner)):
            if isinstance(runner, TaskRunner):
                self.task_batchers[key] = MergingBatcher(runner.forward, name=f"leapllm-{key}", what="inputs")

    def model_names(self) -> list[str]:
        names = [self.embedding_model_name, self.classifier_name]
        names += [runner.name for runner in (self.qa, self.ner) if runner is not None]
        return [n for n in names if n]

    def start(self) -> None:
        if self.batcher is not None:
            self.batcher.start()
        for batcher in self.task_batchers.values():
            batcher.start()

    def stop(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()
        for batcher in self.task_batchers.values():
            batcher.stop()

    async def _run_features(self, key: str, features: list, request: Request) -> list:
        """The task head's outputs of these features, batched with other requests'."""
        if len(features) > MAX_WINDOWS_PER_REQUEST:
            raise ApiError(413, f"the request needs {len(features)} forward passes' inputs (texts or windows of "
                           f"long texts); the server takes at most {MAX_WINDOWS_PER_REQUEST} per request",
                           code="request_too_large")
        try:
            return await until_disconnected(request, self.task_batchers[key].submit(features))
        except EmbedderBusyError as exc:
            raise ApiError(503, str(exc), "server_error", code="overloaded", headers={"Retry-After": "1"}) from None

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
            if "classify" in self.task_batchers:  # a fine-tuned head: batched with other requests
                features = self.classifier.features(texts, truncate=bool(body.truncate))
                outputs = await self._run_features("classify", features, request)
                results = self.classifier.as_predictions(self.classifier.scores(outputs))
            else:
                results = await until_disconnected(request, asyncio.to_thread(self._predict, texts,
                                                                              bool(body.truncate)))
        except InvalidRequestError as exc:
            raise ApiError(400, str(exc), param="input") from None
        labels = list(self.classifier.labels)
        data = [{"index": i, "label": r["label"], "score": r["score"],
                 "probs": [r["scores"][label] for label in labels], "num_classes": len(labels)}
                for i, r in enumerate(results)]
        return JSONResponse({"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                             "model": self.classifier_name, "labels": labels, "data": data})

    # -- /v1/qa ----------------------------------------------------------------------------------
    async def answer(self, body: QARequest, request: Request) -> JSONResponse:
        check_served(self.qa is not None, self.qa.name if self.qa else None, body.model,
                     "question-answering model", "--qa-model FOLDER")
        questions = [body.question] if isinstance(body.question, str) else body.question
        contexts = [body.context] if isinstance(body.context, str) else body.context
        try:
            check_answer_settings(body.top_k, body.max_answer_len)
            job = self.qa.prepare(questions, contexts, body.doc_stride, body.max_seq_len)
        except InvalidRequestError as exc:
            raise ApiError(400, str(exc)) from None
        outputs = await self._run_features("qa", job.features, request)
        answers = self.qa.decode(job, outputs, body.top_k, body.max_answer_len, body.handle_impossible_answer,
                                 body.align_to_words)
        data = [{"index": i, "question": q, "answers": a}
                for i, (q, a) in enumerate(zip(questions, answers, strict=True))]
        return JSONResponse({"id": f"qa-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                             "model": self.qa.name, "data": data, "usage": _usage(job.features)})

    # -- /v1/ner ---------------------------------------------------------------------------------
    async def recognize(self, body: NERRequest, request: Request) -> JSONResponse:
        check_served(self.ner is not None, self.ner.name if self.ner else None, body.model,
                     "token-classification model", "--ner-model FOLDER")
        texts = [body.input] if isinstance(body.input, str) else body.input
        try:
            job = self.ner.prepare(texts, body.stride, body.aggregation_strategy)
        except InvalidRequestError as exc:
            raise ApiError(400, str(exc)) from None
        outputs = await self._run_features("ner", job.features, request)
        entities = self.ner.decode(job, outputs, body.aggregation_strategy, body.ignore_labels)
        data = [{"index": i, "entities": e} for i, e in enumerate(entities)]
        return JSONResponse({"id": f"ner-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                             "model": self.ner.name, "data": data, "usage": _usage(job.features)})


def _usage(features: list) -> dict:
    tokens = sum(len(f.ids) for f in features)
    return {"prompt_tokens": tokens, "total_tokens": tokens, "forward_inputs": len(features)}


def add_encoder_routes(app, encoders: EncoderServing) -> None:
    app.add_api_route("/v1/embeddings", encoders.create_embedding, methods=["POST"], response_model=None)
    app.add_api_route("/v1/classify", encoders.classify, methods=["POST"], response_model=None)
    app.add_api_route("/v1/qa", encoders.answer, methods=["POST"], response_model=None)
    app.add_api_route("/v1/ner", encoders.recognize, methods=["POST"], response_model=None)
