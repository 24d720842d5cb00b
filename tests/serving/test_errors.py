"""Every bad request gets the right status and OpenAI's error JSON, and disturbs no one else:
400s for malformed input, 401 without the API key, 404 for an unknown model, 503 over the
queue limit, 500 when an engine step fails."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.serving.conftest import API_KEY, MODEL_NAME, assert_openai_error

PROMPT = "The capital of France is"
USER = [{"role": "user", "content": "Hi"}]


def completion(**fields) -> dict:
    return {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 4, **fields}


def chat(**fields) -> dict:
    return {"model": MODEL_NAME, "messages": USER, "max_tokens": 4, **fields}


def test_malformed_json_is_400(server):
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = server.post(path, content=b'{"prompt": "hi", ', headers={"content-type": "application/json"})
        error = assert_openai_error(r, 400)
        assert "JSON" in error["message"]


def test_a_body_that_is_not_a_json_object_is_400(server):
    assert_openai_error(server.post("/v1/completions", json=["not", "an", "object"]), 400)
    # curl -d without -H: form-encoded; the message says what to send
    r = server.post("/v1/completions", content=b'{"prompt": "hi"}',
                    headers={"content-type": "application/x-www-form-urlencoded"})
    assert "application/json" in assert_openai_error(r, 400)["message"]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", completion(max_tokens="4"), "max_tokens"),
    ("/v1/completions", completion(temperature="hot"), "temperature"),
    ("/v1/completions", completion(stream=1), "stream"),
    ("/v1/completions", completion(prompt=5), "prompt"),
    ("/v1/completions", completion(prompt=[1, "a"]), "prompt"),
    ("/v1/completions", completion(stop=7), "stop"),
    ("/v1/completions", completion(logprobs=True), "logprobs"),
    ("/v1/completions", completion(stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
    ("/v1/chat/completions", chat(messages="hello"), "messages"),
    ("/v1/chat/completions", chat(messages=[{"content": "no role"}]), "messages.0.role"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": 42}]), "messages.0.content"),
    ("/v1/chat/completions", chat(n="2"), "n"),
])
def test_wrong_field_types_are_400_naming_the_field(server, path, body, param):
    assert_openai_error(server.post(path, json=body), 400, param=param)


def test_missing_required_fields_are_400(server):
    assert_openai_error(server.post("/v1/completions", json={"model": MODEL_NAME}), 400, param="prompt")
    assert_openai_error(server.post("/v1/chat/completions", json={"model": MODEL_NAME}), 400, param="messages")


def test_unknown_model_is_404_model_not_found(server):
    r = server.post("/v1/completions", json=completion(model="gpt-4"))
    assert_openai_error(r, 404, param="model", code="model_not_found")
    r = server.post("/v1/chat/completions", json=chat(model="gpt-4"))
    assert_openai_error(r, 404, code="model_not_found")
    assert_openai_error(httpx.get(f"{server.url}/v1/models/gpt-4"), 404, code="model_not_found")


def test_the_model_field_may_be_omitted(server):
    body = completion()
    del body["model"]
    r = server.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["model"] == MODEL_NAME


@pytest.mark.parametrize("max_tokens", [0, -1, 10**9])
def test_zero_negative_or_huge_max_tokens_is_400(server, max_tokens):
    """(Zero is allowed only to score a prompt: echo with max_tokens 0.)"""
    assert_openai_error(server.post("/v1/completions", json=completion(max_tokens=max_tokens)), 400,
                        param="max_tokens")
    assert_openai_error(server.post("/v1/chat/completions", json=chat(max_tokens=max_tokens)), 400,
                        param="max_tokens")
    body = chat(max_completion_tokens=max_tokens)
    del body["max_tokens"]
    assert_openai_error(server.post("/v1/chat/completions", json=body), 400, param="max_completion_tokens")


def test_prompt_longer_than_the_context_is_400(server, llm):
    too_long = [100] * (llm.config.context_length + 1)
    error = assert_openai_error(server.post("/v1/completions", json=completion(prompt=too_long)), 400)
    assert "context" in error["message"]
    long_text = "hello " * (llm.config.context_length + 10)
    r = server.post("/v1/chat/completions", json=chat(messages=[{"role": "user", "content": long_text}]))
    assert_openai_error(r, 400)
    del_max = chat(messages=[{"role": "user", "content": long_text}])
    del del_max["max_tokens"]
    assert_openai_error(server.post("/v1/chat/completions", json=del_max), 400)


@pytest.mark.parametrize("prompt", ["", [], [[]], [""], ["ok", ""]])
def test_empty_prompt_is_400(server, prompt):
    assert_openai_error(server.post("/v1/completions", json=completion(prompt=prompt)), 400, param="prompt")


def test_bad_conversations_are_400(server):
    assert_openai_error(server.post("/v1/chat/completions", json=chat(messages=[])), 400, param="messages")
    r = server.post("/v1/chat/completions", json=chat(messages=[{"role": "wizard", "content": "hi"}]))
    assert "wizard" in assert_openai_error(r, 400, param="messages.0.role")["message"]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    assert_openai_error(server.post("/v1/chat/completions", json=chat(messages=image)), 400,
                        param="messages.0.content")


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", completion(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("/v1/completions", completion(stop=[""]), None),
    ("/v1/completions", completion(logprobs=21), "logprobs"),
    ("/v1/completions", completion(n=0), "n"),
    ("/v1/completions", completion(temperature=-1.0), None),
    ("/v1/completions", completion(top_p=0.0), None),
    ("/v1/completions", completion(prompt=[10**7]), None),  # outside the vocabulary
    ("/v1/completions", completion(best_of=3), "best_of"),
    ("/v1/completions", completion(suffix="tail"), "suffix"),
    ("/v1/completions", completion(logit_bias={"50256": -100}), "logit_bias"),
    ("/v1/completions", completion(seed=2**63), "seed"),
    ("/v1/chat/completions", chat(top_logprobs=3), "top_logprobs"),  # without logprobs=true
    ("/v1/chat/completions", chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("/v1/chat/completions", chat(tools=[{"type": "function", "function": {"name": "no spaces"}}]), "tools"),
    ("/v1/chat/completions", chat(response_format={"type": "yaml"}), "response_format.type"),
    ("/v1/chat/completions", chat(temperature=2.5), "temperature"),  # OpenAI's range is [0, 2]
    ("/v1/completions", completion(repetition_penalty=float("inf")), "repetition_penalty"),
    ("/v1/completions", completion(top_p=float("nan")), "top_p"),
    ("/v1/chat/completions", chat(modalities=["text", "audio"]), "modalities"),
    ("/v1/chat/completions", chat(audio={"voice": "alloy", "format": "wav"}), "audio"),
    ("/v1/chat/completions", chat(reasoning_effort="high"), "reasoning_effort"),
    ("/v1/chat/completions", chat(prediction={"type": "content", "content": "x"}), "prediction"),
])
def test_out_of_range_values_are_400(server, path, body, param):
    # json.dumps writes inf and nan as Infinity and NaN, which Python's JSON parser (and so the server) reads
    r = server.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert_openai_error(r, 400, param=param)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", completion(prompt="a \ud800 b")),
    ("/v1/completions", completion(prompt=["fine", "\udfff"])),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "x\ud83d"}])),
    ("/v1/chat/completions", chat(model="\ud800")),  # would break the 404's own message
    ("/v1/chat/completions", chat(stop=["\ud800"])),
])
def test_text_that_is_not_valid_unicode_is_a_400_never_a_500(server, path, body):
    # json.dumps escapes the lone surrogate as \\udXXX, as a hostile client would send it
    r = server.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert_openai_error(r, 400)
    assert "lone surrogate" in r.json()["error"]["message"]


def test_only_text_output_is_accepted_as_modalities(server):
    assert server.post("/v1/chat/completions", json=chat(modalities=["text"])).status_code == 200


def test_unknown_paths_and_methods_get_openai_errors(server):
    assert_openai_error(httpx.get(f"{server.url}/v1/nothing"), 404)
    assert_openai_error(httpx.get(f"{server.url}/v1/completions"), 405)


def test_bad_requests_do_not_disturb_requests_in_flight(server):
    client = server.openai()
    expected = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=0)
    stream = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=0, stream=True)
    text = ""
    for i, chunk in enumerate(stream):
        text += chunk.choices[0].text
        if i == 1:  # mid-stream: a burst of bad requests
            for body in (completion(max_tokens=0), completion(prompt=""), completion(model="x"),
                         completion(prompt=[10**7]), completion(temperature=-1.0)):
                assert server.post("/v1/completions", json=body).status_code in (400, 404)
            assert server.post("/v1/completions", content=b"{", headers={"content-type": "application/json"}
                               ).status_code == 400
    assert text == expected.choices[0].text
    assert server.wait_idle()["kv_blocks_used"] == 0


# -- the API key ---------------------------------------------------------------------------------

def test_missing_or_wrong_api_key_is_401(guarded_server):
    url = guarded_server.url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"},
                    {"Authorization": "Bearer"}):
        r = httpx.post(f"{url}/v1/completions", json=completion(), headers=headers)
        assert_openai_error(r, 401, code="invalid_api_key")
        assert_openai_error(httpx.get(f"{url}/v1/models", headers=headers), 401, code="invalid_api_key")
    # checked before the body is even parsed
    assert_openai_error(httpx.post(f"{url}/v1/chat/completions", content=b"{"), 401)


def test_health_and_metrics_stay_open_with_an_api_key(guarded_server):
    assert httpx.get(f"{guarded_server.url}/health").status_code == 200
    assert httpx.get(f"{guarded_server.url}/metrics").status_code == 200


def test_the_right_api_key_is_accepted(guarded_server):
    out = guarded_server.openai().completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2, temperature=0)
    assert out.usage.completion_tokens == 2


# -- hostile sizes ---------------------------------------------------------------------------------

def test_a_body_over_max_request_bytes_is_413_declared_or_chunked(server):
    big = json.dumps(completion(prompt="x" * (9 * 2**20))).encode()
    r = server.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert_openai_error(r, 413)
    assert "--max-request-bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the server counts as it reads
        for i in range(0, len(big), 2**20):
            yield big[i:i + 2**20]

    r = server.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_openai_error(r, 413)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", completion(prompt="word " * 400_000), "prompt"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "word " * 400_000}]), "messages"),
])
def test_text_too_long_for_the_context_is_refused_before_tokenizing(server, path, body, param):
    assert_openai_error(server.post(path, json=body), 400, param=param)


def test_tokenizing_a_long_prompt_leaves_the_server_responsive(server, llm):
    """A prompt just under the length refused untokenized takes a while to tokenize (and is then too
    long): meanwhile /health must keep answering. If tokenizing held the event loop, the slowest
    /health would take about as long as the hostile request."""
    chars = llm.config.context_length * llm.tokenizer.max_token_chars - 10
    body = completion(prompt=("The quick brown fox jumps over the lazy dog. " * (chars // 45 + 1))[:chars])
    health, done = [], threading.Event()
    result = {}

    def hostile():
        start = time.perf_counter()
        result["status"] = server.post("/v1/completions", json=body).status_code
        result["seconds"] = time.perf_counter() - start
        done.set()

    thread = threading.Thread(target=hostile)
    thread.start()
    while not done.is_set():
        start = time.perf_counter()
        assert httpx.get(f"{server.url}/health", timeout=60).status_code == 200
        health.append(time.perf_counter() - start)
        time.sleep(0.01)
    thread.join()
    assert result["status"] == 400  # too long for the context, found after tokenizing
    assert len(health) >= 3 and max(health) < 0.5 * result["seconds"], (max(health), result["seconds"])


def test_interactive_docs_are_off_behind_an_api_key(server, guarded_server):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{guarded_server.url}{path}", timeout=30).status_code in (401, 404)
    assert httpx.get(f"{server.url}/openapi.json", timeout=30).status_code == 200


# -- overload and engine failures ------------------------------------------------------------------

def test_over_the_queue_limit_is_503_at_once_and_frees_everything(guarded_server):
    """One running sequence and no waiting room: a second request is refused, not queued."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    generated_before = guarded_server.stats()["generated_tokens"]
    body = completion(max_tokens=500, stream=True, ignore_eos=True)
    with httpx.stream("POST", f"{guarded_server.url}/v1/completions", json=body, headers=headers,
                      timeout=120) as running:
        assert running.status_code == 200
        lines = running.iter_lines()  # kept: dropping the iterator would close the stream
        assert next(lines).startswith("data: ")  # the long request is running
        for path, second in (("/v1/completions", completion()), ("/v1/chat/completions", chat())):
            r = httpx.post(f"{guarded_server.url}{path}", json=second, headers=headers, timeout=120)
            assert_openai_error(r, 503, code="overloaded")
            assert r.headers["retry-after"] == "1"
        r = httpx.post(f"{guarded_server.url}/v1/completions", json=completion(stream=True), headers=headers,
                       timeout=120)
        assert_openai_error(r, 503, code="overloaded")  # a refused stream is a 503 too, not a 200 stream
    stats = guarded_server.wait_idle()
    assert stats["kv_blocks_used"] == 0 and stats["num_in_flight"] == 0
    assert stats["generated_tokens"] - generated_before < 500  # closing the stream aborted the long request


def test_choices_that_can_never_fit_the_server_are_400_not_503(guarded_server, server):
    """Retrying cannot help a request larger than the server's running + waiting room: 400, with why."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(f"{guarded_server.url}/v1/completions", json=completion(n=2), headers=headers, timeout=120)
    assert_openai_error(r, 400, param="n")
    assert "at most 1 at once" in r.json()["error"]["message"]
    r = server.post("/v1/completions", json=completion(prompt=["a"] * 100, n=128))
    assert_openai_error(r, 400, param="n")
    stats = guarded_server.wait_idle()
    assert stats["kv_blocks_used"] == 0 and stats["num_in_flight"] == 0


def test_a_failed_engine_step_is_500_and_the_server_keeps_serving(server, monkeypatch):
    engine = server.engine.engine
    real_step = engine.step
    failed = threading.Event()

    def failing_step():
        if not failed.is_set():
            failed.set()
            raise RuntimeError("injected failure")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_step)
    r = server.post("/v1/completions", json=completion())
    assert_openai_error(r, 500, code="engine_error")
    monkeypatch.undo()
    assert server.post("/v1/completions", json=completion()).status_code == 200
    assert server.wait_idle()["kv_blocks_used"] == 0
