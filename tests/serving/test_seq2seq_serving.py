"""The encoder-decoder server (serving/seq2seq_serving.py) on tiny random-weight T5 and Marian folders
(tests/model/seq2seq_reference.py): completions equal Seq2SeqLM.generate (and transformers' generate()
for greedy), requests in flight together run in one batch, streams add up to the completion, bad
input is a 4xx.

T5's folder searches greedily by default, Marian's with 4 beams (the random T5 repeats one token,
so the greedy and batching checks use Marian with num_beams 1); each app is served once per module
on loopback (ServerThread), with a Seq2SeqLM of its own (the expected outputs come from another);
queue and shutdown cases use an app whose engine thread is started by hand or never (httpx's ASGI
transport runs no lifespan), so that they do not depend on timing.
"""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import openai
import pytest
import torch

from leapllm.config import EngineConfig
from leapllm.engine.seq2seq import Seq2SeqParams
from leapllm.engine.seq2seq_lm import Seq2SeqLM
from leapllm.serving.runner import ServerThread
from leapllm.serving.seq2seq_serving import create_seq2seq_app
from tests.cli_helpers import assert_one_line_error
from tests.model.seq2seq_reference import reference, source_batch

TEXTS = ["the house is wonderful", "a cat", "we go home today and the dog runs fast"]
T5_NAME, MARIAN_NAME = "t5-tiny", "marian-tiny"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only contend
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def t5():
    hf, folder = reference("t5-small")
    return hf, folder, Seq2SeqLM(folder)


@pytest.fixture(scope="module")
def marian():
    hf, folder = reference("opus-mt-en-de")
    return hf, folder, Seq2SeqLM(folder)


@pytest.fixture(scope="module")
def t5_server(t5):
    app = create_seq2seq_app(Seq2SeqLM(t5[1]), T5_NAME)
    with ServerThread(app) as server:
        server.app = app
        yield server


@pytest.fixture(scope="module")
def marian_server(marian):
    app = create_seq2seq_app(Seq2SeqLM(marian[1]), MARIAN_NAME)
    with ServerThread(app) as server:
        server.app = app
        yield server


