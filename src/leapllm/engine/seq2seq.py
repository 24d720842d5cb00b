"""Generation with an encoder-decoder: encode a batch of sources once, then decode step by step.

Greedy decoding, sampling and beam search follow transformers' `generate()` exactly, so that the
same model and settings give the same tokens:

- lengths: `max_length` counts the decoder start token, `max_new_tokens` does not (it wins when
  both are set); with neither, 20 new tokens (at most the position table's length).
- the logits processors, in transformers' order, on the whole decoder sequence (start token
  included): no_repeat_ngram_size, bad_words_ids (a bad word that is just an EOS token is
  ignored), min_length, forced BOS at the first step, forced EOS at the last possible step; then
  for sampling temperature, top-k and top-p (engine/sampling.py's filters); renormalize_logits
  last (it only changes beam scores).
- beam search: each step scores every beam's log-softmax (processors applied) plus the beam's
  running score, keeps the best 2 * num_beams candidates (more with several EOS ids) so that
  num_beams unfinished ones remain, moves candidates that end (EOS or max_length) among the top
  num_beams into the finished set with score / generated_length ** length_penalty, and stops when
  every source has num_beams finished hypotheses that (by early_stopping's rule) no running beam
  can beat: True stops as soon as there are num_beams finished, False when the best running beam's
  score over the current length cannot beat the worst finished one, "never" when it could not even
  at max_length (for length_penalty > 0).

Caches: the decoder's self-attention keys/values grow by one token per step (reordered by beam in
beam search); the cross-attention keys/values are projected once per request and expanded per
beam once (model/seq2seq.py). Sources finished in greedy/sampling leave the batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from leapllm.engine.sampling import Sampler, SamplingParams
from leapllm.errors import InvalidRequestError
from leapllm.loading.seq2seq_loader import GenerationDefaults
from leapllm.model.seq2seq import Seq2SeqModel

NEG = -1.0e9  # transformers' "not this one" score offset in beam search, kept for identical ordering


@dataclass
class Seq2SeqParams:
    """What to generate; None takes the model's default (generation_config.json / config.json)."""

    max_new_tokens: int | None = None
    max_length: int | None = None  # counts the decoder start token, as transformers' max_length
    min_length: int | None = None  # idem: EOS is forbidden while the decoder sequence is shorter
    num_beams: int | None = None
    length_penalty: float | None = None
    early_stopping: bool | str | None = None  # True, False or "never"
    no_repeat_ngram_size: int | None = None
    bad_words_ids: list[list[int]] | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    decoder_start_token_id: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None


def seq2seq_params_from_sampling(params: SamplingParams) -> Seq2SeqParams:
    """The decoder LLM's SamplingParams as an encoder-decoder's: max_tokens new tokens, greedy at
    temperature 0, else sampling with temperature, top_k, top_p and seed. Settings that have no
    meaning here yet (penalties, stop strings, structured output, ...) are refused, not ignored."""
    default = SamplingParams()
    unsupported = [name for name in ("min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "stop",
                                     "stop_token_ids", "ignore_eos", "truncate_prompt", "structured_output")
                   if getattr(params, name) != getattr(default, name)]
    if unsupported:
        raise InvalidRequestError(f"an encoder-decoder model does not support {', '.join(unsupported)} yet")
    if params.temperature == 0:
        return Seq2SeqParams(max_new_tokens=params.max_tokens, num_beams=1)
    return Seq2SeqParams(max_new_tokens=params.max_tokens, num_beams=1, do_sample=True,
                         temperature=params.temperature, top_k=max(params.top_k, 0), top_p=params.top_p,
                         seed=params.seed)


