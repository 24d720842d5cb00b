"""Structured outputs on the default model: every constraint holds, in batches, greedy and sampled."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from leapllm.engine.sampling import SamplingParams
from leapllm.engine.structured_output import StructuredOutputParams
from leapllm.errors import InvalidRequestError
from leapllm.evaluation.json_schemas import SCHEMAS, schema_prompt


def run_batch(llm, requests: list[tuple[list[int], SamplingParams]]) -> list:
    """Run requests together through the continuous-batching engine; their final texts and finish reasons."""
    engine = llm.engine
    texts, finish = {}, {}
    for i, (ids, params) in enumerate(requests):
        engine.add_request(f"so-{i}", ids, params)
        texts[f"so-{i}"] = []
    while len(finish) < len(requests):
        for out in engine.step():
            texts[out.request_id].append(out.new_text)
            if out.finished:
                finish[out.request_id] = out.finish_reason
    return [("".join(texts[f"so-{i}"]), finish[f"so-{i}"]) for i in range(len(requests))]


def validator(schema: dict) -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def test_the_schema_suite_is_large_and_every_schema_is_valid():
    assert len(SCHEMAS) >= 20
    for schema in SCHEMAS.values():
        jsonschema.validators.validator_for(schema).check_schema(schema)


@pytest.mark.slow
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_every_schema_gives_json_that_parses_and_validates(llm, sampled):
    requests = []
    for i, name in enumerate(SCHEMAS):
        params = SamplingParams(max_tokens=160, temperature=0.9 if sampled else 0.0, seed=i,
                                structured_output=StructuredOutputParams(json=SCHEMAS[name]))
        requests.append((llm.encode_chat(schema_prompt(name)), params))
    ran_out = []
    for name, (text, reason) in zip(SCHEMAS, run_batch(llm, requests)):
        if sampled and reason == "length" and re.search(r"[0-9]$", text):
            # A sampled number can run on (the grammar allows any number of digits, and a small model
            # at temperature 0.9 repeats itself): a few such outputs in a batch, no other failure.
            ran_out.append(name)
            continue
        assert reason == "stop", (name, text)
        validator(SCHEMAS[name]).validate(json.loads(text))
    assert len(ran_out) <= 2, ran_out


def test_regex_choice_grammar_and_json_object_constraints_hold(llm):
    chat = llm.encode_chat([{"role": "user", "content": 'Give a JSON object whose key "city" holds the capital of France.'}])
    cases = [
        (StructuredOutputParams(regex=r"[0-9]{3}-[a-z]{2,5}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", t)),
        (StructuredOutputParams(choice=["yes", "no", "maybe"]), lambda t: t in ("yes", "no", "maybe")),
        (StructuredOutputParams(grammar='start: "hello " NAME "!"\nNAME: /[A-Z][a-z]{1,8}/'),
         lambda t: re.fullmatch(r"hello [A-Z][a-z]{1,8}!", t)),
        # llama.cpp's GBNF is accepted too
        (StructuredOutputParams(grammar='root ::= ("up" | "down") " " [0-9]'), lambda t: re.fullmatch(r"(up|down) \d", t)),
        (StructuredOutputParams(json_object=True), lambda t: isinstance(json.loads(t), dict)),
    ]
    requests = [(chat, SamplingParams(max_tokens=120, temperature=t, seed=3, structured_output=so))
                for so, _ in cases for t in (0.0, 0.7)]
    results = run_batch(llm, requests)
    for (so, check), outs in zip(cases, zip(results[::2], results[1::2])):
        for text, reason in outs:
            assert reason == "stop" and check(text), (so.kind, text)


def test_unconstrained_requests_in_a_constrained_batch_are_unchanged(llm):
    prompt = llm.encode("The capital of France is")
    plain = SamplingParams(max_tokens=24, temperature=0.0)
    alone = run_batch(llm, [(prompt, plain)])[0]
    so = StructuredOutputParams(json=SCHEMAS["person"])
    mixed = run_batch(llm, [(prompt, SamplingParams(max_tokens=24, temperature=0.0, structured_output=so)),
                            (prompt, plain)])
    assert mixed[1] == alone
    assert mixed[0][0] != alone[0]


def test_the_single_sequence_path_honours_the_constraint_too(llm):
    so = StructuredOutputParams(json=SCHEMAS["sentiment"])
    out = llm.chat(schema_prompt("sentiment"), SamplingParams(max_tokens=80, temperature=0.0, structured_output=so))
    validator(SCHEMAS["sentiment"]).validate(json.loads(out.text))


def test_a_schema_longer_than_max_tokens_ends_with_length_and_the_partial_text(llm):
    so = StructuredOutputParams(json=SCHEMAS["deep_nesting"])
    ids = llm.encode_chat(schema_prompt("deep_nesting"))
    text, reason = run_batch(llm, [(ids, SamplingParams(max_tokens=5, temperature=0.0, structured_output=so))])[0]
    assert reason == "length" and text.startswith("{")


def test_a_compiled_constraint_is_reused_from_the_cache(llm):
    grammars = llm.engine.grammars
    so = StructuredOutputParams(json={"type": "object", "properties": {"cache_probe": {"type": "integer"}}})
    grammars.matcher(so)
    compiled, hits = grammars.num_compiled, grammars.num_cache_hits
    grammars.matcher(StructuredOutputParams(json={"type": "object", "properties": {"cache_probe": {"type": "integer"}}}))
    assert (grammars.num_compiled, grammars.num_cache_hits) == (compiled, hits + 1)


def test_properties_come_out_in_the_order_the_schema_lists_them(llm):
    schema = {"type": "object", "properties": {"zeta": {"type": "integer"}, "alpha": {"type": "integer"}},
              "required": ["zeta", "alpha"], "additionalProperties": False}
    out = llm.chat([{"role": "user", "content": "Two numbers as JSON."}],
                   SamplingParams(max_tokens=40, temperature=0.0, structured_output=StructuredOutputParams(json=schema)))
    assert list(json.loads(out.text)) == ["zeta", "alpha"]


@pytest.mark.parametrize("so, words", [
    (dict(json={"type": "nonsense"}), "nonsense"),
    (dict(json={"type": "string", "format": "no-such-format"}), "no-such-format"),
    (dict(json="{not json"), "json"),
    (dict(regex="(("), "unclosed group"),
    (dict(grammar="start: undefined_rule"), "undefined_rule"),
    (dict(grammar="root ::= (("), "grammar"),
])
def test_a_bad_constraint_is_refused_with_a_one_line_error_naming_it(llm, so, words):
    with pytest.raises(InvalidRequestError) as err:
        llm.engine.check_request(llm.encode("Hi"), SamplingParams(structured_output=StructuredOutputParams(**so)))
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("fields", [dict(), dict(regex="a", choice=["a"]), dict(choice=[]), dict(choice="ab"),
                                    dict(json=5)])
def test_structured_output_params_take_exactly_one_well_formed_constraint(fields):
    with pytest.raises(InvalidRequestError):
        StructuredOutputParams(**fields)


def test_llm_chat_with_a_pydantic_response_format_returns_a_parsed_instance(llm):
    from pydantic import BaseModel, Field

    class Answer(BaseModel):
        city: str = Field(max_length=30)
        country: str = Field(max_length=30)

    out = llm.chat([{"role": "user", "content": "Which city is the capital of France? Answer as JSON."}],
                   SamplingParams(max_tokens=60, temperature=0.0), response_format=Answer)
    assert isinstance(out.parsed, Answer) and out.parsed.city
    as_dict = llm.chat([{"role": "user", "content": "Capital of France, as JSON."}], SamplingParams(max_tokens=150, seed=0),
                       response_format=Answer.model_json_schema())
    assert set(as_dict.parsed) == {"city", "country"}


def test_an_oversized_constraint_is_refused_before_it_is_compiled(llm):
    huge = StructuredOutputParams(choice=[f"{i:06d}" + "x" * 1000 for i in range(300)])
    with pytest.raises(InvalidRequestError, match="at most"):
        llm.engine.check_request(llm.encode("Hi"), SamplingParams(structured_output=huge))


def test_a_speculating_engine_leaves_constrained_requests_out_of_speculation(llm):
    from leapllm.config import EngineConfig, SpeculativeConfig
    from leapllm.engine.llm_engine import LLMEngine

    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=4, adaptive=False)
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(speculative=spec, max_num_batched_tokens=256))
    schema = SCHEMAS["array_of_objects"]
    ids = llm.encode_chat(schema_prompt("array_of_objects"))
    engine.add_request("constrained", ids, SamplingParams(max_tokens=120, temperature=0.0,
                                                          structured_output=StructuredOutputParams(json=schema)))
    engine.add_request("plain", ids, SamplingParams(max_tokens=40, temperature=0.0))
    texts, finish = {"constrained": "", "plain": ""}, {}
    while engine.has_unfinished():
        for out in engine.step():
            texts[out.request_id] += out.new_text
            if out.finished:
                finish[out.request_id] = out.finish_reason
    validator(schema).validate(json.loads(texts["constrained"]))
    assert finish["constrained"] == "stop" and engine.stats()["spec_decode_steps"] > 0


def test_a_matcher_that_fails_mid_request_ends_it_instead_of_the_step(llm):
    engine = llm.engine
    so = StructuredOutputParams(json=SCHEMAS["person"])
    engine.add_request("broken", llm.encode("Hi"), SamplingParams(max_tokens=20, temperature=0.7, seed=1,
                                                                  structured_output=so))
    engine.add_request("fine", llm.encode("Hi"), SamplingParams(max_tokens=5, temperature=0.0))
    matcher = engine.sequences["broken"].matcher
    assert not matcher.consume_token(llm.tokenizer.encode("zzz")[0]) and matcher.is_error()
    finish = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finish[out.request_id] = out.finish_reason
    assert finish == {"broken": "stop", "fine": "length"}
