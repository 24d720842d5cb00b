"""POST /v1/chat/completions: a conversation in, `n` assistant replies out.

The messages go through the model's chat template (text parts only; "developer" is a system
message). Without max_tokens (or max_completion_tokens) a reply may take the rest of the
context, as with OpenAI. A stream opens every choice with a delta that carries only the role.

Tool calling: `tools` reach the template (or a system message, for a template without tools:
tokenization/tool_calls.py), calls in the reply come back as `message.tool_calls` (streamed as
one `delta.tool_calls` when the reply ends, the text before them as it comes) with finish_reason
"tool_calls". `tool_choice` "required" or a named function constrains decoding to one call whose
arguments are valid for the function's schema; "none" leaves the tools out. The deprecated
`functions` / `function_call` map onto tools and tool_choice, as OpenAI does.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from leapllm.engine.llm_engine import MAX_LOGPROBS
from leapllm.engine.request import RequestOutput
from leapllm.engine.structured_output import StructuredOutputParams
from leapllm.serving.disconnect import until_disconnected
from leapllm.serving.errors import ApiError
from leapllm.serving.generation import GenerationServing, SubRequest
from leapllm.serving.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatResponseMessage,
    ChatStreamChoice,
    UsageInfo,
)
from leapllm.serving.streaming import StreamRenderer, stream_response
from leapllm.serving.structured import requested_structured_output
from leapllm.tokenization.tool_calls import (
    ToolCallError,
    ToolCallFormat,
    check_tools,
    template_renders_tools,
    tool_call_format,
    with_tools_in_messages,
)

CHAT_ROLES = ("system", "user", "assistant", "tool")  # what chat templates know; "developer" maps to system


@dataclass
class ToolPlan:
    """What a request's tools change: what the prompt shows, whether replies are parsed, the constraint."""
    tools: list[dict[str, Any]]  # shown to the model (empty for tool_choice "none")
    fmt: ToolCallFormat
    parse: bool
    constraint: StructuredOutputParams | None  # one call, for "required" or a named function
    parallel: bool = True  # parallel_tool_calls: false keeps only the reply's first call

    def parse_reply(self, text: str):
        """(content, calls) of a finished reply."""
        content, calls = self.fmt.parse(text)
        return content, calls if self.parallel else calls[:1]


