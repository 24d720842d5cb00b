"""Structured outputs over HTTP: response_format, vLLM's structured_outputs and guided_* fields,
both endpoints, streaming, n > 1, the official client's parse(), and clear 400s."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
from pydantic import BaseModel, Field

from leapllm.evaluation.json_schemas import SCHEMAS, schema_prompt


def valid(schema: dict, text: str) -> bool:
    cls = jsonschema.validators.validator_for(schema)
    cls(schema, format_checker=cls.FORMAT_CHECKER).validate(json.loads(text))
    return True


@pytest.mark.slow
def test_every_schema_through_the_openai_client_parses_and_validates(server):
    client = server.openai()

    def ask(i: int, name: str):
        return client.chat.completions.create(
            model="smollm2-test", messages=schema_prompt(name), max_tokens=160, temperature=0.8, seed=i,
            response_format={"type": "json_schema",
                             "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}})

    with ThreadPoolExecutor(len(SCHEMAS)) as pool:  # concurrent: the engine batches them
        replies = list(pool.map(ask, range(len(SCHEMAS)), SCHEMAS))
    ran_out = []
    for name, r in zip(SCHEMAS, replies):
        text = r.choices[0].message.content
        if r.choices[0].finish_reason == "length" and text[-1:].isdigit():
            ran_out.append(name)  # a sampled number that ran on: the grammar allows any number of digits
            continue
        assert r.choices[0].finish_reason == "stop", name
        assert valid(SCHEMAS[name], text)
    assert len(ran_out) <= 2, ran_out


class City(BaseModel):
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    founded: int = Field(ge=0, le=2100)


def test_the_clients_parse_returns_a_pydantic_object(server):
    r = server.openai().beta.chat.completions.parse(
        model="smollm2-test", temperature=0, max_tokens=100, response_format=City,
        messages=[{"role": "user", "content": "Describe Paris as JSON with name, country and founded (a year)."}])
    city = r.choices[0].message.parsed
    assert isinstance(city, City) and city.name


@pytest.mark.parametrize("stream", [False, True])
def test_a_schema_with_n_choices_streamed_or_not(server, stream):
    schema = SCHEMAS["person"]
    body = {"messages": schema_prompt("person"), "max_tokens": 80, "temperature": 0.7, "seed": 5, "n": 3,
            "stream": stream, "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}}
    r = server.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    if not stream:
        texts = [c["message"]["content"] for c in r.json()["choices"]]
    else:
        texts = [""] * 3
        for line in r.text.splitlines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    texts[c["index"]] += c["delta"].get("content") or ""
    assert len(texts) == 3 and all(valid(schema, t) for t in texts)
    assert len(set(texts)) > 1  # each choice is sampled on its own


def test_json_object_gives_an_object(server):
    r = server.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": 'Give a JSON object whose key "city" holds the capital of France.'}],
        "max_tokens": 60, "temperature": 0, "response_format": {"type": "json_object"}})
    assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"]), dict)


@pytest.mark.parametrize("field, value, check", [
    ("structured_outputs", {"regex": "[0-9]{4}-[0-9]{2}"}, lambda t: re.fullmatch(r"\d{4}-\d{2}", t)),
    ("structured_outputs", {"choice": ["alpha", "beta"]}, lambda t: t in ("alpha", "beta")),
    ("guided_regex", "(cat|dog)s?", lambda t: re.fullmatch(r"(cat|dog)s?", t)),
    ("guided_choice", ["left", "right"], lambda t: t in ("left", "right")),
    ("guided_grammar", 'root ::= "x" [0-9] [0-9]', lambda t: re.fullmatch(r"x\d\d", t)),
    ("guided_json", SCHEMAS["enum_color"], lambda t: valid(SCHEMAS["enum_color"], t)),
])
def test_vllm_fields_constrain_completions(server, field, value, check):
    r = server.post("/v1/completions", json={"prompt": "The answer:", "max_tokens": 40, "temperature": 0.9,
                                             "seed": 2, field: value})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and check(choice["text"]), choice


def test_streamed_completion_with_a_schema_concatenates_to_valid_json(server):
    schema = SCHEMAS["person"]
    r = server.post("/v1/completions", json={"prompt": "A person as JSON:", "max_tokens": 80, "temperature": 0,
                                             "stream": True, "guided_json": schema})
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in r.text.splitlines()
                   if line.startswith("data: {") and json.loads(line[6:])["choices"])
    assert valid(schema, text)


def test_a_schema_that_cannot_finish_in_max_tokens_ends_with_length(server):
    r = server.post("/v1/chat/completions", json={
        "messages": schema_prompt("deep_nesting"), "max_tokens": 4,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMAS["deep_nesting"]}}})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"].startswith("{")


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format", "nonsense"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "format": "made-up"}}}}, "response_format", "made-up"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "yaml"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "json_schema"),
    ({"guided_regex": "(("}, "guided_regex", "unclosed group"),
    ({"guided_grammar": "start: nowhere"}, "guided_grammar", "nowhere"),
    ({"guided_choice": []}, "guided_choice", "choice"),
    ({"structured_outputs": {"regexp": "a"}}, "structured_outputs", "regexp"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "one structured output"),
])
def test_a_bad_constraint_is_a_400_naming_the_field(server, body, param, words):
    r = server.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                                                  **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"] and err["type"] == "invalid_request_error"
