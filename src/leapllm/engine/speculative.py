"""Speculative decoding: cheap guesses of the next k tokens, checked by the target in one pass.

A batch-1 decode step reads every weight of the target to produce one token. If something cheap
proposes k tokens d_1..d_k, one forward pass of the target over [last token, d_1, .., d_k] gives
its distributions p_1..p_{k+1} at all k+1 positions for about the price of one step (the weights
are read once for all rows). The standard rule (Leviathan et al. 2023, Chen et al. 2023) then
keeps d_i with probability min(1, p_i(d_i) / q_i(d_i)), where q_i is the distribution d_i was
drawn from; at the first rejection it draws a replacement from the residual max(0, p_i - q_i)
(normalized) and stops; if all k are kept it draws a bonus token from p_{k+1}. Every emitted token
is then distributed exactly as if the target had sampled alone. Greedy requests are the special
case p_i = one-hot(argmax): a draft is kept iff it is the target's argmax, so the output is
token-identical to plain greedy decoding.

Two proposers:
- `NgramProposer` (prompt lookup decoding): the tokens that followed the latest earlier
  occurrence of the context's last n tokens. Costs nothing, needs no model, and is right often
  in repetitive output (code, summaries, edits, a small model's loops). q is a point mass.
- a draft model: a smaller model with the same vocabulary (for example a pruned and distilled
  student of the target from `leapllm prune` / `leapllm distill`) decodes k tokens from its own
  KV cache (engine/model_runner.py runs it); q is its (filtered) distribution.

`SpeculationController` measures what speculation costs and gains and turns it off (and back on
to probe now and then) when it does not pay, so a poor draft costs little.
"""

from __future__ import annotations

import dataclasses

import torch

from leapllm.engine.sampling import Sampler, SamplingParams, greedy_token
from leapllm.errors import InvalidRequestError

FIRST_BACKOFF = 8  # plain steps after speculation stopped paying, before the first probe
# Each probe that does not pay multiplies the next wait by this (8, 32, 128, 512 plain steps).
BACKOFF_GROWTH = 4
# What probes may cost, at most, as a fraction of the sequence's decode time so far: a draft model's
# probe also reads every token since its previous step (its cache catches up), so a fixed schedule
# of probes would cost a poor draft a fixed share of the time. A probe is made only if the loss so far plus the next
# probe's expected loss (the last probe's; for a proposer that catches up, scaled by the tokens to
# catch up) stays within it.
PROBE_BUDGET = 0.02


def check_draft_model(target, target_tokenizer, draft, draft_tokenizer) -> None:
    """Raise InvalidRequestError unless the draft speaks the target's vocabulary token for token."""
    from leapllm.tokenization.vocabulary import check_same_vocabulary

    try:
        check_same_vocabulary(target, draft, target_tokenizer, draft_tokenizer)
    except InvalidRequestError as e:
        raise InvalidRequestError(f"the draft model cannot propose for this model: {e} "
                                  "(teacher = the target, student = the draft)") from None


# -- verification ------------------------------------------------------------------------------

def verify_proposals(sampler: Sampler, target_logits: torch.Tensor, proposals: list[int],
                     draft_probs: torch.Tensor | None) -> list[int]:
    """The tokens to emit after one verification pass: the kept proposals, then one more.

    target_logits (len(proposals) + 1, vocab) float32: row i is the target's next-token logits
    after the context and proposals[:i]. draft_probs (len(proposals), vocab), or None when each
    proposal was certain (n-gram lookup, or a greedy draft): the distribution proposal i was
    drawn from. Records every returned token in the sampler (penalties of later rows see earlier
    kept tokens, as in plain decoding), so the caller must not record them again.
    """
    out: list[int] = []
    gen = sampler.generator
    for i, d in enumerate(proposals):
        if sampler.params.greedy:  # the distribution is one-hot at the argmax: no need to build it
            t = greedy_token(sampler.apply_penalties(target_logits[i]))
            sampler.record(t)
            out.append(t)
            if t != d:
                return out
            continue
        p = sampler.distribution(target_logits[i])
        p = p / p.sum()
        q_d = 1.0 if draft_probs is None else float(draft_probs[i, d] / draft_probs[i].sum())
        u = float(torch.rand(1, generator=gen, device=p.device))
        if u * q_d < float(p[d]):  # keep with probability min(1, p(d) / q(d))
            sampler.record(d)
            out.append(d)
            continue
        if draft_probs is None:
            residual = p.clone()
            residual[d] = 0.0
        else:
            residual = (p - draft_probs[i] / draft_probs[i].sum()).clamp(min=0.0)
        if not float(residual.sum()) > 0.0:  # p == q: rejection had probability 0
            residual = p
        t = int(torch.multinomial(residual, 1, generator=gen))
        sampler.record(t)
        out.append(t)
        return out
    if sampler.params.greedy:
        t = greedy_token(sampler.apply_penalties(target_logits[len(proposals)]))
    else:
        t = int(torch.multinomial(sampler.distribution(target_logits[len(proposals)]), 1, generator=gen))
    sampler.record(t)
    out.append(t)
    return out


