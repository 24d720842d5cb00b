"""Tool calls in a model's own format: how they are prompted, parsed from output, and constrained.

Models learned one of a few formats, and their chat template says which:
  - Hermes / Qwen: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks;
  - Llama 3.x: the reply is a JSON object `{"name": ..., "parameters": {...}}` (after `<|python_tag|>`
    for built-in tools), several separated by `;`;
  - Mistral: `[TOOL_CALLS]` then a JSON list of `{"name": ..., "arguments": {...}}`.
`tool_call_format(template)` picks one. A template that does not render `tools` itself (SmolLM2's
does not) gets them in a system message in the Hermes format, with earlier calls and results
written as text (`with_tools_in_messages`), as vLLM's and llama.cpp's generic fallbacks do.

Each format can also write the grammar of "exactly one call to one of these functions, with
arguments valid for its `parameters` schema", which the server uses for `tool_choice: required`
or a named function, so that such a call always parses and validates.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from leapllm.tokenization.detokenizer import partial_match_len

# JSON inside a tool-call grammar is written as structured outputs write it (engine/structured_output.py).
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ToolCallError(ValueError):
    """A tool definition or a tool call in the conversation is malformed."""


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (as OpenAI returns it)
    id: str = ""

    def __post_init__(self):
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def check_tools(tools: list[Any]) -> list[dict[str, Any]]:
    """OpenAI `tools` entries ({"type": "function", "function": {"name", "description", "parameters"}}),
    checked; raises ToolCallError naming the first problem."""
    checked = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ToolCallError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ToolCallError(f"tools[{i}].function must be an object with a non-empty 'name'")
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", fn["name"]):
            raise ToolCallError(f"tools[{i}].function.name {fn['name']!r} must be 1-64 letters, digits, '_', '.' or '-'")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ToolCallError(f"tools[{i}].function.parameters must be a JSON schema object")
        checked.append({"type": "function", "function": {**fn, "parameters": params}})
    names = [t["function"]["name"] for t in checked]
    if len(set(names)) != len(names):
        raise ToolCallError("tools must have distinct function names")
    return checked


def _call_schema(tools: list[dict[str, Any]], arguments_key: str) -> dict[str, Any]:
    """The JSON schema of one call to any of `tools`: {"name": const, arguments_key: parameters}."""
    options = [{"type": "object",
                "properties": {"name": {"const": t["function"]["name"]}, arguments_key: t["function"]["parameters"]},
                "required": ["name", arguments_key], "additionalProperties": False} for t in tools]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": JSON_STYLE}


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a Lark string literal takes JSON's escapes


def _json_objects(text: str) -> list[Any] | None:
    """The JSON values that make up `text` (separated by whitespace or ';'), or None if it is not that."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;":
            i += 1
        if i == len(text):
            return values or None
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        values.append(value)


def _as_call(obj: Any, arguments_keys: tuple[str, ...]) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = next((obj[k] for k in arguments_keys if k in obj), {})
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolCallFormat:
    name = ""
    marker = ""  # the text that opens a call

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(the reply's text outside calls, the calls in it)."""
        raise NotImplementedError

    def held_from(self, text: str) -> int:
        """How much of a reply streamed so far can go out as content: text from here on may be (the start
        of) a tool call, and is held back until the reply ends."""
        start = text.find(self.marker)
        return start if start != -1 else len(text) - partial_match_len(text, self.marker)

    def call_grammar(self, tools: list[dict[str, Any]]) -> str:
        """A Lark grammar (llguidance's dialect) of exactly one call to one of `tools`."""
        raise NotImplementedError

    def render_call(self, call: dict[str, Any]) -> str:
        """An earlier call of the conversation as this format writes it (for templates without tools)."""
        raise NotImplementedError


class HermesFormat(ToolCallFormat):
    name = "hermes"
    marker = "<tool_call>"
    BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)

    def parse(self, text):
        calls = []
        for body in self.BLOCK.findall(text):
            values = _json_objects(body)
            call = _as_call(values[0], ("arguments", "parameters")) if values and len(values) == 1 else None
            if call is None:
                return text, []  # a malformed block: the reply stays text, as vLLM does
            calls.append(call)
        if not calls:
            return text, []
        return text[:text.find(self.marker)].strip(), calls

    def call_grammar(self, tools):
        schema = json.dumps(_call_schema(tools, "arguments"))
        return (f"start: {_lark_string('<tool_call>' + chr(10))} call {_lark_string(chr(10) + '</tool_call>')}\n"
                f"call: %json {schema}\n")

    def render_call(self, call):
        body = {"name": call["name"], "arguments": call["arguments"]}
        return f"<tool_call>\n{json.dumps(body, ensure_ascii=False)}\n</tool_call>"


