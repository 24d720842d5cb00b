"""POST /v1/chat/completions: a conversation in, `n` assistant replies out.

The messages go through the model's chat template (text parts only; "developer" is a system
message). Without max_tokens (or max_completion_tokens) a reply may take the rest of the
context, as with OpenAI. A stream opens every choice with a delta that carries only the role.
"""

from __future__ import annotations

import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from leapllm.engine.llm_engine import MAX_LOGPROBS
from leapllm.engine.request import RequestOutput
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

CHAT_ROLES = ("system", "user", "assistant", "tool")  # what chat templates know; "developer" maps to system


class ChatServing(GenerationServing):
    def chat_prompt_ids(self, messages: list[ChatMessage]) -> list[int]:
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
            conversation.append(message)
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
        prompt_ids = self.chat_prompt_ids(body.messages)
        subs = self.plan(body, [prompt_ids], None, logprobs, None, max_tokens_param=param,
                         requested_max_tokens=max_tokens)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        outputs = self.run(request_id, subs, logprobs, None)
        if body.stream:
            renderer = ChatStreamRenderer(self, request_id, created, subs, body, len(prompt_ids))
            return await stream_response(request, outputs, renderer)

        states = await until_disconnected(request, self.collect(outputs, len(subs)))
        choices = [ChatChoice(index=sub.index, message=ChatResponseMessage(content=st.text),
                              logprobs=self.tokens.chat_logprobs(st.logprobs) if logprobs is not None else None,
                              finish_reason=st.finish_reason)
                   for sub, st in zip(subs, states)]
        usage = UsageInfo.of(len(prompt_ids), sum(st.num_output_tokens for st in states))
        response = ChatCompletionResponse(id=request_id, created=created, model=self.model_name, choices=choices,
                                          usage=usage)
        return JSONResponse(response.model_dump())


class ChatStreamRenderer(StreamRenderer):
    chunk_type = ChatCompletionChunk

    def __init__(self, serving: ChatServing, request_id: str, created: int, subs: list[SubRequest],
                 body: ChatCompletionRequest, num_prompt_tokens: int):
        super().__init__(serving, request_id, created, subs, body, num_prompt_tokens)
        self.logprobs = bool(body.logprobs)

    def start(self) -> list:
        # OpenAI opens every choice with a delta that carries only the role.
        return [self.chunk([ChatStreamChoice(index=sub.index, delta={"role": "assistant", "content": ""})])
                for sub in self.subs]

    def render(self, index: int, out: RequestOutput) -> list:
        logprobs = None
        if self.logprobs and out.new_logprobs:
            logprobs = self.serving.tokens.chat_logprobs(out.new_logprobs)
        if not out.new_text and logprobs is None and not out.finished:
            return []
        delta = {"content": out.new_text} if out.new_text or logprobs is not None else {}
        return [self.chunk([ChatStreamChoice(index=index, delta=delta, logprobs=logprobs,
                                             finish_reason=out.finish_reason if out.finished else None)])]
