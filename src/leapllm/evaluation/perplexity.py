"""Sliding-window perplexity of a causal language model over one long token sequence.

The standard scheme (the Hugging Face "Perplexity of fixed-length models" guide; llama.cpp's
`perplexity` scores only a fixed half of each chunk instead):

- the whole text is tokenized once. The CLI uses the model tokenizer's own rule: BOS is prepended
  when the model asks for it (`tokenizer.add_bos`, as in generation), not otherwise. Token 0 is
  never scored: nothing before it predicts it;
- windows of `ctx` tokens start at 0, stride, 2*stride, ... until one reaches the end of the text
  (that last window ends there, so it may be shorter than ctx);
- in each window only the tokens not scored by the previous window count toward the NLL, each
  predicted from everything before it in its window. With stride < ctx every token after the first
  is scored exactly once, so `tokens == len(token_ids) - 1`; the tokens before `first_target`
  are context only, and a smaller stride gives later tokens more of it (at more compute). With
  stride == ctx (non-overlapping windows) the token at each window start has nothing before it in
  its window and is not scored: `tokens == len(token_ids) - ceil(len(token_ids) / ctx)`;
- perplexity = exp(mean NLL over the scored tokens), the NLL from a float32 log-softmax.

Several windows go through the model in one forward (`batch_size`); a shorter last window is
right-padded, which cannot change the logits of real positions since attention is causal.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from leapllm.errors import InvalidRequestError

# Upper bound on one batch's float32 logits (windows * ctx * vocab * 4 bytes) for the automatic
# batch size: enough windows to keep the matmuls wide, without gigabytes of logits.
AUTO_BATCH_LOGITS_BYTES = 512 * 2**20
MAX_AUTO_BATCH = 8


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go through the model; those in [first_target, end) are scored."""

    begin: int
    end: int
    first_target: int

    @property
    def prediction_slice(self) -> slice:
        """Positions within the window whose logits predict tokens first_target .. end - 1."""
        return slice(self.first_target - self.begin - 1, self.end - self.begin - 1)


@dataclass(frozen=True)
class PerplexityResult:
    """The figure, what it was measured over, and each scored token's NLL (for finer comparisons)."""

    perplexity: float
    mean_nll: float  # nats per scored token
    tokens: int  # scored tokens
    windows: int
    ctx: int
    stride: int
    batch_size: int
    seconds: float
    token_positions: torch.Tensor  # (tokens,) int64: index of each scored token in token_ids
    token_nlls: torch.Tensor  # (tokens,) float32: its negative log-likelihood

    @property
    def tokens_per_s(self) -> float:
        """Scored tokens per second of evaluation."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict:
        """The figures as plain JSON-able values (without the per-token tensors)."""
        return {"perplexity": self.perplexity, "mean_nll": self.mean_nll, "tokens": self.tokens,
                "windows": self.windows, "ctx": self.ctx, "stride": self.stride, "batch_size": self.batch_size,
                "seconds": self.seconds, "tokens_per_s": self.tokens_per_s}


# ---------------------------------------------------------------- windows and checks

def sliding_windows(num_tokens: int, ctx: int, stride: int) -> list[Window]:
    """The windows that score tokens 1 .. num_tokens - 1 (see the module docstring)."""
    windows = []
    scored_until = 1  # token 0 is never a target
    for begin in range(0, num_tokens, stride):
        end = min(begin + ctx, num_tokens)
        first_target = max(scored_until, begin + 1)  # position `begin` has nothing before it in the window
        if first_target < end:
            windows.append(Window(begin, end, first_target))
        scored_until = end
        if end == num_tokens:
            break
    return windows


def model_context_length(model) -> int | None:
    config = getattr(model, "config", None)
    # leapllm's ModelConfig, else a transformers config.
    return getattr(config, "context_length", None) or getattr(config, "max_position_embeddings", None)


def model_vocab_size(model) -> int | None:
    return getattr(getattr(model, "config", None), "vocab_size", None)


def check_window_settings(ctx: int, stride: int, context_length: int | None = None) -> None:
    """Raise InvalidRequestError for windows no evaluation can run with."""
    if ctx < 2:
        raise InvalidRequestError(f"--ctx must be at least 2, got {ctx}")
    if context_length is not None and ctx > context_length:
        raise InvalidRequestError(f"--ctx {ctx} is larger than the model's context of {context_length} tokens")
    if not 1 <= stride <= ctx:
        raise InvalidRequestError(f"--stride must be between 1 and --ctx ({ctx}), got {stride}")


def check_text_length(num_tokens: int) -> None:
    if num_tokens < 2:
        raise InvalidRequestError(f"the text is {num_tokens} token(s) long; at least 2 are needed to score one")


def as_token_tensor(token_ids: Sequence[int] | torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten().cpu()
    if ids.numel() and (int(ids.min()) < 0 or (vocab_size is not None and int(ids.max()) >= vocab_size)):
        raise InvalidRequestError(f"token ids must be in [0, {vocab_size}) for this model's vocabulary")
    return ids


def auto_batch_size(ctx: int, vocab_size: int | None) -> int:
    vocab_size = vocab_size or 32_000
    return max(1, min(MAX_AUTO_BATCH, AUTO_BATCH_LOGITS_BYTES // (ctx * vocab_size * 4)))


def module_device(model) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


# ---------------------------------------------------------------- forward passes

def window_batches(windows: list[Window], batch_size: int, progress: bool, desc: str) -> Iterator[list[Window]]:
    """Consecutive groups of batch_size windows, with a progress bar (stderr) for runs over a second."""
    with tqdm(total=len(windows), desc=desc, unit="window", delay=1.0, leave=False, file=sys.stderr,
              disable=not progress) as bar:
        for i in range(0, len(windows), batch_size):
            batch = windows[i:i + batch_size]
            yield batch
            bar.update(len(batch))


def window_logits(model, ids: torch.Tensor, batch: list[Window]) -> torch.Tensor:
    """float32 logits (len(batch), longest window, vocab) of the batch's windows, right-padded."""
    length = max(w.end - w.begin for w in batch)
    tokens = torch.zeros(len(batch), length, dtype=torch.long)
    for row, w in enumerate(batch):
        tokens[row, :w.end - w.begin] = ids[w.begin:w.end]
    out = model(tokens.to(module_device(model)))
    logits = out.logits if hasattr(out, "logits") else out  # a transformers model returns an output object
    return logits.float()