@dataclass
class GenerationPlan:
    """Seq2SeqParams with the model's defaults filled in and checked."""

    decoder_start_token_id: int
    eos_token_ids: list[int]
    pad_token_id: int
    max_length: int
    min_length: int
    num_beams: int
    length_penalty: float
    early_stopping: bool | str
    no_repeat_ngram_size: int
    bad_words_ids: list[list[int]]
    forced_bos_token_id: int | None
    forced_eos_token_id: int | None
    renormalize_logits: bool
    sampling: SamplingParams | None  # None: greedy (or beam search)


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidRequestError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def plan_generation(params: Seq2SeqParams, defaults: GenerationDefaults, model: Seq2SeqModel) -> GenerationPlan:
    p, d = params, defaults
    vocab = model.config.decoder_vocab_size

    def pick(name):
        value = getattr(p, name)
        return getattr(d, name) if value is None else value

    if p.max_new_tokens is not None:
        max_length = _positive_int("max_new_tokens", p.max_new_tokens) + 1
    elif p.max_length is not None:
        max_length = _positive_int("max_length", p.max_length, 2)
    elif d.max_new_tokens is not None:
        max_length = d.max_new_tokens + 1
    elif d.max_length is not None:
        max_length = d.max_length
    else:  # transformers' default: 20 new tokens, within the position table
        max_length = 21 if model.config.is_t5 else min(21, model.config.max_positions)
    if not model.config.is_t5:  # a learned/sinusoidal table has no row beyond its length
        max_length = min(max_length, model.config.max_positions)
    if max_length < 2:
        raise InvalidRequestError(f"max_length must leave room for a token, got {max_length}")
    num_beams = _positive_int("num_beams", pick("num_beams"))
    early_stopping = pick("early_stopping")
    if early_stopping not in (True, False, "never"):
        raise InvalidRequestError(f"early_stopping must be True, False or \"never\", got {early_stopping!r}")
    length_penalty = pick("length_penalty")
    if not isinstance(length_penalty, (int, float)) or isinstance(length_penalty, bool) or \
            not math.isfinite(length_penalty):
        raise InvalidRequestError(f"length_penalty must be a finite number, got {length_penalty!r}")
    min_length = _positive_int("min_length", pick("min_length"), 0)
    ngram = _positive_int("no_repeat_ngram_size", pick("no_repeat_ngram_size"), 0)
    bad_words = pick("bad_words_ids") or []
    if not isinstance(bad_words, list) or any(
            not isinstance(w, list) or not w or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab
                                                    for t in w) for w in bad_words):
        raise InvalidRequestError(f"bad_words_ids must be non-empty lists of token ids below {vocab}")
    tokens = {}
    for name in ("decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id"):
        value = pick(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab):
            raise InvalidRequestError(f"{name} must be a token id below {vocab}, got {value!r}")
        tokens[name] = value
    sampling = None
    if p.do_sample:
        if num_beams > 1:
            raise InvalidRequestError("sampling with beam search is not supported; use num_beams=1 with do_sample")
        if p.temperature <= 0:
            raise InvalidRequestError(f"temperature must be > 0 when sampling, got {p.temperature}")
        sampling = SamplingParams(max_tokens=max_length - 1, temperature=p.temperature, top_k=p.top_k,
                                  top_p=p.top_p, seed=p.seed)
    return GenerationPlan(
        decoder_start_token_id=tokens["decoder_start_token_id"], eos_token_ids=list(d.eos_token_ids),
        pad_token_id=d.pad_token_id, max_length=max_length, min_length=min_length, num_beams=num_beams,
        length_penalty=float(length_penalty), early_stopping=early_stopping, no_repeat_ngram_size=ngram,
        # A bad word that is only an EOS token would stop nothing from ending: transformers drops it.
        bad_words_ids=[w for w in bad_words if not (len(w) == 1 and w[0] in d.eos_token_ids)],
        forced_bos_token_id=tokens["forced_bos_token_id"], forced_eos_token_id=tokens["forced_eos_token_id"],
        renormalize_logits=d.renormalize_logits, sampling=sampling)


