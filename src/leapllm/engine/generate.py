"""Single-sequence generation: prefill the prompt once, then decode one token per step from the
KV cache, detokenizing incrementally and watching for stop tokens and stop strings.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from leapllm.engine.sampling import Sampler, SamplingParams
from leapllm.engine.speculative import (DraftModelProposer, NgramProposer, SpeculationController,
                                        SpeculativeConfig, verify_proposals)
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


def add_counts(stats: dict, **counts) -> None:
    for key, value in counts.items():
        stats[key] = stats.get(key, 0) + value


def _drain(watcher: StopStringWatcher, detok: IncrementalDetokenizer) -> tuple[str, str | None]:
    """At the end: the text still held back by the detokenizer and the stop-string watcher."""
    text, stop = watcher.add(detok.flush())
    return (text, stop) if stop is not None else (text + watcher.flush(), None)


@torch.inference_mode()
def generate_stream(model: Transformer, tokenizer: Tokenizer, prompt_ids: list[int],
                    params: SamplingParams, speculative: SpeculativeConfig | None = None,
                    stats: dict | None = None) -> Iterator[GenerationChunk]:
    """Yield GenerationChunks for one prompt; the last one carries finish_reason and stop_reason.

    With `speculative`, proposals (n-gram lookup or a draft model) are verified by the target in one
    pass over several positions (engine/speculative.py): the output is what plain decoding gives
    (greedy: the same tokens; sampled: the same distribution). `stats`, if given, accumulates what
    speculation did: tokens proposed and accepted, verification and plain steps, and the seconds
    spent proposing (propose_s), verifying (verify_s: the target's pass over k + 1 positions and the
    acceptance rule) and in plain steps (plain_s).
    """
    config = model.config
    prompt_ids = fit_prompt(prompt_ids, params, config.context_length)
    bad = [t for t in prompt_ids if not 0 <= t < config.vocab_size]
    if bad:
        raise InvalidRequestError(f"prompt token id {bad[0]} is outside the vocabulary (0..{config.vocab_size - 1})")
    stop_ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        stop_ids |= set(tokenizer.stop_token_ids)
    device = model.device
    max_len = len(prompt_ids) + params.max_tokens
    cache = model.new_kv_cache(1, max_len)
    sampler = Sampler(params, prompt_ids, config.vocab_size, device)
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    watcher = StopStringWatcher(params.stop)
    proposer = controller = None
    if speculative is not None:
        speculative.validate()
        controller = SpeculationController(speculative.num_speculative_tokens, speculative.adaptive,
                                            catches_up=speculative.method == "draft")
        if speculative.method == "ngram":
            proposer = NgramProposer(speculative.ngram_max, speculative.ngram_min)
        else:
            proposer = DraftModelProposer(speculative.draft_model, params, sampler, max_len)

    logits = model(torch.tensor([prompt_ids], device=device), 0, cache, last_only=True)
    if isinstance(proposer, DraftModelProposer):
        proposer.prefill(prompt_ids)
    token = sampler.sample(logits[0, -1])
    sampler.record(token)
    pending = [token]  # sampled (and recorded), not yet emitted
    ids = list(prompt_ids)
    pos = len(prompt_ids)  # the cache holds positions < pos; the last pending token is not in it
    while True:
        for token in pending:
            ids.append(token)
            if token in stop_ids:
                tail, stop = _drain(watcher, detok)
                yield GenerationChunk(tail, token, "stop", stop or token)
                return
            text, stop = watcher.add(detok.push(token))
            if stop is not None:
                yield GenerationChunk(text, token, "stop", stop)
                return
            if len(ids) - len(prompt_ids) == params.max_tokens:
                tail, stop = _drain(watcher, detok)
                yield GenerationChunk(text + tail, token, "stop" if stop else "length", stop)
                return
            yield GenerationChunk(text, token)
        started = time.perf_counter()
        proposals, draft_probs = [], None
        if controller is not None:
            # Never propose past max_tokens: the step emits at most k + 1 tokens.
            k = min(controller.num_tokens(), params.max_tokens - (len(ids) - len(prompt_ids)) - 1)
            if k > 0 and isinstance(proposer, NgramProposer):
                proposals = proposer.propose(ids, k)
            elif k > 0:
                proposals, draft_probs = proposer.propose(ids, k)
        proposed_at = time.perf_counter()
        if proposals:
            step = torch.tensor([[ids[-1]] + proposals], device=device)
            logits = model(step, pos, cache)  # (1, k + 1, vocab): the target at every proposed position
            pending = verify_proposals(sampler, logits[0], proposals, draft_probs)
            kept = len(pending) - 1
            if isinstance(proposer, DraftModelProposer):
                proposer.accepted(kept)
            done = time.perf_counter()
            controller.record_speculative(done - started, len(proposals), kept)
            if stats is not None:
                add_counts(stats, proposed=len(proposals), accepted=kept, speculative_steps=1,
                           propose_s=proposed_at - started, verify_s=done - proposed_at)
        else:
            logits = model(torch.tensor([[ids[-1]]], device=device), pos, cache, last_only=True)
            token = sampler.sample(logits[0, -1])
            sampler.record(token)
            pending = [token]
            done = time.perf_counter()
            if controller is not None:
                controller.record_plain(done - started)
                if stats is not None:
                    add_counts(stats, plain_steps=1, plain_s=done - proposed_at, propose_s=proposed_at - started)
        pos += len(pending)
