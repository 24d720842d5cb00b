"""`stream: true`: engine outputs as server-sent events, one OpenAI chunk per event, then [DONE].

A StreamRenderer turns one request's outputs into its chunks (completions.py and chat.py each
have theirs); stream_response frames them as SSE. An error after the 200 went out is reported as
an error event in the stream, as OpenAI does, and the stream still ends with [DONE].
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from leapllm.engine.async_engine import EngineStepError, EngineStoppedError
from leapllm.engine.request import RequestOutput
from leapllm.errors import LeapLLMError
from leapllm.serving.disconnect import until_disconnected
from leapllm.serving.errors import ApiError, as_api_error, error_body
from leapllm.serving.generation import GenerationServing, SubRequest
from leapllm.serving.protocol import SamplingRequest, UsageInfo

log = logging.getLogger("leapllm.serving")


def sse(chunk, include_usage: bool) -> str:
    return f"data: {chunk.model_dump_json(exclude=None if include_usage else {'usage'})}\n\n"


class StreamRenderer:
    """Turns one request's engine outputs into its stream's chunks: start() first, on_output() for
    each output, usage_chunk() at the end when the client asked for usage."""
    chunk_type: type

    def __init__(self, serving: GenerationServing, request_id: str, created: int, subs: list[SubRequest],
                 body: SamplingRequest, num_prompt_tokens: int):
        self.serving, self.request_id, self.created, self.subs = serving, request_id, created, subs
        self.include_usage = body.include_usage_in_stream
        self.num_prompt_tokens = num_prompt_tokens
        self.num_output_tokens = [0] * len(subs)

    def chunk(self, choices, usage=None):
        return self.chunk_type(id=self.request_id, created=self.created, model=self.serving.model_name,
                               choices=choices, usage=usage)

    def start(self) -> list:
        return []

    def on_output(self, index: int, out: RequestOutput) -> list:
        if out.finish_reason == "abort":  # the server shut down: report an error, not a short answer
            raise EngineStoppedError("the server shut down before the request finished")
        self.num_output_tokens[index] = out.num_output_tokens
        return self.render(index, out)

    def render(self, index: int, out: RequestOutput) -> list:
        raise NotImplementedError

    def usage_chunk(self):
        return self.chunk([], UsageInfo.of(self.num_prompt_tokens, sum(self.num_output_tokens)))


async def stream_response(request: Request, outputs: AsyncIterator[tuple[int, RequestOutput]],
                          renderer: StreamRenderer) -> Response:
    """An SSE response. Waits for the first output, so that a request the engine refuses
    (overloaded, shutting down) still gets its proper status code instead of a 200 stream."""
    first = await until_disconnected(request, anext(outputs))

    async def body():
        try:
            for chunk in renderer.start():
                yield sse(chunk, renderer.include_usage)
            for chunk in renderer.on_output(*first):
                yield sse(chunk, renderer.include_usage)
            async for index, out in outputs:
                for chunk in renderer.on_output(index, out):
                    yield sse(chunk, renderer.include_usage)
            if renderer.include_usage:
                yield sse(renderer.usage_chunk(), True)
        except Exception as exc:  # after the 200 went out: report it in the stream, as OpenAI does
            err = as_api_error(exc)
            if err.status >= 500 and not isinstance(exc, (ApiError, LeapLLMError, EngineStepError)):
                log.exception("stream failed")
            yield f"data: {json.dumps(error_body(err), separators=(',', ':'))}\n\n"
        finally:
            await outputs.aclose()  # on a disconnect: cancels the pumps, which aborts the requests
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
