"""How closely a model follows a reference model, position by position, on the same text.

Both models see the same sliding windows as `perplexity` (same ctx and stride, so every token
after the first is judged once, with the same context for both). At each scored position:

- top-1 agreement: the model's greedy next token (argmax) equals the reference's;
- KL(reference || model) = sum_v p_ref(v) * (log p_ref(v) - log p_model(v)), in nats, from float32
  log-softmaxes;
- top-5 overlap: |top-5 tokens of the model  ∩  top-5 of the reference| / 5.

Each is averaged over the scored positions. Both perplexities on the text come along for free.
The two models must share a tokenizer: a different vocabulary size is an error.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from leapllm.errors import InvalidRequestError
from leapllm.evaluation.perplexity import (
    as_token_tensor,
    auto_batch_size,
    check_text_length,
    check_window_settings,
    model_context_length,
    model_vocab_size,
    nll_to_perplexity,
    scored_log_probs,
    scored_targets,
    sliding_windows,
    window_batches,
    window_logits,
)

TOP_K = 5


@dataclass(frozen=True)
class AgreementResult:
    """The three agreement figures, both perplexities, and what they were measured over."""

    agreement: float  # fraction of positions where both models' argmax is the same token
    mean_kl: float  # KL(reference || model) per position, nats
    top5_overlap: float  # mean fraction of the reference's top-5 tokens in the model's top-5
    model_perplexity: float
    reference_perplexity: float
    tokens: int  # scored positions
    windows: int
    ctx: int
    stride: int
    batch_size: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        """Scored positions per second (both models' forwards included)."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict:
        return {"agreement": self.agreement, "mean_kl": self.mean_kl, "top5_overlap": self.top5_overlap,
                "model_perplexity": self.model_perplexity, "reference_perplexity": self.reference_perplexity,
                "tokens": self.tokens, "windows": self.windows, "ctx": self.ctx, "stride": self.stride,
                "batch_size": self.batch_size, "seconds": self.seconds, "tokens_per_s": self.tokens_per_s}


def check_same_vocab(model_vocab: int | None, reference_vocab: int | None) -> None:
    if model_vocab is not None and reference_vocab is not None and model_vocab != reference_vocab:
        raise InvalidRequestError(f"vocabulary mismatch: the model has {model_vocab} tokens, the reference "
                                  f"{reference_vocab}; agreement needs two models with the same tokenizer")


def agreement(model, reference, token_ids: Sequence[int] | torch.Tensor, ctx: int = 512,
              stride: int | None = None, batch_size: int | None = None, *,
              progress: bool = False) -> AgreementResult:
    """Top-1 agreement, mean KL(reference || model) and top-5 overlap of `model` against `reference`.

    Both are already loaded models called as in `perplexity` (leapllm Transformers, or transformers
    models), possibly on different devices. stride defaults to ctx // 2; batch_size (windows per
    forward, per model) defaults to half of what `perplexity` would use, since two models' logits
    are held at once. Raises InvalidRequestError for a vocabulary mismatch or impossible settings.
    """
    stride = ctx // 2 if stride is None else stride
    vocab_size = model_vocab_size(model)
    check_same_vocab(vocab_size, model_vocab_size(reference))
    ids = as_token_tensor(token_ids, vocab_size or model_vocab_size(reference))
    limits = [n for n in (model_context_length(model), model_context_length(reference)) if n is not None]
    check_window_settings(ctx, stride, min(limits) if limits else None)
    check_text_length(len(ids))
    if batch_size is None:
        batch_size = max(1, auto_batch_size(ctx, vocab_size) // 2)
    elif batch_size < 1:
        raise InvalidRequestError(f"batch size must be at least 1, got {batch_size}")
    windows = sliding_windows(len(ids), ctx, stride)

    same_top1 = kl_sum = overlap_sum = model_nll = reference_nll = 0.0
    tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in window_batches(windows, batch_size, progress, desc="agreement"):
            reference_lp = scored_log_probs(window_logits(reference, ids, batch), batch)
            model_lp = scored_log_probs(window_logits(model, ids, batch), batch).to(reference_lp.device)
            check_same_vocab(model_lp.shape[-1], reference_lp.shape[-1])  # a model without a config
            targets = scored_targets(ids, batch).to(reference_lp.device)[:, None]

            same_top1 += (model_lp.argmax(-1) == reference_lp.argmax(-1)).sum().item()
            kl = (reference_lp.exp() * (reference_lp - model_lp)).sum(-1)
            kl_sum += kl.double().sum().item()
            model_top = model_lp.topk(TOP_K, dim=-1).indices
            reference_top = reference_lp.topk(TOP_K, dim=-1).indices
            overlap_sum += (model_top[:, :, None] == reference_top[:, None, :]).any(-1).sum().item() / TOP_K
            model_nll -= model_lp.gather(1, targets).double().sum().item()
            reference_nll -= reference_lp.gather(1, targets).double().sum().item()
            tokens += len(targets)
    seconds = time.perf_counter() - start

    return AgreementResult(
        agreement=same_top1 / tokens, mean_kl=kl_sum / tokens, top5_overlap=overlap_sum / tokens,
        model_perplexity=nll_to_perplexity(model_nll, tokens)[0],
        reference_perplexity=nll_to_perplexity(reference_nll, tokens)[0],
        tokens=tokens, windows=len(windows), ctx=ctx, stride=stride, batch_size=batch_size, seconds=seconds)
