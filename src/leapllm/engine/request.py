"""One request's state, the same for every path: `LLM.run`/`stream`/`chat`, `LLM.generate`, the
server. It holds the prompt, the sampler, where its keys and values are, and the one copy of the
rules that end a request: stop tokens, stop strings (held back until they cannot be one), the
incremental detokenizer and max_tokens. The engine appends each sampled token with `append_token`
and reports the text and finish reason it returns.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from leapllm.engine.sampling import Sampler, SamplingParams
from leapllm.errors import InvalidRequestError
from leapllm.tokenization import IncrementalDetokenizer, Tokenizer, partial_match_len


def fit_prompt(prompt_ids: list[int], params: SamplingParams, context_length: int) -> list[int]:
    """Check that prompt + max_tokens fits the context; truncate from the left only when asked."""
    if not prompt_ids:
        raise InvalidRequestError("the prompt is empty (no tokens)")
    if params.max_tokens >= context_length:
        raise InvalidRequestError(
            f"max_tokens {params.max_tokens} leaves no room for the prompt in a context of {context_length} tokens"
        )
    if len(prompt_ids) + params.max_tokens <= context_length:
        return prompt_ids
    if params.truncate_prompt:
        return prompt_ids[len(prompt_ids) + params.max_tokens - context_length:]
    raise InvalidRequestError(
        f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context length "
        f"of {context_length} tokens; shorten the prompt, lower max_tokens, or allow truncation"
    )


def check_token_ids(prompt_ids: list[int], vocab_size: int) -> None:
    bad = [t for t in prompt_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")


class StopStringWatcher:
    """Holds back text that might be the start of a stop string, so a stop string is never emitted."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.text = ""
        self.emitted = 0
        self.longest = max((len(s) for s in stops), default=0)

    def add(self, piece: str) -> tuple[str, str | None]:
        """Append decoded text; return (text safe to emit now, the stop string hit or None)."""
        self.text += piece
        if not self.stops:
            out, self.emitted = self.text[self.emitted:], len(self.text)
            return out, None
        search_from = max(0, self.emitted - self.longest)
        hits = [(i, s) for s in self.stops if (i := self.text.find(s, search_from)) != -1]
        if hits:
            idx, stop = min(hits)
            out = self.text[self.emitted:idx]
            self.emitted = len(self.text)
            return out, stop
        hold = max(partial_match_len(self.text, s) for s in self.stops)
        safe_end = max(self.emitted, len(self.text) - hold)
        out, self.emitted = self.text[self.emitted:safe_end], safe_end
        return out, None

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out


# (token ids of each row's sequence so far, prompt included (rows, length); their next-token
# scores (rows, vocab)) -> the scores to sample or search from: an encoder-decoder's generation
# rules (engine/seq2seq.py), applied before temperature and top-k/top-p as transformers'
# logits processors are.
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class RequestStatus(enum.Enum):
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
    score: float | None = None  # beam search: the returned hypothesis' length-penalized log-probability


class Request:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, tokenizer: Tokenizer,
                 vocab_size: int, device, *, logprobs: int | None = None, prompt_logprobs: int | None = None,
                 matcher=None, encoder_ids: list[int] | None = None, logits_processor: LogitsProcessor | None = None):
        self.request_id = request_id
        self.prompt_ids = prompt_ids  # an encoder-decoder's: the decoder's first tokens (its start token)
        self.encoder_ids = encoder_ids  # an encoder-decoder's source, special tokens included
        self.logits_processor = logits_processor
        self.output_ids: list[int] = []
        self.params = params
        self.sampler = Sampler(params, prompt_ids, vocab_size, device)
        self.stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self.stop_ids |= set(tokenizer.stop_token_ids)
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        self.watcher = StopStringWatcher(params.stop)
        self.matcher = matcher  # an llguidance LLMatcher when the output is constrained (structured_output.py)
        self.logprobs = logprobs
        self.prompt_logprobs = prompt_logprobs
        self.prompt_logprob_values: list[TokenLogprob | None] = [None]  # the first token has no context
        self.status = RequestStatus.WAITING
        self.block_tables: list[list[int]] = []  # per KV group (scheduler.py), the blocks of its positions
        self.block_hashes: list[int] = []
        self.num_computed = 0  # tokens whose keys/values are in the cache
        self.num_cached_tokens = 0  # of those, served by the prefix cache at admission
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.num_preemptions = 0
        self.prompt_logprobs_sent = False
        # Speculative decoding (set by the engine when it speculates): when and how many tokens to
        # propose, and the proposer (an n-gram index, or the draft model's sampler and progress).
        self.controller = None
        self.ngram = None
        self.draft_sampler = None
        self.draft_computed = 0
        self.spec_step: tuple[int, int] = (0, 0)  # (proposed, kept) in the last verification
        self.beam_group = None  # beam search (beam_search.py): the search this sequence is a beam of

    @property
    def width(self) -> int:
        """How many sequences the request runs as: its beams in beam search, else 1."""
        return self.beam_group.num_beams if self.beam_group is not None else 1

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:  # a decode step: no copy of the whole sequence
            return self.output_ids[start - n:end - n]
        return (self.prompt_ids + self.output_ids)[start:end]

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def needs_prompt_logprobs(self) -> bool:
        return self.prompt_logprobs is not None and len(self.prompt_logprob_values) < len(self.prompt_ids)

    def append_token(self, token: int) -> tuple[str, tuple[str, int | str | None] | None]:
        """Add a sampled token: (the text it makes safe to emit, (finish_reason, stop_reason) or None).

        The one place that decides when a request ends: a stop token, a stop string (never emitted,
        nor anything after it), a constraint that is complete, or max_tokens reached."""
        self.output_ids.append(token)
        if token in self.stop_ids:
            tail, stop = self._drain()
            return tail, ("stop", stop if stop is not None else token)
        text, stop = self.watcher.add(self.detok.push(token))
        if stop is not None:
            return text, ("stop", stop)
        if self.matcher is not None:
            self.matcher.consume_token(token)
            # Complete (nothing can follow), or broken by a token it refused (never sampled) or a limit.
            if self.matcher.is_stopped():
                tail, stop = self._drain()
                return text + tail, ("stop", stop)
        if len(self.output_ids) >= self.params.max_tokens:
            tail, stop = self._drain()
            return text + tail, ("stop" if stop else "length", stop)
        return text, None

    def _drain(self) -> tuple[str, str | None]:
        """At the end: the text still held back by the detokenizer and the stop-string watcher."""
        text, stop = self.watcher.add(self.detok.flush())
        return (text, stop) if stop is not None else (text + self.watcher.flush(), None)