def process_scores(plan: GenerationPlan, sequences: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The logits processors on (rows, vocab) scores given each row's decoder sequence so far
    (rows, cur_len), start token included; transformers' order and conditions."""
    cur_len = sequences.shape[1]
    n = plan.no_repeat_ngram_size
    if n > 0 and cur_len >= n:
        # Every earlier n-gram whose first n-1 tokens equal the last n-1 bans its last token.
        windows = sequences.unfold(1, n, 1)  # (rows, cur_len - n + 1, n)
        matches = (windows[..., :-1] == sequences[:, None, cur_len - n + 1:]).all(dim=-1)
        rows, which = matches.nonzero(as_tuple=True)
        if rows.numel():
            scores = scores.index_put((rows, windows[rows, which, -1]), torch.tensor(-math.inf, dtype=scores.dtype))
    for word in plan.bad_words_ids:
        prefix = word[:-1]
        if len(prefix) > cur_len:
            continue
        if prefix:
            hit = (sequences[:, cur_len - len(prefix):] == torch.tensor(prefix, device=sequences.device)).all(dim=-1)
            scores = scores.clone()
            scores[hit, word[-1]] = -math.inf
        else:
            scores = scores.clone()
            scores[:, word[-1]] = -math.inf
    if cur_len < plan.min_length and plan.eos_token_ids:
        scores = scores.clone()
        scores[:, plan.eos_token_ids] = -math.inf
    if plan.forced_bos_token_id is not None and cur_len == 1:
        scores = torch.full_like(scores, -math.inf)
        scores[:, plan.forced_bos_token_id] = 0
    if plan.forced_eos_token_id is not None and cur_len == plan.max_length - 1:
        scores = torch.full_like(scores, -math.inf)
        scores[:, plan.forced_eos_token_id] = 0
    return scores


@dataclass
class GeneratedIds:
    token_ids: list[list[int]]  # per source: the generated tokens (no start token; the EOS if it ended)
    finish_reasons: list[str]  # "stop" (EOS) or "length"
    scores: list[float | None]  # beam search: the returned hypothesis' length-penalized score
    timings: dict[str, float] = field(default_factory=dict)


def _finish(tokens: list[int], plan: GenerationPlan) -> tuple[list[int], str]:
    for i, t in enumerate(tokens):
        if t in plan.eos_token_ids:
            return tokens[:i + 1], "stop"
    return tokens, "length"


# on_step(sources, tokens): the batch indices of the sources still generating and the token each just got.
StepCallback = Callable[[list[int], list[int]], None]


@torch.inference_mode()
def generate_ids(model: Seq2SeqModel, source_ids: list[list[int]], plan: GenerationPlan,
                 on_step: StepCallback | None = None) -> GeneratedIds:
    """Generate for a batch of tokenized sources (each with its special tokens).

    `on_step` (greedy and sampling; for streaming) is called after every decoding step; an exception
    it raises stops the batch. Beam search never calls it: a beam's tokens are final only at the end."""
    if not source_ids or any(not ids for ids in source_ids):
        raise InvalidRequestError("every source must have at least one token")
    limit = model.config.max_source_tokens
    longest = max(len(ids) for ids in source_ids)
    if limit is not None and longest > limit:
        raise InvalidRequestError(f"a source has {longest} tokens; this model reads at most {limit}")
    device = model.device
    width = longest
    input_ids = torch.tensor([ids + [plan.pad_token_id] * (width - len(ids)) for ids in source_ids], device=device)
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in source_ids], device=device)
    start = time.perf_counter()
    encoded = model.encode(input_ids, mask)
    if device.type == "cuda":
        torch.cuda.synchronize()
    encoded_at = time.perf_counter()
    if plan.num_beams > 1:
        out = _beam_search(model, encoded, plan)
    else:
        out = _greedy_or_sample(model, encoded, plan, on_step)
    end = time.perf_counter()
    generated = sum(len(t) for t in out.token_ids)
    out.timings = {"encode_s": encoded_at - start, "decode_s": end - encoded_at, "total_s": end - start,
                   "source_tokens": float(sum(len(ids) for ids in source_ids)), "generated_tokens": float(generated),
                   "decode_tokens_per_s": generated / (end - encoded_at) if end > encoded_at else 0.0}
    return out


def _greedy_or_sample(model: Seq2SeqModel, encoded, plan: GenerationPlan,
                      on_step: StepCallback | None = None) -> GeneratedIds:
    batch = encoded.hidden.shape[0]
    device = encoded.hidden.device
    cache = model.new_cache(encoded, capacity=plan.max_length)
    sequences = torch.full((batch, 1), plan.decoder_start_token_id, dtype=torch.long, device=device)
    results: list[list[int] | None] = [None] * batch
    active = list(range(batch))  # the sources still generating, in cache row order
    eos = torch.tensor(plan.eos_token_ids, dtype=torch.long, device=device)
    # Sampling: temperature / top-k / top-p as engine/sampling.py filters them, one seeded stream
    # for the batch, drawn row by row in source order.
    sampler = None if plan.sampling is None else Sampler(plan.sampling, [], model.config.decoder_vocab_size, device)
    while True:
        logits = model.decode(sequences[:, -1:], cache, last_only=True).logits[:, -1].float()
        scores = process_scores(plan, sequences, logits)
        if sampler is None:
            next_tokens = scores.argmax(dim=-1)  # the first on ties, as transformers
        else:
            next_tokens = torch.stack([torch.multinomial(sampler.filtered_probs(row), 1, generator=sampler.generator)[0]
                                       for row in scores])
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
        if on_step is not None:
            on_step(active, next_tokens.tolist())
        ended = torch.isin(next_tokens, eos) if eos.numel() else torch.zeros_like(next_tokens, dtype=torch.bool)
        if sequences.shape[1] >= plan.max_length:
            ended = torch.ones_like(ended)
        if bool(ended.any()):
            done = ended.tolist()
            for row, finished in enumerate(done):
                if finished:
                    results[active[row]] = sequences[row, 1:].tolist()
            keep = [row for row, finished in enumerate(done) if not finished]
            if not keep:
                break
            rows = torch.tensor(keep, device=device)
            cache.select(rows)
            sequences = sequences[rows]
            active = [active[row] for row in keep]
    finished = [_finish(tokens, plan) for tokens in results]
    return GeneratedIds([t for t, _ in finished], [r for _, r in finished], [None] * batch)


