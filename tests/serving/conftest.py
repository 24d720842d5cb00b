"""One in-process server per test session, over real HTTP on loopback, sharing the session's model.

`server` is the main one (32 sequences, a modest KV pool). `guarded_server` is a second, tiny one
(an API key, one running sequence, no waiting room) for the 401 and 503 tests; both reuse the
`llm` fixture's model, so it is loaded once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from leapllm.engine.async_engine import AsyncEngine
from leapllm.config import EngineConfig
from leapllm.engine.llm_engine import LLMEngine
from leapllm.serving import create_app
from leapllm.serving.runner import ServerThread

MODEL_NAME = "smollm2-test"
API_KEY = "test-key"


@dataclass
class RunningServer:
    thread: ServerThread
    engine: AsyncEngine
    api_key: str | None = None

    @property
    def url(self) -> str:
        return self.thread.url

    def openai(self, **kwargs) -> openai.OpenAI:
        # max_retries=0: a test must see the server's first answer, not a retried one.
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "unused", max_retries=0,
                             timeout=120, **kwargs)

    def async_openai(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "unused", max_retries=0,
                                  timeout=120)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", timeout=120, **kwargs)

    def stats(self) -> dict:
        return self.engine.stats()

    def wait_idle(self, timeout: float = 120.0) -> dict:
        """The engine's stats once nothing is in flight (aborts land a step after a disconnect)."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.engine.stats()
            if s["num_in_flight"] == 0 and s["num_running"] == 0 and s["num_waiting"] == 0:
                return s
            if time.monotonic() > deadline:
                return s
            time.sleep(0.02)


def start_server(llm, config: EngineConfig, max_waiting: int, api_key: str | None = None) -> RunningServer:
    engine = AsyncEngine(LLMEngine(llm.model, llm.tokenizer, config), max_waiting=max_waiting)
    app = create_app(engine, llm.tokenizer, MODEL_NAME, llm.config.context_length, api_key=api_key)
    return RunningServer(ServerThread(app).start(), engine, api_key)


@pytest.fixture(scope="session")
def server(llm):
    running = start_server(llm, EngineConfig(max_num_seqs=32, kv_cache_gb=0.25), max_waiting=64)
    yield running
    running.thread.stop()


@pytest.fixture(scope="session")
def guarded_server(llm):
    config = EngineConfig(max_num_seqs=1, max_num_batched_tokens=64, num_blocks=64)
    running = start_server(llm, config, max_waiting=0, api_key=API_KEY)
    yield running
    running.thread.stop()


def read_metrics(url: str) -> dict[tuple, float]:
    """/metrics parsed: {(sample name, its (label, value) pairs other than model_name): value}."""
    text = httpx.get(f"{url}/metrics").text
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None):
    """The status, and OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error
