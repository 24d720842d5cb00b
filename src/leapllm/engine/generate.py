"""Single-sequence generation: prefill the prompt once, then decode one token per step from the
KV cache, detokenizing incrementally and watching for stop tokens and stop strings.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from leapllm.engine.sampling import Sampler, SamplingParams
from leapllm.errors import InvalidRequestError
from leapllm.model.llama import Transformer
from leapllm.tokenization import IncrementalDetokenizer, Tokenizer


@dataclass
class GenerationChunk:
    """One streamed step: the new text (possibly empty) and, on the last chunk, why it ended."""
    text: str
    token_id: int | None
    finish_reason: str | None = None  # "stop" or "length" on the last chunk
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it


@dataclass
class GenerationOutput:
    prompt: str
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    timings: dict[str, float] = field(default_factory=dict)


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
        hold = 0
        for s in self.stops:  # longest suffix of text that is a proper prefix of a stop string
            for n in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:n]):
                    hold = n
                    break
        safe_end = max(self.emitted, len(self.text) - hold)
        out, self.emitted = self.text[self.emitted:safe_end], safe_end
        return out, None

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out


def _drain(watcher: StopStringWatcher, detok: IncrementalDetokenizer) -> tuple[str, str | None]:
    """At the end: the text still held back by the detokenizer and the stop-string watcher."""
    text, stop = watcher.add(detok.flush())
    return (text, stop) if stop is not None else (text + watcher.flush(), None)


@torch.inference_mode()
def generate_stream(model: Transformer, tokenizer: Tokenizer, prompt_ids: list[int],
                    params: SamplingParams) -> Iterator[GenerationChunk]:
    """Yield GenerationChunks for one prompt; the last one carries finish_reason and stop_reason."""
    config = model.config
    prompt_ids = fit_prompt(prompt_ids, params, config.context_length)
    bad = [t for t in prompt_ids if not 0 <= t < config.vocab_size]
    if bad:
        raise InvalidRequestError(f"prompt token id {bad[0]} is outside the vocabulary (0..{config.vocab_size - 1})")
    stop_ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        stop_ids |= set(tokenizer.stop_token_ids)
    device = model.device
    cache = model.new_kv_cache(1, len(prompt_ids) + params.max_tokens)
    sampler = Sampler(params, prompt_ids, config.vocab_size, device)
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    watcher = StopStringWatcher(params.stop)

    logits = model(torch.tensor([prompt_ids], device=device), 0, cache, last_only=True)
    pos = len(prompt_ids)
    for step in range(params.max_tokens):
        token = sampler.sample(logits[0, -1])
        sampler.record(token)
        if token in stop_ids:
            tail, stop = _drain(watcher, detok)
            yield GenerationChunk(tail, token, "stop", stop or token)
            return
        text, stop = watcher.add(detok.push(token))
        if stop is not None:
            yield GenerationChunk(text, token, "stop", stop)
            return
        if step == params.max_tokens - 1:
            tail, stop = _drain(watcher, detok)
            yield GenerationChunk(text + tail, token, "stop" if stop else "length", stop)
            return
        yield GenerationChunk(text, token)
        logits = model(torch.tensor([[token]], device=device), pos, cache, last_only=True)
        pos += 1