# -- proposers ---------------------------------------------------------------------------------

class NgramProposer:
    """Prompt lookup over one growing token list: an index of every n-gram's latest start.

    The index covers n-grams that end before the last token, so looking up the context's tail
    finds its latest *earlier* occurrence; proposals are the tokens that followed it.
    """

    def __init__(self, ngram_max: int = 4, ngram_min: int = 1):
        self.sizes = range(ngram_max, ngram_min - 1, -1)
        self.latest: dict[int, dict[tuple, int]] = {n: {} for n in self.sizes}
        self.indexed = 0  # n-grams ending at positions < indexed are in the index

    def propose(self, ids: list[int], k: int) -> list[int]:
        end = len(ids) - 1  # index every n-gram ending at positions < end
        for pos in range(self.indexed, end):
            for n in self.sizes:
                if pos + 1 >= n:
                    self.latest[n][tuple(ids[pos + 1 - n:pos + 1])] = pos + 1 - n
        self.indexed = max(self.indexed, end)
        for n in self.sizes:
            if len(ids) < n + 1:
                continue
            start = self.latest[n].get(tuple(ids[-n:]))
            if start is not None:
                follow = ids[start + n:start + n + k]
                if follow:
                    return follow
        return []


def draft_sampler(params: SamplingParams, target_sampler: Sampler, draft) -> Sampler:
    """The sampler a draft model proposes with: the request's temperature and filters without its
    penalties (q may be any distribution; the verification corrects for it), drawing from the
    target sampler's generator so that the two never use the same random numbers."""
    sampler = Sampler(dataclasses.replace(params, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                                          stop=[], stop_token_ids=[]), [], draft.config.vocab_size, draft.device)
    sampler.generator = target_sampler.generator
    return sampler


