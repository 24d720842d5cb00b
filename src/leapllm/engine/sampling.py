"""Sampling parameters and the sampler that turns logits into the next token.

Semantics follow vLLM / the OpenAI API: the repetition penalty looks at prompt and output, the
presence and frequency penalties at the output only; then temperature, top-k, top-p and min-p
filter the distribution, and a seeded generator makes sampling reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from leapllm.engine.structured_output import StructuredOutputParams
from leapllm.errors import InvalidRequestError

# dtypes NumPy holds as they are (no bfloat16)
_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """The argmax of each row of (rows, vocab) logits, the first on ties (as torch.argmax).

    On the CPU through NumPy, whose argmax over a vocabulary-wide row is an order of magnitude
    faster than torch.argmax's there: a visible share of a batch-1 decode step otherwise
    (benchmarks/README.md)."""
    if logits.device.type == "cpu" and logits.dtype in _NUMPY_DTYPES:
        return logits.detach().numpy().argmax(axis=-1).tolist()
    return logits.argmax(dim=-1).tolist()


def greedy_token(logits: torch.Tensor) -> int:
    """The argmax of (vocab,) logits (see greedy_tokens)."""
    return greedy_tokens(logits[None])[0]


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 (or -1) disables
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in prompt or output
    presence_penalty: float = 0.0  # OpenAI semantics, on output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None  # stop strings; the stop string itself is not returned
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    truncate_prompt: bool = False  # drop the oldest prompt tokens instead of failing when too long
    # Hold the output to a JSON schema, regex, choice or grammar (structured_output.py).
    structured_output: StructuredOutputParams | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        def bad(msg: str):
            raise InvalidRequestError(msg)

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            bad(f"temperature must be in [0, 100], got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad(f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0.0 < self.repetition_penalty < float("inf"):
            bad(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                bad(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not -2**63 <= self.seed < 2**64):
            bad(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop strings must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids must be non-negative integers")
        if self.structured_output is not None and not isinstance(self.structured_output, StructuredOutputParams):
            bad("structured_output must be a StructuredOutputParams")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Samples one sequence's tokens; keeps the token counts the penalties need."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int, device: torch.device):
        self.params = params
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)
        self.needs_counts = (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
                             or params.frequency_penalty != 0.0)
        if self.needs_counts:
            self.output_counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            ids = torch.tensor([i for i in prompt_ids if i < vocab_size], dtype=torch.long, device=device)
            self.seen[ids] = True

    def record(self, token_id: int) -> None:
        if self.needs_counts:
            self.output_counts[token_id] += 1
            self.seen[token_id] = True

    def apply_penalties(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if not self.needs_counts:
            return logits
        if p.repetition_penalty != 1.0:
            penalized = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self.seen, penalized, logits)
        if p.frequency_penalty or p.presence_penalty:
            logits = logits - p.frequency_penalty * self.output_counts
            logits = logits - p.presence_penalty * (self.output_counts > 0).float()
        return logits

    def sample(self, logits: torch.Tensor) -> int:
        """logits: (vocab,) float32 -> token id."""
        return sample_rows([self], logits[None])[0]

    def filtered_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution sampling draws from, after penalties were applied: (vocab,) logits ->
        (vocab,) probabilities with temperature, top-k, top-p and min-p applied (not for greedy)."""
        return filtered_probs([self.params], logits[None])[0]

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """What `sample` would draw from given these (vocab,) logits and the tokens recorded so far,
        as (vocab,) float32 probabilities (one-hot at the argmax when greedy). Unnormalized after
        top-p / min-p filtering, as torch.multinomial accepts."""
        logits = self.apply_penalties(logits)
        if self.params.greedy:
            one_hot = torch.zeros_like(logits)
            one_hot[greedy_token(logits)] = 1.0
            return one_hot
        return self.filtered_probs(logits)


