"""The OpenAI API through the official `openai` client: completions and chat, streamed and not,
logprobs, echo, n, stop, seeds, models and metrics."""

from __future__ import annotations

import json
import math

import httpx

from leapllm.engine.sampling import SamplingParams
from tests.serving.conftest import MODEL_NAME, read_metrics

PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def stream_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks


def test_completion_greedy_matches_the_python_api_token_for_token(server, llm):
    prompts = [PROMPT, "def fibonacci(n):"]
    expected = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16))
    client = server.openai()
    for prompt, ref in zip(prompts, expected):
        out = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0)
        assert out.choices[0].text == ref.text
        assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert out.usage.completion_tokens == len(ref.token_ids)


def test_completion_stream_equals_non_stream_and_reports_usage_last(server, llm):
    client = server.openai()
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    assert full.object == "text_completion" and full.id.startswith("cmpl-") and full.model == MODEL_NAME
    assert full.choices[0].finish_reason == "length"
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (len(llm.tokenizer.encode(PROMPT)), 12)
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12

    text, chunks = stream_text(client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert text == full.choices[0].text
    assert "Paris" in text
    assert len({c.id for c in chunks}) == 1
    *body, last = chunks
    assert last.choices == [] and last.usage.model_dump() == full.usage.model_dump()
    assert body[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert all(c.usage is None for c in body)


def test_chat_answers_paris_and_stream_equals_non_stream(server):
    client = server.openai()
    full = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=16)
    answer = full.choices[0].message.content
    assert "Paris" in answer
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, temperature=0,
                                                 max_tokens=16, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    first, *middle, finish, usage = chunks
    assert first.choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == answer
    assert finish.choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in [first, *middle])
    assert usage.choices == [] and usage.usage.model_dump() == full.usage.model_dump()


def test_chat_without_max_tokens_generates_until_the_model_stops(server):
    out = server.openai().chat.completions.create(model=MODEL_NAME, messages=QUESTION, temperature=0)
    assert out.choices[0].finish_reason == "stop" and "Paris" in out.choices[0].message.content


def test_chat_accepts_text_parts_developer_role_and_max_completion_tokens(server):
    messages = [{"role": "developer", "content": "You are a geography assistant."},
                {"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                             {"type": "text", "text": "of France?"}]}]
    out = server.openai().chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0,
                                                  max_completion_tokens=5)
    assert out.usage.completion_tokens <= 5 and out.choices[0].message.content


def test_completion_prompts_as_token_ids_and_lists_give_one_choice_per_prompt(server, llm):
    ids = llm.tokenizer.encode(PROMPT)
    client = server.openai()
    by_text = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0)
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text

    several = client.completions.create(model=MODEL_NAME, prompt=[PROMPT, "Once upon a time"], max_tokens=6,
                                        temperature=0)
    assert [c.index for c in several.choices] == [0, 1]
    assert several.choices[0].text == by_text.choices[0].text
    assert several.usage.prompt_tokens == len(ids) + len(llm.tokenizer.encode("Once upon a time"))
    batch_of_ids = client.completions.create(model=MODEL_NAME, prompt=[ids, ids], max_tokens=6, temperature=0)
    assert [c.text for c in batch_of_ids.choices] == [by_text.choices[0].text] * 2


def test_completion_logprobs_have_openai_shape_and_greedy_token_is_the_top_one(server):
    out = server.openai().completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0,
                                             logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0.0
        assert 3 <= len(top) <= 4  # the top 3, plus the chosen token when it is not among them
        assert max(top, key=top.get) == token  # greedy picks the most likely token
        assert math.isclose(top[token], logprob, abs_tol=1e-5)


def test_completion_echo_prepends_the_prompt_with_its_logprobs(server, llm):
    client = server.openai()
    plain = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0)
    echoed = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text

    with_lp = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0, echo=True,
                                        logprobs=2)
    lp = with_lp.choices[0].logprobs
    n_prompt = len(llm.tokenizer.encode(PROMPT))
    assert len(lp.tokens) == n_prompt + 4
    assert "".join(lp.tokens) == with_lp.choices[0].text == echoed.choices[0].text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the first token has no context
    assert all(v <= 0.0 for v in lp.token_logprobs[1:])
    assert lp.text_offset[n_prompt] == len(PROMPT)

    streamed = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0, echo=True,
                                         logprobs=2, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == echoed.choices[0].text
    assert [v for c in chunks for v in c.choices[0].logprobs.token_logprobs] == lp.token_logprobs


