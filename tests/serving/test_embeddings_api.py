"""POST /v1/embeddings over real HTTP: OpenAI's format through the openai client, dynamic batching
of concurrent requests, and the input errors."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from leapllm.config import EngineConfig
from leapllm.encoders.embedding_batcher import EmbeddingBatcher
from leapllm.engine.async_engine import AsyncEngine
from leapllm.engine.llm_engine import LLMEngine
from leapllm.serving import create_app
from leapllm.serving.embeddings import EncoderServing
from leapllm.serving.runner import ServerThread
from tests.serving.conftest import MODEL_NAME, RunningServer, assert_openai_error

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]


@pytest.fixture(scope="module")
def embed_server(llm, embedder):
    engine = AsyncEngine(LLMEngine(llm.model, llm.tokenizer, EngineConfig(max_num_seqs=4, num_blocks=64)))
    batcher = EmbeddingBatcher(embedder)
    app = create_app(engine, llm.tokenizer, MODEL_NAME, llm.config.context_length,
                     encoders=EncoderServing(batcher, "all-minilm"))
    running = RunningServer(ServerThread(app).start(), engine)
    running.batcher = batcher
    yield running
    running.thread.stop()


def test_openai_client_embeddings_equal_the_embedder_in_order(embed_server, embedder):
    r = embed_server.openai().embeddings.create(model="all-minilm", input=SENTENCES)
    got = np.array([d.embedding for d in r.data], dtype=np.float32)
    assert [d.index for d in r.data] == [0, 1, 2]
    assert np.abs(got - embedder.embed(SENTENCES)).max() < 1e-6
    assert r.model == "all-minilm"
    assert r.usage.prompt_tokens == sum(len(x) for x in embedder.tokenize(SENTENCES)) == r.usage.total_tokens


def test_single_string_token_ids_and_base64_inputs(embed_server, embedder):
    ids = embedder.tokenize(SENTENCES[:1])[0]
    expected = embedder.embed(SENTENCES[:1])[0]
    one = embed_server.post("/v1/embeddings", json={"input": SENTENCES[0]}).json()
    by_ids = embed_server.post("/v1/embeddings", json={"input": ids}).json()
    by_id_lists = embed_server.post("/v1/embeddings", json={"input": [ids, ids]}).json()
    b64 = embed_server.post("/v1/embeddings", json={"input": SENTENCES[0], "encoding_format": "base64"}).json()
    assert np.allclose(one["data"][0]["embedding"], expected, atol=1e-6)
    assert np.allclose(by_ids["data"][0]["embedding"], expected, atol=1e-6)
    assert len(by_id_lists["data"]) == 2
    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, expected, atol=1e-6)


def test_concurrent_requests_share_batches(embed_server):
    before = embed_server.batcher.batches_run
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: embed_server.post("/v1/embeddings", json={"input": [f"sentence {i}"] * 4}),
                                range(32)))
    assert all(r.status_code == 200 and len(r.json()["data"]) == 4 for r in results)
    assert embed_server.batcher.batches_run - before < 32  # some requests were merged


def test_models_lists_the_embedding_model_too(embed_server):
    ids = [m["id"] for m in embed_server.openai().models.list().model_dump()["data"]]
    assert ids == [MODEL_NAME, "all-minilm"]


@pytest.mark.parametrize("body, param", [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": ["ok", ""]}, "input"),
    ({"input": [101, 10**7]}, "input"),
    ({"input": "hello", "dimensions": 128}, "dimensions"),
    ({"input": 12}, "input"),
    ({"input": "hello", "encoding_format": "int8"}, "encoding_format"),
    ({}, "input"),
])
def test_bad_embedding_inputs_are_openai_400s(embed_server, body, param):
    assert_openai_error(embed_server.post("/v1/embeddings", json=body), 400, param=param)


def test_over_length_input_is_refused_unless_truncation_is_asked(embed_server):
    text = "word " * 400
    assert_openai_error(embed_server.post("/v1/embeddings", json={"input": text}), 400, param="input")
    r = embed_server.post("/v1/embeddings", json={"input": text, "truncate": True})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 256


def test_unknown_embedding_model_is_404_and_classify_without_a_classifier_is_404(embed_server):
    assert_openai_error(embed_server.post("/v1/embeddings", json={"input": "x", "model": "nope"}), 404,
                        code="model_not_found")
    assert_openai_error(embed_server.post("/v1/classify", json={"input": "x"}), 404, code="model_not_found")


def test_server_without_an_embedding_model_answers_404(server):
    assert_openai_error(server.post("/v1/embeddings", json={"input": "x"}), 404)


def test_input_that_is_not_valid_unicode_is_a_400(embed_server):
    import json as json_module

    for path in ("/v1/embeddings", "/v1/classify"):
        r = embed_server.post(path, content=json_module.dumps({"input": ["ok", "\ud800"]}),
                              headers={"content-type": "application/json"})
        assert r.status_code == 400 and "lone surrogate" in r.json()["error"]["message"]
