"""Tool calling over HTTP with the official client: calls parsed into message.tool_calls, streamed
as delta.tool_calls, constrained for tool_choice "required" or a named function, a full round
trip with a tool message, the deprecated functions API, and 400s for malformed requests."""

from __future__ import annotations

import json

import jsonschema
import pytest

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the local time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 30}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def check_call(call, tools=TOOLS):
    assert call.type == "function" and call.id
    tool = next(t for t in tools if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


@pytest.mark.parametrize("seed", range(4))
def test_tool_choice_required_always_gives_a_valid_call(server, seed):
    r = server.openai().chat.completions.create(model="smollm2-test", messages=ASK, tools=TOOLS,
                                                tool_choice="required", temperature=1.0, seed=seed, max_tokens=120)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    check_call(choice.message.tool_calls[0])


def test_a_named_tool_choice_calls_that_function(server):
    r = server.openai().chat.completions.create(
        model="smollm2-test", messages=ASK, tools=TOOLS, max_tokens=120, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_time"
    check_call(call)


def test_a_round_trip_call_result_answer(server):
    client = server.openai()
    messages = list(ASK)
    first = client.chat.completions.create(model="smollm2-test", messages=messages, tools=TOOLS,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           temperature=0, max_tokens=120)
    call = first.choices[0].message.tool_calls[0]
    check_call(call)
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})})
    second = client.chat.completions.create(model="smollm2-test", messages=messages, tools=TOOLS, tool_choice="none",
                                            temperature=0, max_tokens=60)
    answer = second.choices[0]
    assert answer.finish_reason in ("stop", "length") and answer.message.tool_calls is None
    assert answer.message.content.strip()


def test_streamed_required_call_arrives_as_delta_tool_calls(server):
    stream = server.openai().chat.completions.create(model="smollm2-test", messages=ASK, tools=TOOLS,
                                                     tool_choice="required", temperature=0, max_tokens=120, stream=True)
    calls, finish, content = [], None, ""
    for chunk in stream:
        for c in chunk.choices:
            calls += c.delta.tool_calls or []
            content += c.delta.content or ""
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and len(calls) == 1 and content == ""
    assert calls[0].index == 0 and calls[0].function.name in ("get_weather", "get_time")
    json.loads(calls[0].function.arguments)


def test_streamed_and_non_streamed_required_calls_agree(server):
    client = server.openai()
    kwargs = dict(model="smollm2-test", messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=120)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    streamed = [d for chunk in client.chat.completions.create(stream=True, **kwargs)
                for c in chunk.choices for d in c.delta.tool_calls or []][0]
    assert (whole.function.name, whole.function.arguments) == (streamed.function.name, streamed.function.arguments)


def test_auto_gives_either_text_or_well_formed_calls(server):
    r = server.openai().chat.completions.create(model="smollm2-test", messages=ASK, tools=TOOLS, temperature=0,
                                                max_tokens=80)
    message = r.choices[0].message
    if message.tool_calls:
        assert r.choices[0].finish_reason == "tool_calls"
        for call in message.tool_calls:
            json.loads(call.function.arguments)
    else:
        assert message.content and "<tool_call>" not in message.content


def test_deprecated_functions_map_onto_tools(server):
    r = server.post("/v1/chat/completions", json={
        "messages": ASK, "functions": [WEATHER["function"]], "function_call": {"name": "get_weather"},
        "temperature": 0, "max_tokens": 120})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ({"tools": TOOLS, "functions": [TIME["function"]]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tool_choice"),
])
def test_malformed_tool_requests_are_400s(server, body, param):
    r = server.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_history_with_bad_tool_call_arguments_is_a_400(server):
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}]}]
    r = server.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 5, "tools": TOOLS})
    assert r.status_code == 400 and "arguments" in r.json()["error"]["message"]


QWEN_STYLE_TEMPLATE = """{%- if tools %}<|im_start|>system
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for tc in message.tool_calls %}
<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_a_template_that_renders_tools_gets_them_and_the_history_as_objects(llm):
    import copy

    from leapllm.serving.chat import ChatServing
    from leapllm.serving.protocol import ChatCompletionRequest

    serving = object.__new__(ChatServing)  # only the tokenizer is needed to build a prompt
    serving.tokenizer = copy.copy(llm.tokenizer)
    serving.tokenizer.chat_template = QWEN_STYLE_TEMPLATE
    body = ChatCompletionRequest(messages=ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21 C"}], tools=TOOLS)
    plan = serving.tool_plan(body)
    assert plan.fmt.name == "hermes" and plan.parse and plan.constraint is None
    prompt = llm.tokenizer.decode(serving.chat_prompt_ids(body.messages, plan))
    assert '"name": "get_time"' in prompt  # the tools, rendered by the template itself
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt  # arguments as an object
    assert "<tool_response>\n21 C\n</tool_response>" in prompt and "<tools>" not in prompt


def test_parallel_tool_calls_false_keeps_only_the_first_call():
    from leapllm.serving.chat import ToolPlan
    from leapllm.tokenization.tool_calls import HermesFormat

    two = ('<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>\n'
           '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')
    assert len(ToolPlan(TOOLS, HermesFormat(), parse=True, constraint=None).parse_reply(two)[1]) == 2
    one = ToolPlan(TOOLS, HermesFormat(), parse=True, constraint=None, parallel=False).parse_reply(two)[1]
    assert [json.loads(c.arguments) for c in one] == [
        {"zone": "UTC"}]
