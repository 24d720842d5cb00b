"""POST /v1/completions: text (or token ids) in, `n` continuations of each prompt out.

`prompt` may be a string, a list of strings, a list of token ids or a list of such lists; each
prompt gets `n` choices, indexed prompt_index * n + i. `echo` puts the prompt in front of the
text (with its logprobs when `logprobs` is set), and echo with max_tokens 0 scores the prompt
alone, as lm-eval-harness asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from leapllm.engine.llm_engine import MAX_LOGPROBS
from leapllm.engine.request import RequestOutput
from leapllm.serving.disconnect import until_disconnected
from leapllm.serving.errors import ApiError
from leapllm.serving.generation import GenerationServing, SubRequest
from leapllm.serving.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from leapllm.serving.streaming import StreamRenderer, stream_response
from leapllm.serving.structured import requested_structured_output

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # as OpenAI


async def without_generated_tokens(outputs: AsyncIterator[tuple[int, RequestOutput]]):
    """The outputs with their generated tokens removed, as if max_tokens were 0."""
    async with contextlib.aclosing(outputs):  # closing this closes (and so aborts) the source too
        async for index, out in outputs:
            yield index, dataclasses.replace(
                out, new_token_ids=[], new_text="", new_logprobs=[] if out.new_logprobs is not None else None,
                num_output_tokens=0, finish_reason="length" if out.finished and out.finish_reason != "abort"
                else out.finish_reason)


class CompletionServing(GenerationServing):
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    async def create_completion(self, body: CompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        n = body.n or 1
        if body.best_of is not None and body.best_of != n:
            raise ApiError(400, "best_of is not supported (it may only equal n)", param="best_of")
        if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
            raise ApiError(400, f"logprobs must be between 0 and {MAX_LOGPROBS}, got {body.logprobs}",
                           param="logprobs")
        structured, param = requested_structured_output(body)
        await self.compile_structured_output(structured, param)
        prompts = body.prompts()
        for p in prompts:
            if isinstance(p, str):
                self.check_text_fits(len(p), "prompt")
        # Tokenizing takes a worker thread: a long prompt must not stall the event loop (other streams, /health).
        prompt_ids = await asyncio.to_thread(lambda: [self.encode_prompt(p) for p in prompts])
        prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
        # echo with max_tokens 0 scores the prompt (lm-eval-harness does this): generate one token, drop it.
        score_prompt_only = bool(body.echo) and body.max_tokens == 0
        subs = self.plan(body, prompt_ids, COMPLETIONS_DEFAULT_MAX_TOKENS, body.logprobs, prompt_logprobs,
                         requested_max_tokens=1 if score_prompt_only else body.max_tokens,
                         structured_output=structured)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        outputs = self.run(request_id, subs, body.logprobs, prompt_logprobs)
        if score_prompt_only:
            outputs = without_generated_tokens(outputs)
        prompt_texts = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in prompts] if body.echo else None
        num_prompt_tokens = sum(len(ids) for ids in prompt_ids)
        if body.stream:
            renderer = CompletionStreamRenderer(self, request_id, created, subs, body, prompt_texts, num_prompt_tokens)
            return await stream_response(request, outputs, renderer)

        states = await until_disconnected(request, self.collect(outputs, len(subs)))
        choices = []
        for sub, st in zip(subs, states):
            prompt_text = prompt_texts[sub.prompt_index] if body.echo else ""
            logprobs = None
            if body.logprobs is not None:
                logprobs = CompletionLogprobs()
                if body.echo:  # the prompt's tokens first; the first has no logprob (nothing before it)
                    logprobs, _ = self.tokens.completion_logprobs(st.prompt_logprobs or [], sub.prompt_ids, 0)
                logprobs.extend(self.tokens.completion_logprobs(st.logprobs, st.token_ids, len(prompt_text))[0])
            text = prompt_text + st.text
            choices.append(CompletionChoice(index=sub.index, text=text, logprobs=logprobs,
                                            finish_reason=st.finish_reason))
        usage = UsageInfo.of(num_prompt_tokens, sum(st.num_output_tokens for st in states))
        response = CompletionResponse(id=request_id, created=created, model=self.model_name, choices=choices,
                                      usage=usage)
        return JSONResponse(response.model_dump())


class CompletionStreamRenderer(StreamRenderer):
    chunk_type = CompletionChunk

    def __init__(self, serving: CompletionServing, request_id: str, created: int, subs: list[SubRequest],
                 body: CompletionRequest, prompt_texts: list[str] | None, num_prompt_tokens: int):
        super().__init__(serving, request_id, created, subs, body, num_prompt_tokens)
        self.body = body
        self.prompt_texts = prompt_texts
        self.started = [False] * len(subs)
        self.offsets = [0] * len(subs)  # text_offset of each choice's next token

    def render(self, index: int, out: RequestOutput) -> list:
        tokens = self.serving.tokens
        text, logprobs = out.new_text, None
        if self.body.logprobs is not None:
            logprobs = CompletionLogprobs()
        if not self.started[index]:
            self.started[index] = True
            if self.body.echo:  # the prompt comes first, with its logprobs when asked
                sub = self.subs[index]
                prompt_text = self.prompt_texts[sub.prompt_index]
                text = prompt_text + text
                if logprobs is not None:
                    logprobs, _ = tokens.completion_logprobs(out.prompt_logprobs or [], sub.prompt_ids, 0)
                self.offsets[index] = len(prompt_text)
        if logprobs is not None and out.new_logprobs:
            generated, self.offsets[index] = tokens.completion_logprobs(out.new_logprobs, out.new_token_ids,
                                                                        self.offsets[index])
            logprobs.extend(generated)
        if not text and not (logprobs and logprobs.tokens) and not out.finished:
            return []  # a token whose text is held back (part of a character or of a stop string)
        return [self.chunk([CompletionChoice(index=index, text=text, logprobs=logprobs,
                                             finish_reason=out.finish_reason if out.finished else None)])]