def test_echo_with_max_tokens_0_scores_the_prompt_without_generating(server, llm):
    """What lm-eval-harness sends to compute a prompt's loglikelihood."""
    client = server.openai()
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1,
                                    temperature=0)
    choice = out.choices[0]
    n_prompt = len(llm.tokenizer.encode(PROMPT))
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == n_prompt and choice.logprobs.token_logprobs[0] is None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (n_prompt, 0)
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2, echo=True, logprobs=1,
                                     temperature=0)
    assert full.choices[0].logprobs.token_logprobs[:n_prompt] == choice.logprobs.token_logprobs


def test_chat_logprobs_have_openai_shape(server):
    client = server.openai()
    out = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=5,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert "".join(e.token for e in content) == out.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0.0
        assert bytes(entry.bytes).decode("utf-8") == entry.token
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)

    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=5,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]

    no_lp = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=2)
    assert no_lp.choices[0].logprobs is None


def test_n_choices_with_a_seed_differ_and_are_reproducible(server):
    client = server.openai()

    def sample():
        return client.completions.create(model=MODEL_NAME, prompt="My favourite colour is", max_tokens=10,
                                         temperature=1.0, n=2, seed=1234)

    first, again = sample(), sample()
    assert [c.index for c in first.choices] == [0, 1]
    assert first.choices[0].text != first.choices[1].text  # seed + i for choice i
    assert [c.text for c in again.choices] == [c.text for c in first.choices]
    assert 2 <= first.usage.completion_tokens <= 20

    chat = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=8, temperature=1.0, n=2,
                                          seed=7, stream=True)
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in chat:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1}


def test_same_seed_gives_the_same_text_at_temperature_0_9(server):
    client = server.openai()
    texts = [client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=12, temperature=0.9,
                                       seed=42).choices[0].text for _ in range(2)]
    other = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=12, temperature=0.9,
                                      seed=43).choices[0].text
    assert texts[0] == texts[1]
    assert other != texts[0]


def test_stop_strings_end_the_text_before_the_stop_string(server):
    client = server.openai()
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    assert "." in full
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0, stop=["."])
    assert out.choices[0].text == full[:full.index(".")]
    assert out.choices[0].finish_reason == "stop"
    streamed, _ = stream_text(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12,
                                                        temperature=0, stop=".", stream=True))
    assert streamed == out.choices[0].text

    chat = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=16,
                                          stop=["Paris"])
    assert "Paris" not in chat.choices[0].message.content and chat.choices[0].finish_reason == "stop"


def test_vllm_extra_sampling_fields_are_honoured(server, llm):
    client = server.openai()
    greedy = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    # top_k=1 samples the most likely token: the greedy text, whatever the temperature.
    top1 = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=1.5,
                                     extra_body={"top_k": 1, "min_p": 0.0, "repetition_penalty": 1.0})
    assert top1.choices[0].text == greedy
    # ignore_eos keeps going past the chat end token; stop_token_ids ends at a chosen token.
    long = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=40,
                                          extra_body={"ignore_eos": True})
    assert long.usage.completion_tokens == 40 and long.choices[0].finish_reason == "length"
    stop_id = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=1))[0].token_ids[0]
    stopped = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                        extra_body={"stop_token_ids": [stop_id]})
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 1


def test_models_lists_the_served_model(server):
    models = server.openai().models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert server.openai().models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_health_is_ok(server):
    r = httpx.get(f"{server.url}/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_metrics_expose_engine_state_tokens_latencies_and_finish_reasons(server, llm):
    server.openai().completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, temperature=0)
    before = read_metrics(server.url)
    server.openai().completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, temperature=0)
    after = read_metrics(server.url)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before[key]

    for name in ("leapllm:num_requests_running", "leapllm:num_requests_waiting", "leapllm:kv_cache_blocks_used",
                 "leapllm:kv_cache_usage_perc", "leapllm:request_aborted_total"):
        assert (name, ()) in after, name
    assert after[("leapllm:kv_cache_blocks_total", ())] == server.stats()["kv_blocks_total"]
    assert delta("leapllm:generation_tokens_total") == 3
    assert delta("leapllm:prompt_tokens_total") == len(llm.tokenizer.encode(PROMPT))
    assert delta("leapllm:request_success_total", finished_reason="length") == 1
    assert delta("leapllm:request_success_total", finished_reason="stop") == 0
    for histogram in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert delta(f"leapllm:{histogram}_count") == 1
        assert delta(f"leapllm:{histogram}_bucket", le="+Inf") == 1


def test_raw_sse_format_is_data_lines_ending_in_done(server):
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        chunk = json.loads(event[len("data: "):])
        assert chunk["object"] == "text_completion" and chunk["model"] == MODEL_NAME
        assert set(chunk["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}
