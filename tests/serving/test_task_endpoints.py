"""POST /v1/classify with a fine-tuned head, POST /v1/qa and POST /v1/ner over real HTTP: the library's
answers, concurrent requests merged into shared forward passes, and OpenAI-style 4xx errors."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from leapllm.config import EngineConfig
from leapllm.encoders.task_heads import load_task
from leapllm.engine.async_engine import AsyncEngine
from leapllm.engine.llm_engine import LLMEngine
from leapllm.serving import create_app
from leapllm.serving import embeddings as encoder_endpoints
from leapllm.serving.embeddings import EncoderServing
from leapllm.serving.runner import ServerThread
from tests.cli_helpers import assert_one_line_error
from tests.encoders.tiny_task_models import CLASSIFY_TEXTS, CONTEXT, NER_TEXTS, QA_PAIRS, one_torch_thread, task_folder
from tests.serving.conftest import MODEL_NAME, RunningServer, assert_openai_error


@pytest.fixture(scope="module")
def heads():
    with one_torch_thread():
        yield {"classify": load_task(task_folder("roberta", "text-classification")[0]),
               "qa": load_task(task_folder("bert", "question-answering")[0]),
               "ner": load_task(task_folder("xlm-roberta", "token-classification")[0])}


@pytest.fixture(scope="module")
def task_server(llm, heads):
    engine = AsyncEngine(LLMEngine(llm.model, llm.tokenizer, EngineConfig(max_num_seqs=4, num_blocks=64)))
    encoders = EncoderServing(None, None, heads["classify"], heads["classify"].name, heads["qa"], heads["ner"])
    app = create_app(engine, llm.tokenizer, MODEL_NAME, llm.config.context_length, encoders=encoders)
    running = RunningServer(ServerThread(app).start(), engine)
    running.encoders = encoders
    yield running
    running.thread.stop()


def test_classify_serves_a_fine_tuned_head_as_the_library_scores_it(task_server, heads):
    r = task_server.post("/v1/classify", json={"input": CLASSIFY_TEXTS[:4]}).json()
    expected = heads["classify"].predict(CLASSIFY_TEXTS[:4])
    assert r["labels"] == ["negative", "neutral", "positive"] and r["model"] == heads["classify"].name
    for row, exp in zip(r["data"], expected, strict=True):
        assert row["label"] == exp["label"] and abs(row["score"] - exp["score"]) < 1e-6
        assert row["probs"] == pytest.approx([exp["scores"][label] for label in r["labels"]], abs=1e-6)


def test_qa_answers_as_the_library(task_server, heads):
    questions, contexts = [q for q, _ in QA_PAIRS[:5]], [c for _, c in QA_PAIRS[:5]]
    r = task_server.post("/v1/qa", json={"question": questions, "context": contexts, "top_k": 2}).json()
    expected = heads["qa"].answer(questions, contexts, top_k=2)
    assert [d["question"] for d in r["data"]] == questions
    for row, answers in zip(r["data"], expected, strict=True):
        assert [(a["answer"], a["start"], a["end"]) for a in row["answers"]] == \
            [(a["answer"], a["start"], a["end"]) for a in answers]
        assert [a["score"] for a in row["answers"]] == pytest.approx([a["score"] for a in answers], abs=1e-6)
    assert r["usage"]["forward_inputs"] > 5  # the long context's windows
    one = task_server.post("/v1/qa", json={"question": "Who was her husband?", "context": CONTEXT}).json()
    assert one["data"][0]["answers"] == heads["qa"].answer(["Who was her husband?"], [CONTEXT])[0]


def test_ner_gives_the_library_entities(task_server, heads):
    r = task_server.post("/v1/ner", json={"input": NER_TEXTS[:4], "aggregation_strategy": "average"}).json()
    expected = heads["ner"](NER_TEXTS[:4], aggregation_strategy="average")
    assert len(r["data"]) == 4
    for row, entities in zip(r["data"], expected, strict=True):
        assert [{k: v for k, v in e.items() if k != "score"} for e in row["entities"]] == \
            [{k: v for k, v in e.items() if k != "score"} for e in entities]


def test_concurrent_task_requests_share_forward_passes(task_server):
    batcher = task_server.encoders.task_batchers["ner"]
    before = batcher.batches_run
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: task_server.post("/v1/ner", json={"input": [f"Paris {i}", "Berlin"]}),
                                range(32)))
    assert all(r.status_code == 200 and len(r.json()["data"]) == 2 for r in results)
    assert batcher.batches_run - before < 32  # some requests were merged


def test_models_lists_the_task_heads(task_server, heads):
    ids = [m["id"] for m in task_server.openai().models.list().model_dump()["data"]]
    assert ids == [MODEL_NAME, heads["classify"].name, heads["qa"].name, heads["ner"].name]


@pytest.mark.parametrize("path, body, status", [
    ("/v1/qa", {"question": "Where?", "context": ""}, 400),
    ("/v1/qa", {"question": ["a?", "b?"], "context": ["x", "y", "z"]}, 400),
    ("/v1/qa", {"question": "Where?", "context": CONTEXT, "doc_stride": 500}, 400),
    ("/v1/qa", {"question": "Where?", "context": CONTEXT, "top_k": "3"}, 400),
    ("/v1/qa", {"question": "Where?"}, 400),
    ("/v1/qa", {"question": "Where?", "context": "x", "model": "nope"}, 404),
    ("/v1/ner", {"input": []}, 400),
    ("/v1/ner", {"input": "Paris", "aggregation_strategy": "mean"}, 400),
    ("/v1/ner", {"input": "Paris", "aggregation_strategy": "none", "stride": 4}, 400),
    ("/v1/ner", {"input": "Paris", "model": "nope"}, 404),
    ("/v1/classify", {"input": ["ok", " "]}, 400),
    ("/v1/classify", {"input": CONTEXT}, 400),  # longer than the model, and no "truncate": true
])
def test_bad_task_requests_are_openai_errors(task_server, path, body, status):
    assert_openai_error(task_server.post(path, json=body), status)


def test_a_request_needing_too_many_windows_is_a_413(task_server, monkeypatch):
    monkeypatch.setattr(encoder_endpoints, "MAX_WINDOWS_PER_REQUEST", 3)
    r = task_server.post("/v1/qa", json={"question": "Where?", "context": CONTEXT})
    assert_openai_error(r, 413, code="request_too_large")


def test_server_without_task_heads_answers_404(server):
    assert_openai_error(server.post("/v1/qa", json={"question": "a?", "context": "b"}), 404)
    assert_openai_error(server.post("/v1/ner", json={"input": "b"}), 404)


def test_serve_refuses_a_folder_of_the_wrong_task_before_loading(capsys):
    folder = task_folder("bert", "token-classification")[0]
    assert_one_line_error(capsys, ["serve", "--port", "0", "--qa-model", str(folder)],
                          "not a question-answering model folder")