def filtered_probs(params: list[SamplingParams], logits: torch.Tensor) -> torch.Tensor:
    """(rows, vocab) logits -> the probabilities row i draws from under params[i]: temperature, then
    top-k (ties with the k-th kept), softmax, top-p (the smallest set whose mass reaches it; the first
    token always survives), min-p. Unnormalized after top-p / min-p, as torch.multinomial accepts."""
    device, vocab = logits.device, logits.shape[-1]
    logits = logits / torch.tensor([p.temperature for p in params], device=device)[:, None]
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(ks):
        k = torch.tensor(ks, device=device)[:, None]
        kth = torch.topk(logits, max(ks), dim=-1).values.gather(1, (k - 1).clamp(min=0))  # (rows, 1)
        logits = logits.masked_fill((logits < kth) & (k > 0), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if any(p.top_p < 1.0 for p in params):
        sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
        probs = torch.zeros_like(probs).scatter_(1, order, top_p_filter(params, sorted_probs))
    return min_p_filter(params, probs, probs.amax(dim=-1, keepdim=True))


def top_p_filter(params: list[SamplingParams], sorted_probs: torch.Tensor) -> torch.Tensor:
    """Top-p on (rows, C) probabilities sorted most likely first: the smallest set whose mass reaches
    it is kept (the first token always survives); rows without top-p keep everything."""
    if not any(p.top_p < 1.0 for p in params):
        return sorted_probs
    top_p = torch.tensor([p.top_p if p.top_p < 1.0 else float("inf") for p in params], device=sorted_probs.device)
    return sorted_probs.masked_fill((torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= top_p[:, None], 0.0)


def min_p_filter(params: list[SamplingParams], probs: torch.Tensor, most_likely: torch.Tensor) -> torch.Tensor:
    """Min-p on (rows, C) probabilities whose largest per row is most_likely (rows, 1)."""
    if not any(p.min_p > 0.0 for p in params):
        return probs
    min_p = torch.tensor([p.min_p for p in params], device=probs.device)[:, None]
    return probs.masked_fill(probs < min_p * most_likely, 0.0)


# The top-p candidates looked at before sorting the whole vocabulary: the nucleus of a sampled
# distribution is nearly always far smaller.
NUCLEUS_CANDIDATES = 1024


def sample_rows(samplers: list[Sampler], logits: torch.Tensor) -> list[int]:
    """One token per row of (rows, vocab) logits, row i drawn as samplers[i] says (penalties, then
    greedy or the filters of `filtered_probs`), with one read back to the host for the whole batch.

    A row is drawn by inverting its cumulative distribution at one uniform number (the row's seeded
    generator's, else one batch of them), over the few candidates its filters can keep where that is
    known without sorting the vocabulary: its top-k, or for top-p alone the 1024 most likely tokens
    when they hold the mass (what torch.multinomial over the whole vocabulary took ~1 ms a row for on
    a CPU, half a decode step of the default model)."""
    scores = logits
    if any(s.needs_counts for s in samplers):
        scores = torch.stack([s.apply_penalties(row) for s, row in zip(samplers, logits)])
    tokens = torch.empty(len(samplers), dtype=torch.long, device=logits.device)
    greedy = [i for i, s in enumerate(samplers) if s.params.greedy]
    if greedy:
        tokens[greedy] = scores[greedy].argmax(dim=-1)
    top_k = [i for i, s in enumerate(samplers) if not s.params.greedy and 0 < s.params.top_k < scores.shape[-1]]
    with_top_k = set(top_k)
    rest = [i for i, s in enumerate(samplers) if not s.params.greedy and i not in with_top_k]
    for rows in (top_k, rest):
        if rows:
            params = [samplers[i].params for i in rows]
            probs, ids = candidate_probs(params, scores[rows])
            if ids is not None:  # in token order, as the whole vocabulary is: a row's draw is the same either way
                ids, order = ids.sort(dim=-1)
                probs = probs.gather(1, order)
            tokens[rows] = draw(probs, ids, [samplers[i].generator for i in rows])
    return tokens.tolist()


def candidate_probs(params: list[SamplingParams], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """filtered_probs' distributions over a few candidates per row where possible: (probs (rows, C),
    their token ids (rows, C)), or (the whole vocabulary's, None). On a GPU always the whole
    vocabulary's: its sort is cheap there, and deciding on candidates reads a value back to the host."""
    vocab, device = logits.shape[-1], logits.device
    if device.type != "cpu":
        return filtered_probs(params, logits), None
    temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if all(ks):
        # The top k of the logits are those of logits / temperature: divide the k, not the vocabulary.
        k = torch.tensor(ks, device=device)[:, None]
        values, ids = torch.topk(logits, max(ks), dim=-1)  # (rows, C), most likely first
        kth = values.gather(1, k - 1)
        if not bool(((logits >= kth).sum(dim=-1, keepdim=True) > k).any()):  # (ties at the k-th: the full path)
            values = (values / temperature).masked_fill(torch.arange(values.shape[1], device=device)[None, :] >= k,
                                                        float("-inf"))
            return nucleus(params, torch.softmax(values, dim=-1)), ids
        return filtered_probs(params, logits), None
    x = logits / temperature
    if not any(ks) and all(p.top_p < 1.0 for p in params) and vocab > NUCLEUS_CANDIDATES:
        probs, ids = torch.topk(torch.softmax(x, dim=-1), NUCLEUS_CANDIDATES, dim=-1)
        top_p = torch.tensor([p.top_p for p in params], device=x.device)
        if bool((probs.sum(dim=-1) >= top_p).all()):  # every token past the candidates would be dropped
            return nucleus(params, probs), ids
    return filtered_probs(params, logits), None


def nucleus(params: list[SamplingParams], probs: torch.Tensor) -> torch.Tensor:
    """Top-p and min-p on candidates sorted most likely first, as filtered_probs applies them."""
    probs = top_p_filter(params, probs)
    return min_p_filter(params, probs, probs[:, :1])


def draw(probs: torch.Tensor, ids: torch.Tensor | None, generators: list[torch.Generator | None]) -> torch.Tensor:
    """A token per row of unnormalized probs (rows, C) -> (rows,) token ids: the first candidate whose
    cumulative mass passes a uniform number times the row's total. Candidates come in token order, so
    that a row draws the same token from the same number whether its candidates were cut short or not
    (which can depend on the other rows of its batch)."""
    device = probs.device
    u = torch.empty(probs.shape[0], device=device)
    free = [i for i, g in enumerate(generators) if g is None]
    if free:
        u[free] = torch.rand(len(free), device=device)
    for i, g in enumerate(generators):
        if g is not None:
            u[i] = torch.rand(1, generator=g, device=device)[0]
    cdf = torch.cumsum(probs.double(), dim=-1)  # (rows, C)
    picked = torch.searchsorted(cdf, (u.double() * cdf[:, -1])[:, None], right=True).clamp(max=probs.shape[1] - 1)
    return picked[:, 0] if ids is None else ids.gather(1, picked)[:, 0]
