"""Beam search on the engine: one request's beams are running sequences of one `BeamGroup`.

The rules are transformers' `generate()` with num_beams (engine/seq2seq.py lists them), so that the
same model and settings give the same tokens: each step scores every beam's log-softmax (its logits
processor applied) plus the beam's running score, keeps the best 2 * num_beams candidates (more with
several EOS ids) so that num_beams unfinished ones remain, moves candidates that end (EOS or the
length limit) among the top num_beams into the finished set with score / generated_length **
length_penalty, and stops when num_beams finished hypotheses exist that (by early_stopping's rule)
no running beam can beat: True stops as soon as there are num_beams finished, False when the best
running beam's score over the current length cannot beat the worst finished one, "never" when it
could not even at the length limit (for length_penalty > 0).

This file holds the arithmetic of one request's search (`BeamGroup.advance`); the engine
(llm_engine.py) runs the beams: a request starts as its first beam alone (its prompt), and after
each step the engine hands every beam's next-token logits here, then gives each surviving beam its
parent's blocks (shared, the partly filled last one copied: copy-on-write) and its new token. The
output is the best finished hypothesis, in one piece when the search ends: a beam's tokens are
final only then.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from leapllm.engine.request import LogitsProcessor

NEG = -1.0e9  # transformers' "not this one" score offset in beam search, kept for identical ordering


@dataclass(frozen=True)
class BeamSearchParams:
    num_beams: int
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never"
    renormalize_logits: bool = False  # a log-softmax after the processors (changes scores only)
    # (beams' token ids (beams, length), their log-probabilities (beams, vocab)) -> the scores to rank
    processor: LogitsProcessor | None = None


@dataclass
class BeamStep:
    """What one step decided: go on with `parents[i]`'s tokens + `tokens[i]` in beam i, or end
    with `result` (the best hypothesis's new tokens)."""
    parents: list[int] | None = None
    tokens: list[int] | None = None
    result: list[int] | None = None


class BeamGroup:
    """The search state of one request: running beams' tokens and scores, the finished set."""

    def __init__(self, params: BeamSearchParams, prompt_ids: list[int], max_tokens: int, eos_token_ids: list[int],
                 device):
        self.params = params
        self.prompt_len = len(prompt_ids)
        self.max_length = self.prompt_len + max_tokens  # transformers' max_length: the prompt counts
        self.eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=device)
        self.device = device
        self.prompt_ids = list(prompt_ids)
        self.beams: list = []  # the engine's Requests running the beams, in beam order
        self.reset()

    @property
    def num_beams(self) -> int:
        return self.params.num_beams

    def reset(self) -> None:
        """Back to the start (the engine restarts a search whose beams lost their blocks: the search
        is deterministic, so it finds the same hypotheses again)."""
        beams, dev = self.num_beams, self.device
        self.cur_len = self.prompt_len
        self.running = torch.zeros((1, beams, self.max_length), dtype=torch.long, device=dev)
        self.running[:, :, :self.prompt_len] = torch.tensor(self.prompt_ids, device=dev)
        # Only beam 0 is live at first: the others would repeat its candidates.
        self.running_scores = torch.zeros((1, beams), device=dev)
        self.running_scores[:, 1:] = NEG
        self.finished = self.running.clone()
        self.finished_scores = torch.full((1, beams), NEG, device=dev)
        self.finished_lengths = torch.full((1, beams), self.prompt_len, dtype=torch.long, device=dev)
        self.is_finished = torch.zeros((1, beams), dtype=torch.bool, device=dev)
        self.can_improve = torch.ones((1, 1), dtype=torch.bool, device=dev)

    def advance(self, logits: torch.Tensor) -> BeamStep:
        """logits: (live beams, vocab), the next-token logits of each running beam (one row before
        the first step, when only the prompt runs)."""
        p, beams = self.params, self.num_beams
        vocab = logits.shape[-1]
        cur_len, penalty, early = self.cur_len, p.length_penalty, p.early_stopping
        if logits.shape[0] == 1 and beams > 1:  # the first step: every beam is the prompt
            logits = logits.expand(beams, vocab)
        flat = self.running[0, :, :cur_len]  # (beams, cur_len)
        log_probs = F.log_softmax(logits.float(), dim=-1)
        if p.processor is not None:
            log_probs = p.processor(flat, log_probs)
        if p.renormalize_logits:
            log_probs = log_probs.log_softmax(dim=-1)
        totals = (log_probs.view(1, beams, vocab) + self.running_scores[:, :, None]).view(1, beams * vocab)

        # The best candidates over all beams, and the sequences they make.
        candidates = max(2, 1 + self.eos.numel()) * beams
        top_scores, top_index = torch.topk(totals, candidates)  # (1, candidates)
        from_beam, tokens = top_index // vocab, top_index % vocab
        cand = _gather(self.running, from_beam)
        cand[:, :, cur_len] = tokens
        ends = torch.isin(tokens, self.eos) if self.eos.numel() else torch.zeros_like(tokens, dtype=torch.bool)
        if cur_len + 1 >= self.max_length:
            ends = torch.ones_like(ends)

        # The beams that go on: the best candidates that did not end.
        open_scores = top_scores + ends.to(torch.float32) * NEG
        keep = torch.topk(open_scores, beams).indices
        self.running = _gather(cand, keep)
        self.running_scores = _gather(open_scores, keep)
        parents = _gather(from_beam, keep)

        # The finished set: candidates that ended among the top num_beams, by penalized score.
        is_top_beam = torch.arange(candidates, device=self.device) < beams
        just_finished = ends & is_top_beam[None, :]
        scores = top_scores / ((cur_len + 1 - self.prompt_len) ** penalty)  # generated length, the EOS included
        scores += (torch.all(self.is_finished, dim=-1, keepdim=True) & (early is True)).to(torch.float32) * NEG
        scores += (~self.can_improve).to(torch.float32) * NEG
        scores += (~just_finished) * NEG
        merged_scores = torch.cat([self.finished_scores, scores], dim=1)
        best = torch.topk(merged_scores, beams).indices
        self.finished = _gather(torch.cat([self.finished, cand], dim=1), best)
        self.finished_scores = _gather(merged_scores, best)
        self.finished_lengths = _gather(torch.cat([self.finished_lengths, torch.full_like(tokens, cur_len + 1)],
                                                  dim=1), best)
        self.is_finished = _gather(torch.cat([self.is_finished, just_finished], dim=1), best)

        self.cur_len = cur_len = cur_len + 1
        # Could a running beam still beat the worst finished hypothesis?
        best_length = (self.max_length if (early == "never" and penalty > 0.0) else cur_len) - self.prompt_len
        best_running = self.running_scores[:, :1] / (best_length ** penalty)
        worst_finished = torch.where(self.is_finished, torch.min(self.finished_scores, dim=1, keepdim=True)[0], NEG)
        self.can_improve = self.can_improve & torch.any(best_running > worst_finished, dim=-1, keepdim=True)
        go_on = bool(self.can_improve.any()) and not (bool(self.is_finished.all()) and early is True) \
            and not bool(ends.all())
        if not go_on:
            length = int(self.finished_lengths[0, 0])
            return BeamStep(result=self.finished[0, 0, self.prompt_len:length].tolist())
        return BeamStep(parents=parents[0].tolist(), tokens=self.running[0, :, cur_len - 1].tolist())

    @property
    def score(self) -> float:
        """The returned hypothesis' length-penalized score (after the last step)."""
        return float(self.finished_scores[0, 0])


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pick along the beam dimension: t (1, n, ...), index (1, k)."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)
