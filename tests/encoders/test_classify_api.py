"""POST /v1/classify over real HTTP with a classifier trained on the real sentiment set."""

from __future__ import annotations

import httpx
import pytest

from leapllm.encoders.classifier import TextClassifier
from leapllm.engine.async_engine import AsyncEngine
from leapllm.config import EngineConfig
from leapllm.engine.llm_engine import LLMEngine
from leapllm.serving import create_app
from leapllm.serving.embeddings import EncoderServing
from leapllm.serving.runner import ServerThread
from tests.serving.conftest import MODEL_NAME, assert_openai_error

TEXTS = ["Thanks for the great flight, the crew was lovely!", "My bag is lost and nobody answers the phone.",
         "Flight 123 departs at 9am."]


@pytest.fixture(scope="module")
def classify_url(llm, trained_classifier):
    _, folder = trained_classifier
    classifier = TextClassifier.load(folder)
    engine = AsyncEngine(LLMEngine(llm.model, llm.tokenizer, EngineConfig(max_num_seqs=2, num_blocks=16)))
    app = create_app(engine, llm.tokenizer, MODEL_NAME, llm.config.context_length,
                     encoders=EncoderServing(None, None, classifier, "sentiment"))
    thread = ServerThread(app).start()
    yield thread.url, classifier
    thread.stop()


def test_classify_returns_the_classifiers_labels_and_probabilities(classify_url):
    url, classifier = classify_url
    body = httpx.post(f"{url}/v1/classify", json={"model": "sentiment", "input": TEXTS}, timeout=60).json()
    expected = classifier.predict(TEXTS)
    assert body["labels"] == classifier.labels and body["model"] == "sentiment"
    for item, exp in zip(body["data"], expected):
        assert item["label"] == exp["label"] and item["num_classes"] == len(classifier.labels)
        assert item["probs"] == pytest.approx([exp["scores"][label] for label in classifier.labels], abs=1e-6)
        assert sum(item["probs"]) == pytest.approx(1.0, abs=1e-5)
    assert [d["index"] for d in body["data"]] == [0, 1, 2]


def test_classify_accepts_a_single_string(classify_url):
    url, _ = classify_url
    body = httpx.post(f"{url}/v1/classify", json={"input": TEXTS[0]}, timeout=60).json()
    assert len(body["data"]) == 1


@pytest.mark.parametrize("body, status", [({"input": ""}, 400), ({"input": []}, 400), ({"input": ["ok", ""]}, 400),
                                          ({"input": 3}, 400), ({"input": "x", "model": "other"}, 404),
                                          ({"input": "word " * 400}, 400)])
def test_bad_classify_inputs_are_openai_errors(classify_url, body, status):
    url, _ = classify_url
    assert_openai_error(httpx.post(f"{url}/v1/classify", json=body, timeout=60), status)


def test_server_with_a_classifier_only_has_no_embeddings(classify_url):
    url, _ = classify_url
    assert_openai_error(httpx.post(f"{url}/v1/embeddings", json={"input": "x"}, timeout=60), 404)