class Llama3JsonFormat(ToolCallFormat):
    name = "llama3_json"
    marker = "{"

    def parse(self, text):
        body = text.strip().removeprefix("<|python_tag|>")
        values = _json_objects(body) if body.startswith("{") else None
        calls = [_as_call(v, ("parameters", "arguments")) for v in values or []]
        if not calls or None in calls:
            return text, []
        return "", calls

    def held_from(self, text):
        body = text.lstrip()
        # A reply is a call only if it opens with one; everything else streams as it comes.
        return 0 if body == "" or body.startswith("{") or "<|python_tag|>".startswith(body[:14]) else len(text)

    def call_grammar(self, tools):
        return f"start: call\ncall: %json {json.dumps(_call_schema(tools, 'parameters'))}\n"

    def render_call(self, call):
        return json.dumps({"name": call["name"], "parameters": call["arguments"]}, ensure_ascii=False)


class MistralFormat(ToolCallFormat):
    name = "mistral"
    marker = "[TOOL_CALLS]"

    def parse(self, text):
        start = text.find(self.marker)
        # [TOOL_CALLS] is a special token, left out of the decoded text: a reply that is a JSON list is one too.
        body = text[start + len(self.marker):] if start != -1 else text.strip()
        values = _json_objects(body.strip()) if body.strip().startswith("[") else None
        if not values or not isinstance(values[0], list):
            return text, []
        calls = [_as_call(v, ("arguments", "parameters")) for v in values[0]]
        if not calls or None in calls:
            return text, []
        return (text[:start].strip() if start != -1 else ""), calls

    def held_from(self, text):
        if text.lstrip().startswith("[") or text.strip() == "":
            return 0
        return super().held_from(text)

    def call_grammar(self, tools):
        return f"start: \"[\" call \"]\"\ncall: %json {json.dumps(_call_schema(tools, 'arguments'))}\n"

    def render_call(self, call):
        return "[TOOL_CALLS]" + json.dumps([{"name": call["name"], "arguments": call["arguments"]}], ensure_ascii=False)


def tool_call_format(chat_template: str | None) -> ToolCallFormat:
    """The format the model's template uses for tool calls (Hermes when it shows none)."""
    t = chat_template or ""
    if "[TOOL_CALLS]" in t:
        return MistralFormat()
    if "<tool_call>" in t:
        return HermesFormat()
    if "<|python_tag|>" in t or ("<|eot_id|>" in t and "tools" in t):
        return Llama3JsonFormat()
    return HermesFormat()


def template_renders_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and re.search(r"\btools\b", chat_template) is not None


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """The Hermes function-calling system prompt (as Hermes 2 Pro and Qwen 2.5 were trained with)."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            f"{listed}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def with_tools_in_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                           fmt: ToolCallFormat) -> list[dict[str, Any]]:
    """The conversation for a template that knows nothing of tools: the tools in the system message,
    earlier calls as text in the format, and results as `<tool_response>` user turns."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(fmt.render_call(c["function"]) for c in m["tool_calls"])
            out.append({"role": "assistant", "content": (m.get("content") or "") + calls})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"})
        else:
            out.append({k: v for k, v in m.items() if k in ("role", "content", "name")})
    if tools:
        prompt = tools_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out
