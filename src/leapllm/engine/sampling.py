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
        p = self.params
        logits = self.apply_penalties(logits)
        if p.greedy:
            return greedy_token(logits)
        return int(torch.multinomial(self.filtered_probs(logits), 1, generator=self.generator))

    def filtered_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution sampling draws from, after penalties were applied: (vocab,) logits ->
        (vocab,) probabilities with temperature, top-k, top-p and min-p applied (not for greedy)."""
        p = self.params
        logits = logits / p.temperature
        if p.top_k > 0 and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest set whose mass reaches top_p (the first token always survives).
            drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= p.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        if p.min_p > 0.0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        return probs

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