def scored_log_probs(logits: torch.Tensor, batch: list[Window]) -> torch.Tensor:
    """float32 log-softmax at the positions that predict each window's scored tokens, concatenated."""
    rows = torch.cat([logits[row, w.prediction_slice] for row, w in enumerate(batch)])
    return torch.log_softmax(rows.float(), dim=-1)


def scored_targets(ids: torch.Tensor, batch: list[Window]) -> torch.Tensor:
    return torch.cat([ids[w.first_target:w.end] for w in batch])


def nll_to_perplexity(total_nll: float, tokens: int) -> tuple[float, float]:
    mean_nll = total_nll / tokens
    return math.exp(mean_nll), mean_nll


# ---------------------------------------------------------------- the API

def perplexity(model, token_ids: Sequence[int] | torch.Tensor, ctx: int = 512, stride: int | None = None,
               batch_size: int | None = None, *, progress: bool = False) -> PerplexityResult:
    """Sliding-window perplexity of `model` over `token_ids` (see the module docstring).

    model: an already loaded causal LM called as `model(tokens (batch, seq)) -> logits (batch, seq,
    vocab)`: a leapllm `Transformer` (`LLM(...).model`, quantized or not), or a transformers
    model (its output's `.logits` is used). stride defaults to ctx // 2; batch_size (windows per
    forward) defaults to what keeps one batch's logits under 512 MiB, at most 8.
    Raises InvalidRequestError for impossible settings or a text shorter than 2 tokens.
    """
    stride = ctx // 2 if stride is None else stride
    vocab_size = model_vocab_size(model)
    ids = as_token_tensor(token_ids, vocab_size)
    check_window_settings(ctx, stride, model_context_length(model))
    check_text_length(len(ids))
    if batch_size is None:
        batch_size = auto_batch_size(ctx, vocab_size)
    elif batch_size < 1:
        raise InvalidRequestError(f"batch size must be at least 1, got {batch_size}")
    windows = sliding_windows(len(ids), ctx, stride)

    positions, nlls = [], []
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in window_batches(windows, batch_size, progress, desc="perplexity"):
            log_probs = scored_log_probs(window_logits(model, ids, batch), batch)
            targets = scored_targets(ids, batch).to(log_probs.device)
            nlls.append(-log_probs.gather(1, targets[:, None])[:, 0].cpu())
            positions.extend(torch.arange(w.first_target, w.end) for w in batch)
    seconds = time.perf_counter() - start

    token_nlls = torch.cat(nlls)
    ppl, mean_nll = nll_to_perplexity(token_nlls.double().sum().item(), len(token_nlls))
    return PerplexityResult(perplexity=ppl, mean_nll=mean_nll, tokens=len(token_nlls), windows=len(windows),
                            ctx=ctx, stride=stride, batch_size=batch_size, seconds=seconds,
                            token_positions=torch.cat(positions), token_nlls=token_nlls)
