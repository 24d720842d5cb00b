"""What /v1/completions and /v1/chat/completions share: one HTTP request as engine requests.

One HTTP request becomes one engine request per (prompt, choice): `n` choices of `k` prompts are
k*n engine requests (SubRequest), run concurrently and merged into one stream of (choice index,
output). The handler validates everything it can (sampling values, prompt length, logprobs)
before anything reaches the engine, so a bad request fails alone with a 400 and never disturbs
others in flight. A non-streaming response collects each choice into a ChoiceState; a streaming
one hands the merged outputs to a renderer (streaming.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from leapllm.engine.async_engine import AsyncEngine, EngineStoppedError
from leapllm.engine.request import RequestOutput, TokenLogprob
from leapllm.engine.sampling import SamplingParams
from leapllm.engine.structured_output import StructuredOutputParams
from leapllm.errors import InvalidRequestError
from leapllm.serving.errors import ApiError
from leapllm.serving.logprobs import TokenStrings
from leapllm.serving.metrics import ServerMetrics
from leapllm.serving.protocol import ModelCard, SamplingRequest

INT64 = 2**63


# The request fields that map one to one onto SamplingParams.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty")


@dataclass
class SubRequest:
    """One engine request: one choice of one prompt."""
    index: int  # the choice index in the response (prompt_index * n + i, as OpenAI and vLLM)
    prompt_index: int
    prompt_ids: list[int]
    params: SamplingParams
    # The engine request's other arguments: an encoder-decoder's source, logits processor and beam search.
    engine_args: dict = field(default_factory=dict)


@dataclass
class ChoiceState:
    """What a non-streaming response accumulates for one choice."""
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    num_output_tokens: int = 0

    def add(self, out: RequestOutput) -> None:
        self.texts.append(out.new_text)
        self.token_ids += out.new_token_ids
        self.logprobs += out.new_logprobs or []
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.num_output_tokens = out.num_output_tokens
        if out.finished:
            self.finish_reason = out.finish_reason

    @property
    def text(self) -> str:
        return "".join(self.texts)


class GenerationServing:
    """The served model and its engine, for the handlers that generate text (completions.py, chat.py)."""

    def __init__(self, async_engine: AsyncEngine, tokenizer, model_name: str, context_length: int,
                 metrics: ServerMetrics, tokens: TokenStrings):
        self.engine = async_engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.context_length = context_length
        self.metrics = metrics
        self.tokens = tokens
        eng = async_engine.engine
        # The most tokens (prompt + output) one sequence can hold: the context, or the KV pool if smaller.
        self.token_capacity = min(context_length, eng.allocator.num_blocks * eng.config.block_size)

    def model_card(self) -> ModelCard:
        return ModelCard(id=self.model_name, max_model_len=self.context_length)

    # -- request checks ------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(404, f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def resolve_max_tokens(self, requested: int | None, prompt_len: int, default: int | None,
                           param: str = "max_tokens") -> int:
        if requested is None:
            if default is not None:
                return default
            # Chat without max_tokens: the rest of the context, as OpenAI does.
            if prompt_len >= self.token_capacity:
                raise ApiError(400, f"the prompt ({prompt_len} tokens) leaves no room to generate: the server "
                               f"holds at most {self.token_capacity} tokens per sequence", param="messages")
            return self.token_capacity - prompt_len
        if requested < 1:
            raise ApiError(400, f"{param} must be at least 1, got {requested}", param=param)
        if requested >= self.context_length:
            raise ApiError(400, f"{param} ({requested}) must be less than the model's context length "
                           f"({self.context_length} tokens)", param=param)
        return requested

    async def compile_structured_output(self, so: StructuredOutputParams | None, param: str | None) -> None:
        """Compile a request's constraint (in a worker thread: a new grammar takes milliseconds, the
        first one also builds the grammar engine's view of the vocabulary); a 400 if it does not compile.
        The engine then finds it in its cache."""
        if so is None:
            return
        try:
            await asyncio.to_thread(self.engine.engine.grammars.compile, so)
        except InvalidRequestError as exc:
            raise ApiError(400, f"{param}: {exc}", param=param) from None

    def check_text_fits(self, num_chars: int, param: str) -> None:
        """Refuse text that cannot fit the context before spending time tokenizing it: a text of n
        characters has at least n / (the longest token's length) tokens."""
        at_least = num_chars // self.tokenizer.max_token_chars
        if at_least > self.context_length:
            raise ApiError(400, f"the {param} ({num_chars} characters, at least {at_least} tokens) cannot fit the "
                           f"model's context of {self.context_length} tokens", param=param)

    def sampling_params(self, req: SamplingRequest, max_tokens: int, choice: int,
                        structured_output: StructuredOutputParams | None = None) -> SamplingParams:
        seed = None
        if req.seed is not None:
            seed = req.seed + choice  # so that the n choices differ, reproducibly
            if not -INT64 <= seed < INT64:
                raise ApiError(400, f"seed must be a 64-bit signed integer, got {req.seed}", param="seed")
        # A field the client left out takes SamplingParams' default: the API's defaults live there, once.
        given = {name: getattr(req, name) for name in SAMPLING_FIELDS if getattr(req, name) is not None}
        return SamplingParams(max_tokens=max_tokens, seed=seed, stop=req.stop, stop_token_ids=req.stop_token_ids or [],
                              ignore_eos=bool(req.ignore_eos), structured_output=structured_output, **given)

    def plan(self, req: SamplingRequest, prompts: list[list[int]], default_max_tokens: int | None,
             logprobs: int | None, prompt_logprobs: int | None, max_tokens_param: str = "max_tokens",
             requested_max_tokens: int | None = None,
             structured_output: StructuredOutputParams | None = None) -> list[SubRequest]:
        """One SubRequest per (prompt, choice), every one checked by the engine before any starts."""
        n = req.n or 1
        capacity = self.engine.engine.config.max_num_seqs + self.engine.max_waiting
        if len(prompts) * n > capacity:  # never fits, however long the client waits: a 400, not a 503
            raise ApiError(400, f"this request asks for {len(prompts) * n} sequences ({len(prompts)} prompt(s) x n={n}); "
                           f"the server holds at most {capacity} at once, running and waiting",
                           param="n" if n > 1 else "prompt")
        subs = []
        for p, ids in enumerate(prompts):
            max_tokens = self.resolve_max_tokens(requested_max_tokens, len(ids), default_max_tokens,
                                                 max_tokens_param)
            for i in range(n):
                params = self.sampling_params(req, max_tokens, i, structured_output)
                if i == 0:  # the n choices differ only in their seed: one check per prompt
                    ids = self.engine.engine.check_request(ids, params, logprobs, prompt_logprobs)
                subs.append(SubRequest(p * n + i, p, ids, params))
        return subs

    # -- running -------------------------------------------------------------------------------
    async def run(self, request_id: str, subs: list[SubRequest], logprobs: int | None,
                  prompt_logprobs: int | None) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Run the sub-requests concurrently; yield (choice index, output) as outputs arrive.

        Stops at the first engine error (raising it). Leaving early (a disconnect, a cancellation)
        cancels every pump, and so aborts every engine request still running.
        """
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(sub: SubRequest) -> None:
            try:
                async for out in self.engine.generate(f"{request_id}-{sub.index}", sub.prompt_ids, sub.params,
                                                      logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                                      **sub.engine_args):
                    queue.put_nowait((sub.index, out))
            except Exception as exc:
                queue.put_nowait((sub.index, exc))

        tasks = [asyncio.create_task(pump(sub)) for sub in subs]
        unfinished, failed = len(subs), False
        try:
            while unfinished:
                index, item = await queue.get()
                if isinstance(item, Exception):
                    failed = True
                    raise item
                if item.finished:
                    unfinished -= 1
                    self.metrics.observe_finished(item)
                yield index, item
        finally:
            for task in tasks:
                task.cancel()
            if unfinished and not failed:
                self.metrics.observe_aborted(unfinished)

    async def collect(self, outputs: AsyncIterator[tuple[int, RequestOutput]], num_choices: int) -> list[ChoiceState]:
        choices = [ChoiceState() for _ in range(num_choices)]
        async for index, out in outputs:
            choices[index].add(out)
        if any(c.finish_reason == "abort" for c in choices):
            raise EngineStoppedError("the server shut down before the request finished")
        return choices