def draw_proposal(sampler: Sampler, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """One draft token from (vocab,) logits through a draft_sampler: (token, the distribution q it
    was drawn from), q None when greedy (the argmax is certain)."""
    if sampler.params.greedy:
        return greedy_token(logits), None
    q = sampler.filtered_probs(logits)
    return int(torch.multinomial(q, 1, generator=sampler.generator)), q


# -- when to speculate -------------------------------------------------------------------------

class SpeculationController:
    """Chooses k for the next step of one sequence: the k with the most expected tokens per second.

    The model (Leviathan et al. 2023, section 3.4): each proposal is kept with probability alpha
    until the first rejection, so a step with k proposals emits E(k) = (1 - alpha^(k+1)) / (1 - alpha)
    tokens and costs cost(k) seconds, proposing included. alpha is the kept fraction of the
    proposals that were put to the test (everything up to and including the first rejection), as a
    running count that forgets old steps, starting from a prior of 1/2. cost(k) is a running mean of
    measured steps with k proposals, and where k has not been measured yet, a plain step plus k times
    the per-proposal cost the measured steps show (PRIOR_MARGINAL of a plain step before any).

    It speculates with the best k while E(k) / cost(k) beats a plain step's 1 / plain_s. Otherwise it
    decodes plainly and, after FIRST_BACKOFF plain steps (growing BACKOFF_GROWTH-fold at each probe
    that does not pay, up to max_backoff), probes with one proposal, the cheapest test; only while
    what the probes lost so far is within PROBE_BUDGET of the decode time, so a useless draft costs
    about that.
    """

    PRIOR_ALPHA = (1.0, 2.0)  # kept, tested: alpha = 1/2 with the weight of two proposals
    FORGET = 0.9  # each step's weight in the acceptance counts decays by this per later step
    PRIOR_MARGINAL = 0.3  # seconds per proposal / seconds of a plain step, until measured

    def __init__(self, k_max: int, adaptive: bool = True, max_backoff: int = 512, catches_up: bool = False):
        """catches_up: the proposer reads every token since its last proposal first (a draft model)."""
        self.k_max = k_max
        self.catches_up = catches_up
        self.adaptive = adaptive
        self.max_backoff = max_backoff
        self.plain_s: float | None = None  # running mean seconds of a plain step
        self.cost_s: dict[int, float] = {}  # k -> running mean seconds of a step with k proposals
        self.kept_w, self.tested_w = self.PRIOR_ALPHA
        self.off = False  # speculation stopped paying; probing now and then
        self.off_steps, self.backoff = 0, FIRST_BACKOFF
        self.probing = False  # the last k returned was a probe's
        self.elapsed_s = 0.0  # decode time measured so far
        self.probe_loss_s = 0.0  # what probes cost beyond plain steps for the same tokens
        self.plain_run = 0  # plain steps since the last speculative one
        self.last_probe = (0.0, 1)  # (loss, plain_run before it) of the last probe
        self.proposed = self.kept = self.steps = 0  # totals, for metrics

    @property
    def alpha(self) -> float:
        return self.kept_w / self.tested_w

    def expected_tokens(self, k: int) -> float:
        a = min(self.alpha, 0.999)
        return (1.0 - a ** (k + 1)) / (1.0 - a)

    def cost(self, k: int) -> float:
        if k in self.cost_s:
            return self.cost_s[k]
        marginals = [(c - self.plain_s) / j for j, c in self.cost_s.items()]
        per_proposal = (sum(marginals) / len(marginals) if marginals else self.PRIOR_MARGINAL * self.plain_s)
        return self.plain_s + k * max(per_proposal, 0.0)

    def best_k(self) -> tuple[int, float]:
        """(k, expected tokens per second) of the best k >= 1."""
        return max(((k, self.expected_tokens(k) / self.cost(k)) for k in range(1, self.k_max + 1)),
                   key=lambda kr: kr[1])

    def pays(self, rate: float) -> bool:
        """Whether `rate` expected tokens per second beat a plain step."""
        return rate * self.plain_s > 1.0

    def _back_off(self) -> None:
        self.off = True
        self.off_steps = self.backoff
        self.backoff = min(self.max_backoff, BACKOFF_GROWTH * self.backoff)

    def num_tokens(self) -> int:
        """k for the next step; 0: decode plainly."""
        if not self.adaptive:
            return self.k_max
        if self.plain_s is None:
            return 0  # measure a plain step first
        if self.off:
            if self.off_steps > 0:
                self.off_steps -= 1
                return 0
            loss, run = self.last_probe
            expected = loss * max(1.0, self.plain_run / run) if self.catches_up else loss
            if self.probe_loss_s + expected > PROBE_BUDGET * self.elapsed_s:
                return 0
            self.probing = True
            return 1
        k, rate = self.best_k()
        if self.pays(rate):
            return k
        self._back_off()
        self.off_steps -= 1  # this step is the first plain one
        return 0

    def record_plain(self, seconds: float) -> None:
        self.elapsed_s += seconds
        self.plain_run += 1
        self.plain_s = seconds if self.plain_s is None else 0.8 * self.plain_s + 0.2 * seconds

    def record_speculative(self, seconds: float | None, proposed: int, kept: int) -> None:
        """A verification step kept `kept` of `proposed` tokens; seconds None: its time is not
        comparable (it also prefilled other requests), so only the acceptance learns from it."""
        self.proposed += proposed
        self.kept += kept
        self.steps += 1
        tested = kept + (1 if kept < proposed else 0)
        self.kept_w = self.FORGET * self.kept_w + kept
        self.tested_w = self.FORGET * self.tested_w + tested
        if seconds is not None and proposed > 0:
            self.elapsed_s += seconds
            old = self.cost_s.get(proposed)
            self.cost_s[proposed] = seconds if old is None else 0.7 * old + 0.3 * seconds
        if self.probing:
            self.probing = False
            if seconds is not None and self.plain_s is not None:
                loss = max(0.0, seconds - (kept + 1) * self.plain_s)
                self.probe_loss_s += loss
                self.last_probe = (loss, max(1, self.plain_run))
            if self.pays(self.best_k()[1]):
                self.off, self.backoff = False, FIRST_BACKOFF
            else:
                self._back_off()
        self.plain_run = 0

    @property
    def acceptance_rate(self) -> float:
        return self.kept / self.proposed if self.proposed else 0.0