def _beam_search(model: Seq2SeqModel, encoded, plan: GenerationPlan) -> GeneratedIds:
    batch, beams = encoded.hidden.shape[0], plan.num_beams
    device = encoded.hidden.device
    vocab = model.config.decoder_vocab_size
    max_length, penalty, early = plan.max_length, plan.length_penalty, plan.early_stopping
    candidates = max(2, 1 + len(plan.eos_token_ids)) * beams
    is_top_beam = torch.arange(candidates, device=device) < beams  # (candidates,)
    eos = torch.tensor(plan.eos_token_ids, dtype=torch.long, device=device)
    row_offset = torch.arange(batch, device=device)[:, None] * beams

    cache = model.new_cache(encoded, capacity=max_length, beams=beams)
    fill = plan.pad_token_id
    running = torch.full((batch, beams, max_length), fill, dtype=torch.long, device=device)
    running[:, :, 0] = plan.decoder_start_token_id
    # Only beam 0 is live at first: the others would repeat its candidates.
    running_scores = torch.zeros((batch, beams), device=device)
    running_scores[:, 1:] = NEG
    finished = running.clone()
    finished_scores = torch.full((batch, beams), NEG, device=device)
    finished_lengths = torch.ones((batch, beams), dtype=torch.long, device=device)
    is_finished = torch.zeros((batch, beams), dtype=torch.bool, device=device)
    can_improve = torch.ones((batch, 1), dtype=torch.bool, device=device)

    def gather(t, index):  # pick along the beam dimension: t (batch, n, ...), index (batch, k)
        while index.dim() < t.dim():
            index = index.unsqueeze(-1)
        return torch.take_along_dim(t, index, dim=1)

    cur_len = 1
    while True:
        flat = running[:, :, :cur_len].reshape(batch * beams, cur_len)
        logits = model.decode(flat[:, -1:], cache, last_only=True).logits[:, -1].float()
        log_probs = process_scores(plan, flat, F.log_softmax(logits, dim=-1))
        if plan.renormalize_logits:
            log_probs = log_probs.log_softmax(dim=-1)
        totals = (log_probs.view(batch, beams, vocab) + running_scores[:, :, None]).view(batch, beams * vocab)

        # The best candidates over all beams, and the sequences they make.
        top_scores, top_index = torch.topk(totals, candidates)  # (batch, candidates)
        from_beam, tokens = top_index // vocab, top_index % vocab
        cand = gather(running, from_beam)
        cand[:, :, cur_len] = tokens
        ends = torch.isin(tokens, eos) if eos.numel() else torch.zeros_like(tokens, dtype=torch.bool)
        if cur_len + 1 >= max_length:
            ends = torch.ones_like(ends)

        # The beams that go on: the best candidates that did not end.
        open_scores = top_scores + ends.to(torch.float32) * NEG
        keep = torch.topk(open_scores, beams).indices
        running = gather(cand, keep)
        running_scores = gather(open_scores, keep)
        parents = gather(from_beam, keep)

        # The finished set: candidates that ended among the top num_beams, by penalized score.
        just_finished = ends & is_top_beam[None, :]
        scores = top_scores / ((cur_len + 1 - 1) ** penalty)  # generated length, the EOS included
        scores += (torch.all(is_finished, dim=-1, keepdim=True) & (early is True)).to(torch.float32) * NEG
        scores += (~can_improve).to(torch.float32) * NEG
        scores += (~just_finished) * NEG
        merged_scores = torch.cat([finished_scores, scores], dim=1)
        best = torch.topk(merged_scores, beams).indices
        finished = gather(torch.cat([finished, cand], dim=1), best)
        finished_scores = gather(merged_scores, best)
        finished_lengths = gather(torch.cat([finished_lengths, torch.full_like(tokens, cur_len + 1)], dim=1), best)
        is_finished = gather(torch.cat([is_finished, just_finished], dim=1), best)

        cache.reorder((parents + row_offset).reshape(-1))
        cur_len += 1
        # Could a running beam still beat the worst finished hypothesis?
        best_length = (max_length - 1) if (early == "never" and penalty > 0.0) else (cur_len - 1)
        best_running = running_scores[:, :1] / (best_length ** penalty)
        worst_finished = torch.where(is_finished, torch.min(finished_scores, dim=1, keepdim=True)[0], NEG)
        can_improve = can_improve & torch.any(best_running > worst_finished, dim=-1, keepdim=True)
        go_on = bool(can_improve.any()) and not (bool(is_finished.all()) and early is True) and not bool(ends.all())
        if not go_on:
            break

    token_ids, reasons = [], []
    for b in range(batch):
        length = int(finished_lengths[b, 0])
        tokens, reason = _finish(finished[b, 0, 1:length].tolist(), plan)
        token_ids.append(tokens)
        reasons.append(reason)
    return GeneratedIds(token_ids, reasons, [float(s) for s in finished_scores[:, 0]])
