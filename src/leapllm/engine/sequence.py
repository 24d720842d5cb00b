"""A request's state inside the serving engine, and what the engine reports about it each step."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from leapllm.engine.generate import StopStringWatcher
from leapllm.engine.sampling import Sampler, SamplingParams
from leapllm.tokenization import IncrementalDetokenizer, Tokenizer


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # the most likely tokens and their logprobs


@dataclass
class RequestOutput:
    """What one engine step added to one request (a delta); `finished` on its last one."""
    request_id: str
    new_token_ids: list[int]
    new_text: str
    prompt_token_ids: list[int]
    num_output_tokens: int
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string
    new_logprobs: list[TokenLogprob] | None = None  # one per new token, when logprobs were asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the first output, when asked for
    arrival_time: float = 0.0
    first_token_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache


class Sequence:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, tokenizer: Tokenizer,
                 vocab_size: int, device, *, logprobs: int | None = None, prompt_logprobs: int | None = None):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.output_ids: list[int] = []
        self.params = params
        self.sampler = Sampler(params, prompt_ids, vocab_size, device)
        self.stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self.stop_ids |= set(tokenizer.stop_token_ids)
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        self.watcher = StopStringWatcher(params.stop)
        self.logprobs = logprobs
        self.prompt_logprobs = prompt_logprobs
        self.prompt_logprob_values: list[TokenLogprob | None] = [None]  # the first token has no context
        self.status = SequenceStatus.WAITING
        self.blocks: list[int] = []
        self.block_hashes: list[int] = []
        self.num_computed = 0  # tokens whose keys/values are in the cache
        self.num_cached_tokens = 0  # of those, served by the prefix cache at admission
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.num_preemptions = 0
        self.prompt_logprobs_sent = False
        # Speculative decoding (set by the engine when it speculates): when and how many tokens to
        # propose, the n-gram index or the draft model's sampler, and how far the draft has read.
        self.controller = None
        self.ngram = None
        self.draft_sampler = None
        self.draft_computed = 0
        self.spec_step: tuple[int, int] = (0, 0)  # (proposed, kept) in the last verification

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        return (self.prompt_ids + self.output_ids)[start:end]

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def needs_prompt_logprobs(self) -> bool:
        return self.prompt_logprobs is not None and len(self.prompt_logprob_values) < len(self.prompt_ids)