def post(server, body: dict, path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def completion(server, body: dict) -> dict:
    r = post(server, body)
    assert r.status_code == 200, r.text
    return r.json()


def stream_chunks(server, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    return [json.loads(e.removeprefix("data: ")) for e in events[:-1]]


def sample_value(app, name: str) -> float:
    return app.state.metrics.registry.get_sample_value(name, {"model_name": app.state.model_name}) or 0.0


# -- completions against the references -------------------------------------------------------

def test_greedy_completion_equals_generate_and_transformers(marian, marian_server):
    hf, folder, lm = marian
    body = completion(marian_server, {"model": MARIAN_NAME, "prompt": TEXTS, "max_tokens": 12, "temperature": 0,
                                      "num_beams": 1})
    expected = lm.generate(TEXTS, max_new_tokens=12, num_beams=1)
    assert body["object"] == "text_completion" and body["model"] == MARIAN_NAME
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == [o.text for o in expected]
    assert [c["finish_reason"] for c in body["choices"]] == [o.finish_reason for o in expected]
    assert body["usage"] == {"prompt_tokens": sum(len(lm.encode(t)) for t in TEXTS),
                             "completion_tokens": sum(len(o.token_ids) for o in expected),
                             "total_tokens": sum(len(lm.encode(t)) for t in TEXTS)
                             + sum(len(o.token_ids) for o in expected)}

    eos = lm.defaults.eos_token_ids
    ids, mask = source_batch(folder, TEXTS, lm.defaults.pad_token_id)
    with torch.no_grad():
        rows = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=12)
    hf_texts = []
    for row in rows.tolist():
        row = row[1:]
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        hf_texts.append(lm.tokenizer.decode(row[:cut]))
    assert [c["text"] for c in body["choices"]] == hf_texts


def test_model_default_search_is_its_beam_search(marian, marian_server):
    lm = marian[2]
    assert lm.defaults.num_beams == 4  # the folder's own: no temperature means the model's search
    body = completion(marian_server, {"prompt": TEXTS})
    expected = lm.generate(TEXTS)
    assert [c["text"] for c in body["choices"]] == [o.text for o in expected]
    assert [c["finish_reason"] for c in body["choices"]] == [o.finish_reason for o in expected]


def test_search_settings_are_passed_to_the_beam_search(marian, marian_server):
    settings = {"num_beams": 2, "length_penalty": 0.5, "early_stopping": True, "no_repeat_ngram_size": 2,
                "max_tokens": 10}
    body = completion(marian_server, {"prompt": TEXTS, **settings})
    expected = marian[2].generate(TEXTS, num_beams=2, length_penalty=0.5, early_stopping=True,
                                  no_repeat_ngram_size=2, max_new_tokens=10)
    assert [c["text"] for c in body["choices"]] == [o.text for o in expected]


def test_seeded_sampling_equals_generate_and_repeats(t5, t5_server):
    request = {"prompt": TEXTS[:2], "n": 2, "temperature": 0.8, "top_p": 0.9, "seed": 7, "max_tokens": 10}
    first, again = completion(t5_server, request), completion(t5_server, request)
    # choices are prompt_index * n + i: each prompt n times, choice i drawing with seed + i
    sources = [TEXTS[0], TEXTS[0], TEXTS[1], TEXTS[1]]
    expected = t5[2].generate(sources, Seq2SeqParams(max_new_tokens=10, do_sample=True, temperature=0.8, top_p=0.9,
                                                     seed=7))
    assert [c["text"] for c in first["choices"]] == [o.text for o in expected]
    assert first["choices"] == again["choices"]


def test_openai_client_reads_the_completion(t5, t5_server):
    client = openai.OpenAI(base_url=f"{t5_server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    out = client.completions.create(model=T5_NAME, prompt=TEXTS[0], max_tokens=8, temperature=0)
    assert out.choices[0].text == t5[2].generate(TEXTS[0], max_new_tokens=8)[0].text
    assert [m.id for m in client.models.list().data] == [T5_NAME]


# -- batching --------------------------------------------------------------------------------

def asgi_client(app) -> httpx.AsyncClient:
    """A client of the app in this event loop, without its lifespan: the engine thread starts by hand."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60)


def hold_engine(app) -> threading.Event:
    """Start the app's engine thread with its first add_request held until the event is set, so that
    the requests sent meanwhile stay in flight (and then join the engine together)."""
    engine = app.state.engine.engine
    add, gate = engine.add_request, threading.Event()

    def held_add(*args, **kwargs):
        gate.wait()
        return add(*args, **kwargs)

    engine.add_request = held_add
    app.state.engine.start()
    return gate


def test_requests_in_flight_together_run_in_one_batch_with_the_tokens_they_get_alone(marian):
    """Greedy requests and beam searches queued before the engine starts: one forward pass holds them
    all (a beam search's first step is its first beam), and each gets what it gets alone."""
    lm = marian[2]
    app = create_seq2seq_app(Seq2SeqLM(marian[1]), "t")
    engine = app.state.engine
    sizes = []
    execute = engine.engine.runner.execute

    def recording_execute(step, proposals):
        sizes.append(len(step.decodes) + len(step.prefills))
        return execute(step, proposals)

    engine.engine.runner.execute = recording_execute
    bodies = [{"prompt": t, "max_tokens": 12, "num_beams": beams} for t in TEXTS for beams in (1, 2)]

    async def run():
        async with asgi_client(app) as client:
            gate = hold_engine(app)
            tasks = [asyncio.create_task(client.post("/v1/completions", json=body)) for body in bodies]
            while engine.num_unfinished < len(bodies):
                await asyncio.sleep(0.01)
            gate.set()
            try:
                return await asyncio.gather(*tasks)
            finally:
                await engine.shutdown(5)

    responses = asyncio.run(run())
    assert sizes[0] == len(bodies)
    for body, r in zip(bodies, responses, strict=True):
        expected = lm.generate(body["prompt"], max_new_tokens=12, num_beams=body["num_beams"])[0]
        assert r.json()["choices"][0]["text"] == expected.text
    assert engine.engine.allocator.num_free == engine.engine.allocator.num_blocks


def test_a_full_queue_answers_503_and_a_client_that_leaves_is_aborted(t5):
    lm = Seq2SeqLM(t5[1], engine_config=EngineConfig(max_num_seqs=1))
    app = create_seq2seq_app(lm, "t", max_waiting=1)  # one running and one waiting at most
    engine = app.state.engine

    async def run():
        async with asgi_client(app) as client:
            gate = hold_engine(app)
            first = asyncio.create_task(client.post("/v1/completions", json={"prompt": TEXTS[0]}))
            second = asyncio.create_task(client.post("/v1/completions", json={"prompt": TEXTS[1]}))
            while engine.num_unfinished < 2:  # both in flight, neither running
                await asyncio.sleep(0.01)
            full = await client.post("/v1/completions", json={"prompt": TEXTS[2]})
            first.cancel()  # the client goes away
            await asyncio.gather(first, return_exceptions=True)
            in_flight = engine.num_unfinished
            second.cancel()
            await asyncio.gather(second, return_exceptions=True)
            gate.set()
            await engine.shutdown(5)
            return full, in_flight

    full, in_flight = asyncio.run(run())
    assert full.status_code == 503 and full.headers["retry-after"] == "1"
    assert full.json()["error"]["code"] == "overloaded"
    assert in_flight == 1  # the cancelled one left, the other stayed
    assert sample_value(app, "leapllm:request_aborted_total") == 2


def test_drain_refuses_new_requests_with_503(t5):
    app = create_seq2seq_app(Seq2SeqLM(t5[1]), "t")

    async def run():
        async with asgi_client(app) as client:
            app.state.engine.start()
            await app.state.drain()
            return await client.post("/v1/completions", json={"prompt": TEXTS[0]}), await client.get("/health")

    refused, health = asyncio.run(run())
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    assert health.status_code == 503


# -- streaming ---------------------------------------------------------------------------------

@pytest.mark.parametrize("which, settings", [
    ("marian_server", {"num_beams": 1}),  # greedy; ends on EOS
    ("t5_server", {"temperature": 0.9, "seed": 3}),  # sampling; runs to max_tokens
])
def test_streamed_tokens_add_up_to_the_completion(request, which, settings):
    server = request.getfixturevalue(which)
    body = {"prompt": TEXTS, "max_tokens": 12, **settings}
    whole = completion(server, body)
    chunks = stream_chunks(server, {**body, "stream_options": {"include_usage": True}})
    texts, reasons, pieces = ["", "", ""], [None, None, None], [0, 0, 0]
    for chunk in chunks[:-1]:
        assert chunk["object"] == "text_completion" and chunk["id"] == chunks[0]["id"]
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["text"]
        pieces[choice["index"]] += 1
        if choice["finish_reason"] is not None:
            reasons[choice["index"]] = choice["finish_reason"]
    assert texts == [c["text"] for c in whole["choices"]]
    assert reasons == [c["finish_reason"] for c in whole["choices"]]
    longest = max(range(3), key=lambda i: len(whole["choices"][i]["text"].split()))
    assert pieces[longest] > 2  # token by token, not one chunk at the end
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_beam_search_streams_each_final_text_as_one_chunk(marian_server):
    whole = completion(marian_server, {"prompt": TEXTS[:2], "max_tokens": 10})
    chunks = stream_chunks(marian_server, {"prompt": TEXTS[:2], "max_tokens": 10})
    assert [c["choices"] for c in chunks] == [[{**choice, "logprobs": None}] for choice in whole["choices"]]
    assert all("usage" not in c for c in chunks)


# -- errors and the other routes ------------------------------------------------------------------

@pytest.mark.parametrize("body, status, param", [
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": ["a cat", ""]}, 400, "prompt"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": "a cat", "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": "a cat", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "a cat", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "a cat", "max_tokens": 100000}, 400, "max_tokens"),
    ({"prompt": "a cat", "logprobs": 1}, 400, "logprobs"),
    ({"prompt": "a cat", "echo": True}, 400, "echo"),
    ({"prompt": "a cat", "suffix": "!"}, 400, "suffix"),
    ({"prompt": "a cat", "best_of": 2}, 400, "best_of"),
    ({"prompt": "a cat", "stop": ["."]}, 400, "stop"),
    ({"prompt": "a cat", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"prompt": "a cat", "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"prompt": "a cat", "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"prompt": "a cat", "n": 2}, 400, "n"),
    ({"prompt": "a cat", "temperature": 0.7, "num_beams": 2}, 400, "num_beams"),
    ({"prompt": "a cat", "num_beams": 0}, 400, "num_beams"),
    ({"prompt": "a cat", "early_stopping": "sometimes"}, 400, "early_stopping"),
    ({"prompt": "a cat", "length_penalty": "long"}, 400, "length_penalty"),
    ({"prompt": [[5, 100000]]}, 400, "prompt"),
], ids=lambda v: json.dumps(v) if isinstance(v, dict) else str(v))
def test_bad_requests_answer_openai_errors(t5_server, body, status, param):
    r = post(t5_server, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"


def test_a_source_longer_than_the_encoder_takes_is_a_400_naming_the_limit(marian, marian_server):
    limit = marian[2].source_limit
    r = post(marian_server, {"prompt": ["a cat", " ".join(["house"] * (limit + 5))]})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "prompt" and f"at most {limit}" in r.json()["error"]["message"]


def test_chat_completions_point_to_completions(t5_server):
    r = post(t5_server, {"model": T5_NAME, "messages": [{"role": "user", "content": "hi"}]}, "/v1/chat/completions")
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "encoder-decoder" in message and "/v1/completions" in message


def test_models_health_and_metrics(t5, t5_server):
    models = httpx.get(f"{t5_server.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [T5_NAME]
    assert models["data"][0]["max_model_len"] == t5[2].source_limit
    assert httpx.get(f"{t5_server.url}/v1/models/{T5_NAME}").json()["id"] == T5_NAME
    assert httpx.get(f"{t5_server.url}/v1/models/other").status_code == 404
    assert httpx.get(f"{t5_server.url}/health").json() == {"status": "ok"}
    before = sample_value(t5_server.app, "leapllm:generation_tokens_total")
    out = completion(t5_server, {"prompt": TEXTS[0], "max_tokens": 5})
    text = httpx.get(f"{t5_server.url}/metrics").text
    assert "leapllm:kv_cache_usage_perc" in text and "leapllm:request_success_total" in text
    assert sample_value(t5_server.app, "leapllm:generation_tokens_total") - before == out["usage"]["completion_tokens"]


def test_api_key_is_required_on_v1(t5):
    app = create_seq2seq_app(t5[2], "t", api_key="secret")

    async def run():
        async with asgi_client(app) as client:
            return (await client.post("/v1/completions", json={"prompt": "a"}),
                    await client.get("/v1/models", headers={"Authorization": "Bearer secret"}))

    missing, allowed = asyncio.run(run())
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert allowed.status_code == 200


# -- `leapllm serve` ---------------------------------------------------------------------------------

def test_serve_builds_the_seq2seq_app_for_an_encoder_decoder_folder(monkeypatch, capsys, t5):
    from fastapi.testclient import TestClient

    from leapllm.cli.main import main

    served = []
    monkeypatch.setattr("leapllm.serving.runner.serve", lambda app, sock, **kw: served.append((app, kw)) or True)
    assert main(["serve", "--model", str(t5[1]), "--port", "0", "--served-model-name", "tiny",
                 "--max-num-seqs", "8"]) == 0
    assert "serving tiny at http://127.0.0.1:" in capsys.readouterr().err
    (app, kwargs), = served
    assert kwargs["on_shutdown"] == app.state.drain and app.state.engine.engine.config.max_num_seqs == 8
    with TestClient(app) as client:
        body = client.post("/v1/completions", json={"model": "tiny", "prompt": TEXTS[0], "max_tokens": 6}).json()
    assert body["choices"][0]["text"] == t5[2].generate(TEXTS[0], max_new_tokens=6)[0].text


@pytest.mark.parametrize("flag", [["--tensor-parallel", "2"], ["--qa-model", "x"], ["--classifier", "x"]])
def test_serve_refuses_llm_only_flags_for_an_encoder_decoder(capsys, t5, flag):
    assert_one_line_error(capsys, ["serve", "--port", "0", "--model", str(t5[1]), *flag],
                          f"{flag[0]} is not supported with an encoder-decoder model")
