"""The OpenAI API's request and response bodies, as pydantic models.

Requests are validated strictly (`"max_tokens": "16"` or `"stream": 1` is a 400, as with OpenAI),
unknown fields are ignored (clients send many: `user`, `metadata`, ...), and every optional field
may also be sent as null. Besides OpenAI's sampling fields, requests accept vLLM's extras
(`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `stop_token_ids`, and for structured outputs
`structured_outputs` and the older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`).

Responses mirror OpenAI's JSON field for field, so the official clients parse them unchanged.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_N = 128  # choices per prompt, as OpenAI


def invalid_unicode_at(value: Any, path: str = "") -> str | None:
    """Where in a parsed JSON body a string is not valid Unicode (a lone surrogate such as "\\ud800",
    which JSON allows but no tokenizer or UTF-8 encoder takes), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "the body"
    elif isinstance(value, dict):
        for k, v in value.items():
            where = invalid_unicode_at(k, path) or invalid_unicode_at(v, f"{path}.{k}" if path else str(k))
            if where:
                return where
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if where := invalid_unicode_at(v, f"{path}.{i}" if path else str(i)):
                return where
    return None


class UnicodeText(BaseModel):
    """A request body whose every string is valid Unicode (else a 400 naming where)."""

    @model_validator(mode="before")
    @classmethod
    def _check_unicode(cls, data):
        where = invalid_unicode_at(data)
        if where:
            raise ValueError(f"{where} is not valid Unicode text (it holds a lone surrogate)")
        return data


class Strict(UnicodeText):
    model_config = ConfigDict(strict=True)


# -- requests ----------------------------------------------------------------------------------

class StreamOptions(Strict):
    include_usage: bool | None = False


class SamplingRequest(Strict):
    """Fields that completions and chat completions share."""
    model: str | None = None  # optional, as in vLLM and llama-server: None means the served model
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # accepted only when empty: not supported
    user: str | None = None
    # vLLM's extra sampling fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    # Structured outputs (serving/structured.py): OpenAI's response_format, vLLM's extras.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("temperature")
    @classmethod
    def _check_temperature(cls, t):
        if t is not None and not 0.0 <= t <= 2.0:  # OpenAI's range
            raise ValueError(f"must be between 0 and 2, got {t}")
        return t

    @field_validator("top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p")
    @classmethod
    def _check_finite(cls, v):
        if v is not None and not math.isfinite(v):
            raise ValueError(f"must be a finite number, got {v}")
        return v

    @field_validator("n")
    @classmethod
    def _check_n(cls, n):
        if n is not None and not 1 <= n <= MAX_N:
            raise ValueError(f"must be between 1 and {MAX_N}, got {n}")
        return n

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop):
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed, got {len(stop)}")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, bias):
        if bias:
            raise ValueError("not supported")
        return bias

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    # A string, a list of strings, a list of token ids, or a list of token id lists.
    prompt: Any
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, prompt):
        def is_ids(x):
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(prompt, str) or is_ids(prompt):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
            prompts = prompt
        else:
            raise ValueError("must be a string, a list of strings, a list of token ids, "
                             "or a list of lists of token ids")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("must not be empty")
        return prompt

    @field_validator("suffix")
    @classmethod
    def _check_suffix(cls, suffix):
        if suffix:
            raise ValueError("not supported")
        return suffix

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: one string or token id list per prompt."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class ChatMessage(Strict):
    role: str
    # A string, or a list of parts of which only {"type": "text", "text": ...} is supported.
    # Null is allowed (an assistant message that only made tool calls).
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None  # "none", "auto", "required" or {"type": "function", ...}
    parallel_tool_calls: bool | None = None
    # OpenAI's deprecated names, mapped onto tools (serving/chat.py)
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    # OpenAI fields that would change the output and that leapllm does not implement: a 400, not silence.
    modalities: Any = None
    audio: Any = None
    reasoning_effort: Any = None
    prediction: Any = None
    web_search_options: Any = None

    @field_validator("modalities", "audio", "reasoning_effort", "prediction", "web_search_options")
    @classmethod
    def _refuse_unimplemented(cls, value, info):
        if value is not None and not (info.field_name == "modalities" and value == ["text"]):
            raise ValueError("not supported")
        return value


# -- responses ---------------------------------------------------------------------------------

class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)

    def extend(self, other: CompletionLogprobs) -> CompletionLogprobs:
        self.tokens += other.tokens
        self.token_logprobs += other.token_logprobs
        self.top_logprobs += other.top_logprobs
        self.text_offset += other.text_offset
        return self


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobEntry] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatStreamChoice(BaseModel):
    index: int
    # {"role": "assistant", "content": ""} first, then {"content": ...} or {"tool_calls": [...]}; {} at the end
    delta: dict[str, Any]
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class CompletionChunk(BaseModel):
    """A streamed completion chunk: OpenAI uses object "text_completion" for these too."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "leapllm"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
