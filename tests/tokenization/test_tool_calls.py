"""Tool-call formats: parsing each model family's calls, streaming hold-back, the call grammar, and
the fallback that writes tools into a template that knows nothing of them."""

from __future__ import annotations

import json

import llguidance
import pytest
from llguidance import LLMatcher

from leapllm.tokenization.tool_calls import (
    HermesFormat,
    Llama3JsonFormat,
    MistralFormat,
    ToolCallError,
    check_tools,
    template_renders_tools,
    tool_call_format,
    with_tools_in_messages,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city"]}}}


def test_hermes_calls_are_parsed_with_the_text_before_them():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "C"}}\n</tool_call>')
    content, calls = HermesFormat().parse(text)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome", "unit": "C"})]
    assert calls[0].id.startswith("call_") and calls[0].id != calls[1].id


def test_a_malformed_call_stays_text():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'
    assert HermesFormat().parse(text) == (text, [])
    assert HermesFormat().parse("Just words.") == ("Just words.", [])


def test_llama3_json_calls_including_python_tag_and_several():
    content, calls = Llama3JsonFormat().parse('<|python_tag|>{"name": "a", "parameters": {"x": 1}}; '
                                              '{"name": "b", "parameters": {}}')
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [("a", {"x": 1}), ("b", {})]
    assert Llama3JsonFormat().parse("The answer is {x}.")[1] == []


def test_mistral_calls_with_or_without_the_special_token_in_the_text():
    for text in ('[TOOL_CALLS][{"name": "a", "arguments": {"q": "x"}}]', '[{"name": "a", "arguments": {"q": "x"}}]'):
        content, calls = MistralFormat().parse(text)
        assert content == "" and calls[0].name == "a" and json.loads(calls[0].arguments) == {"q": "x"}


def test_string_arguments_are_read_as_json():
    _, calls = HermesFormat().parse('<tool_call>{"name": "f", "arguments": "{\\"a\\": 2}"}</tool_call>')
    assert json.loads(calls[0].arguments) == {"a": 2}


def test_streaming_holds_back_only_what_may_be_a_call():
    fmt = HermesFormat()
    assert fmt.held_from("Hello there") == len("Hello there")
    assert fmt.held_from("Hello <tool") == len("Hello ")
    assert fmt.held_from("Hi <tool_call>{") == len("Hi ")
    assert Llama3JsonFormat().held_from('  {"na') == 0
    assert Llama3JsonFormat().held_from("Sure, here") == len("Sure, here")


@pytest.mark.parametrize("template, fmt", [
    ("{% for m in messages %}<tool_call>{% endfor %}", "hermes"),
    ("{{ '[TOOL_CALLS]' }}", "mistral"),
    ("<|python_tag|>{{ tools }}<|eot_id|>", "llama3_json"),
    ("{% for m in messages %}{{ m.content }}{% endfor %}", "hermes"),
])
def test_the_format_is_chosen_from_the_template(template, fmt):
    assert tool_call_format(template).name == fmt


@pytest.mark.parametrize("fmt", [HermesFormat(), Llama3JsonFormat(), MistralFormat()])
def test_the_call_grammar_accepts_a_valid_call_and_rejects_a_wrong_name(fmt):
    tools = check_tools([WEATHER])
    grammar = llguidance.grammar_from("lark", fmt.call_grammar(tools))
    tok = llguidance.LLTokenizer(_byte_tokenizer_json())
    good = fmt.render_call({"name": "get_weather", "arguments": {"city": "Oslo"}}).removeprefix("[TOOL_CALLS]")
    bad = good.replace("get_weather", "get_wheather")
    for text, ok in ((good, True), (bad, False)):
        m = LLMatcher(tok, grammar, log_level=0)
        assert m.consume_tokens(tok.tokenize_str(text)) == ok and (not ok or m.is_accepting()), text


def _byte_tokenizer_json() -> str:
    """A tokenizer with one token per byte (and an end token), enough to walk a grammar byte by byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["</s>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


@pytest.mark.parametrize("tools, words", [
    ([{"type": "retrieval"}], r"tools\[0\]"),
    ([{"type": "function", "function": {"description": "no name"}}], "name"),
    ([{"type": "function", "function": {"name": "has space"}}], "letters"),
    ([WEATHER, WEATHER], "distinct"),
    ([{"type": "function", "function": {"name": "f", "parameters": "object"}}], "parameters"),
])
def test_malformed_tools_are_refused_naming_the_problem(tools, words):
    with pytest.raises(ToolCallError, match=words):
        check_tools(tools)


def test_a_template_without_tools_gets_them_in_the_system_message_and_history_as_text():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    out = with_tools_in_messages(messages, check_tools([WEATHER]), HermesFormat())
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.") and "<tools>" in out[0]["content"]
    assert '"get_weather"' in out[0]["content"]
    assert out[2] == {"role": "assistant", "content":
                      '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'}
    assert out[3] == {"role": "user", "content": "<tool_response>\n18 C, sunny\n</tool_response>"}
    assert not template_renders_tools("{{ messages }}") and template_renders_tools("{% if tools %}{% endif %}")