def _earlier_tool_calls(calls: list[dict[str, Any]], i: int) -> list[dict[str, Any]]:
    """An assistant message's tool_calls for the template: arguments as objects, as templates expect."""
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ApiError(400, f"messages[{i}].tool_calls[{j}] must have a function with a name",
                           param=f"messages.{i}.tool_calls")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args or "{}")
            except json.JSONDecodeError:
                raise ApiError(400, f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON",
                               param=f"messages.{i}.tool_calls") from None
        out.append({"id": call.get("id", ""), "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def _content_chars(message: ChatMessage) -> int:
    if isinstance(message.content, str):
        return len(message.content)
    return sum(len(part.get("text") or "") for part in message.content or [] if isinstance(part.get("text"), str))


class ChatServing(GenerationServing):
    def tool_plan(self, body: ChatCompletionRequest) -> ToolPlan | None:
        tools, choice = body.tools, body.tool_choice
        if body.functions is not None:  # OpenAI's deprecated form of the same request
            if tools:
                raise ApiError(400, "send tools or functions, not both", param="functions")
            tools = [{"type": "function", "function": f} for f in body.functions]
            fc = body.function_call
            choice = {"type": "function", "function": fc} if isinstance(fc, dict) else fc
        elif body.function_call is not None:
            raise ApiError(400, "function_call needs functions", param="function_call")
        if not tools:
            if choice not in (None, "none", "auto"):
                raise ApiError(400, "tool_choice needs tools", param="tool_choice")
            return None
        try:
            tools = check_tools(tools)
        except ToolCallError as exc:
            raise ApiError(400, str(exc), param="tools") from None
        fmt = tool_call_format(self.tokenizer.chat_template)
        parallel = body.parallel_tool_calls is not False
        choice = "auto" if choice is None else choice
        if choice == "none":
            return ToolPlan([], fmt, parse=False, constraint=None)
        if choice == "auto":
            return ToolPlan(tools, fmt, parse=True, constraint=None, parallel=parallel)
        if choice == "required":
            chosen = tools
        elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
            name = choice["function"].get("name")
            chosen = [t for t in tools if t["function"]["name"] == name]
            if not chosen:
                raise ApiError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        else:
            raise ApiError(400, "tool_choice must be 'none', 'auto', 'required' or "
                           '{"type": "function", "function": {"name": ...}}', param="tool_choice")
        return ToolPlan(tools, fmt, parse=True, constraint=StructuredOutputParams(grammar=fmt.call_grammar(chosen)),
                        parallel=parallel)

    def chat_prompt_ids(self, messages: list[ChatMessage], tools: ToolPlan | None = None) -> list[int]:
        if not messages:
            raise ApiError(400, "messages must not be empty", param="messages")
        conversation = []
        for i, m in enumerate(messages):
            role = "system" if m.role == "developer" else m.role
            if role not in CHAT_ROLES:
                raise ApiError(400, f"messages[{i}].role is {m.role!r}; expected one of "
                               f"{', '.join(CHAT_ROLES + ('developer',))}", param=f"messages.{i}.role")
            content = m.content
            if content is None:
                content = ""
            elif isinstance(content, list):
                texts = []
                for j, part in enumerate(content):
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise ApiError(400, f"messages[{i}].content[{j}] has type {part.get('type')!r}; only text "
                                       "parts ({\"type\": \"text\", \"text\": ...}) are supported",
                                       param=f"messages.{i}.content")
                    texts.append(part["text"])
                content = "\n".join(texts)
            message = {"role": role, "content": content}
            if m.name is not None:
                message["name"] = m.name
            if m.tool_calls:
                message["tool_calls"] = _earlier_tool_calls(m.tool_calls, i)
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            conversation.append(message)
        template = self.tokenizer.chat_template
        if tools is not None and template_renders_tools(template):
            return self.tokenizer.encode_chat(conversation, add_generation_prompt=True, tools=tools.tools or None)
        if tools is not None or any(m.get("tool_calls") or m["role"] == "tool" for m in conversation):
            fmt = tools.fmt if tools is not None else tool_call_format(template)
            conversation = with_tools_in_messages(conversation, tools.tools if tools else None, fmt)
        return self.tokenizer.encode_chat(conversation, add_generation_prompt=True)

    async def create_chat_completion(self, body: ChatCompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        if body.top_logprobs is not None:
            if not 0 <= body.top_logprobs <= MAX_LOGPROBS:
                raise ApiError(400, f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {body.top_logprobs}",
                               param="top_logprobs")
            if body.top_logprobs > 0 and not body.logprobs:
                raise ApiError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
        if max_tokens is None:
            max_tokens, param = body.max_tokens, "max_tokens"
        tools = self.tool_plan(body)
        structured, structured_param = requested_structured_output(body)
        if tools is not None and tools.constraint is not None:
            if structured is not None:
                raise ApiError(400, f"tool_choice {body.tool_choice!r} already constrains the reply; drop "
                               f"{structured_param}", param=structured_param)
            structured, structured_param = tools.constraint, "tool_choice"
        await self.compile_structured_output(structured, structured_param)
        self.check_text_fits(sum(_content_chars(m) for m in body.messages), "messages")
        # The template and the tokenizer run in a worker thread, off the event loop.
        prompt_ids = await asyncio.to_thread(self.chat_prompt_ids, body.messages, tools)
        subs = self.plan(body, [prompt_ids], None, logprobs, None, max_tokens_param=param,
                         requested_max_tokens=max_tokens, structured_output=structured)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        outputs = self.run(request_id, subs, logprobs, None)
        parser = tools if tools is not None and tools.parse else None
        if body.stream:
            renderer = ChatStreamRenderer(self, request_id, created, subs, body, len(prompt_ids), parser)
            return await stream_response(request, outputs, renderer)

        states = await until_disconnected(request, self.collect(outputs, len(subs)))
        choices = []
        for sub, st in zip(subs, states):
            message, finish_reason = ChatResponseMessage(content=st.text), st.finish_reason
            if parser is not None and finish_reason == "stop":
                content, calls = parser.parse_reply(st.text)
                if calls:
                    message = ChatResponseMessage(content=content or None, tool_calls=[c.as_openai() for c in calls])
                    finish_reason = "tool_calls"
            choices.append(ChatChoice(index=sub.index, message=message, finish_reason=finish_reason,
                                      logprobs=self.tokens.chat_logprobs(st.logprobs) if logprobs is not None else None))
        usage = UsageInfo.of(len(prompt_ids), sum(st.num_output_tokens for st in states))
        response = ChatCompletionResponse(id=request_id, created=created, model=self.model_name, choices=choices,
                                          usage=usage)
        return JSONResponse(response.model_dump())


class ChatStreamRenderer(StreamRenderer):
    chunk_type = ChatCompletionChunk

    def __init__(self, serving: ChatServing, request_id: str, created: int, subs: list[SubRequest],
                 body: ChatCompletionRequest, num_prompt_tokens: int, parser: ToolPlan | None):
        super().__init__(serving, request_id, created, subs, body, num_prompt_tokens)
        self.logprobs = bool(body.logprobs)
        self.parser = parser
        # With tools: each choice's text so far, and how much of it went out as content.
        self.texts = [""] * len(subs)
        self.sent = [0] * len(subs)

    def start(self) -> list:
        # OpenAI opens every choice with a delta that carries only the role.
        return [self.chunk([ChatStreamChoice(index=sub.index, delta={"role": "assistant", "content": ""})])
                for sub in self.subs]

    def render(self, index: int, out: RequestOutput) -> list:
        logprobs = None
        if self.logprobs and out.new_logprobs:
            logprobs = self.serving.tokens.chat_logprobs(out.new_logprobs)
        text, finish_reason, tool_calls = out.new_text, out.finish_reason if out.finished else None, None
        if self.parser is not None:
            text, tool_calls, finish_reason = self._hold_tool_calls(index, out, finish_reason)
        if tool_calls:  # the text before the calls, then the calls with the finish reason
            delta = {"tool_calls": [{"index": i, **call.as_openai()} for i, call in enumerate(tool_calls)]}
            chunks = [self.chunk([ChatStreamChoice(index=index, delta={"content": text}, logprobs=logprobs)])] \
                if text or logprobs is not None else []
            return chunks + [self.chunk([ChatStreamChoice(index=index, delta=delta, finish_reason=finish_reason)])]
        if not text and logprobs is None and not out.finished:
            return []
        delta = {"content": text} if text or logprobs is not None else {}
        return [self.chunk([ChatStreamChoice(index=index, delta=delta, logprobs=logprobs,
                                             finish_reason=finish_reason)])]

    def _hold_tool_calls(self, index: int, out: RequestOutput, finish_reason: str | None):
        """(content to send now, the tool calls, finish_reason): text that may be a call waits for the end."""
        self.texts[index] += out.new_text
        full = self.texts[index]
        if not out.finished:
            end = max(self.sent[index], self.parser.fmt.held_from(full))
            text, self.sent[index] = full[self.sent[index]:end], end
            return text, None, finish_reason
        calls = []
        if finish_reason == "stop":
            content, calls = self.parser.parse_reply(full)
        if not calls:
            return full[self.sent[index]:], None, finish_reason
        return content[self.sent[index]:], calls, "tool_calls"
