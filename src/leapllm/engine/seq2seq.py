"""Generation settings of an encoder-decoder, and their form as the engine's requests.

Greedy decoding, sampling and beam search follow transformers' `generate()` exactly, so that the
same model and settings give the same tokens:

- lengths: `max_length` counts the decoder start token, `max_new_tokens` does not (it wins when
  both are set); with neither, 20 new tokens (at most the position table's length).
- the logits processors, in transformers' order, on the whole decoder sequence (start token
  included): no_repeat_ngram_size, bad_words_ids (a bad word that is just an EOS token is
  ignored), min_length, forced BOS at the first step, forced EOS at the last possible step; then
  for sampling temperature, top-k and top-p (engine/sampling.py's filters); renormalize_logits
  last (it only changes beam scores).
- beam search: engine/beam_search.py.

Every search runs on the batching engine (engine/llm_engine.py), as a decoder LLM's requests do:
`engine_request` turns a plan into the decoder's start token, SamplingParams, the processors above
and the beam search settings; the engine's paged pools hold the decoder's keys and values and each
source's cross-attention keys and values (shared by its beams).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from leapllm.engine.beam_search import BeamSearchParams
from leapllm.engine.request import LogitsProcessor
from leapllm.engine.sampling import SamplingParams
from leapllm.errors import InvalidRequestError
from leapllm.loading.seq2seq_loader import GenerationDefaults
from leapllm.model.seq2seq import Seq2SeqModel


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


class DecoderTokenizer:
    """An encoder-decoder's tokenizer as the engine's requests read it: generated ids to text
    (special tokens skipped, as Seq2SeqLM's texts) and the EOS ids that end a request."""

    def __init__(self, tokenizer, eos_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.stop_token_ids = list(eos_token_ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids))


@dataclass
class EngineRequest:
    """A plan as the engine's request (LLMEngine.add_request's arguments besides the id and source)."""
    prompt_ids: list[int]  # the decoder's start token
    params: SamplingParams  # max_length - 1 new tokens; temperature 0 for greedy and beam search
    logits_processor: LogitsProcessor | None  # the plan's rules when it samples or is greedy
    beam_search: BeamSearchParams | None  # the search and its rules, with num_beams > 1


def engine_request(plan: GenerationPlan) -> EngineRequest:
    params = plan.sampling or SamplingParams(max_tokens=plan.max_length - 1, temperature=0.0)
    rules = (plan.no_repeat_ngram_size > 0 or plan.bad_words_ids or (plan.min_length > 1 and plan.eos_token_ids)
             or plan.forced_bos_token_id is not None or plan.forced_eos_token_id is not None)
    processor = None
    if rules:
        def processor(sequences: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            return process_scores(plan, sequences, scores)
    prompt = [plan.decoder_start_token_id]
    if plan.num_beams == 1:
        return EngineRequest(prompt, params, processor, None)
    beams = BeamSearchParams(plan.num_beams, plan.length_penalty, plan.early_stopping, plan.renormalize_logits,
                             processor)
    return EngineRequest(prompt, params, None, beams)


def source_params(request: EngineRequest, index: int) -> SamplingParams:
    """The SamplingParams of the request's index-th source (or choice): a seeded one draws with
    seed + index, so that sources and choices differ, reproducibly (the LLM server's rule)."""
    params = request.params
    if params.seed is None:
        return params
    return dataclasses.replace(params, seed=params.seed + index)


@dataclass
class GeneratedIds:
    token_ids: list[list[int]]  # per source: the generated tokens (no start token; the EOS if it ended)
    finish_reasons: list[str]  # "stop" (EOS) or "length"
    scores: list[float | None]  # beam search: the returned hypothesis' length-penalized score
    timings: dict[str, float] = field(default_factory=dict)
