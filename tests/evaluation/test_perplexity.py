"""Sliding-window perplexity: the windows, the built-in texts, and the figure against transformers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from leapllm.errors import InvalidRequestError
from leapllm.evaluation import BUILTIN_TEXTS, builtin_text
from leapllm.evaluation.perplexity import perplexity, sliding_windows
from leapllm.evaluation.texts import module_docstrings

CTX, STRIDE, TOKENS = 64, 32, 120  # windows [0,64) [32,96) [64,120): the last one is shorter


@pytest.fixture(scope="module")
def text_ids(llm):
    """The start of the held-out built-in text: real prose, tokenized as the CLI does."""
    return llm.tokenizer.encode(builtin_text("python-docs-heldout"))[:TOKENS]


@pytest.fixture(scope="module")
def overlapping(llm, text_ids):
    return perplexity(llm.model, text_ids, ctx=CTX, stride=STRIDE)


@pytest.fixture(scope="module")
def non_overlapping(llm, text_ids):
    return perplexity(llm.model, text_ids, ctx=CTX, stride=CTX)


# ---------------------------------------------------------------- windows, without a model

@pytest.mark.parametrize("num_tokens", [2, 5, 127, 128, 129, 200, 256, 257, 1000])
@pytest.mark.parametrize("ctx,stride", [(128, 64), (128, 1), (128, 100), (128, 128), (2, 1), (2, 2)])
def test_windows_score_every_token_once_with_the_documented_counts(num_tokens, ctx, stride):
    windows = sliding_windows(num_tokens, ctx, stride)
    scored = [t for w in windows for t in range(w.first_target, w.end)]
    assert all(0 <= w.begin < w.first_target < w.end <= w.begin + ctx for w in windows)
    if stride < ctx:
        assert scored == list(range(1, num_tokens))  # every token after the first, once, in order
        # Past the first window every scored token sees at least ctx - stride tokens before it.
        assert all(w.first_target - w.begin >= ctx - stride for w in windows[1:])
        expected_windows = 1 if num_tokens <= ctx else math.ceil((num_tokens - ctx) / stride) + 1
        assert len(windows) == expected_windows
    else:  # non-overlapping: the token at each window start has no context and is not scored
        assert scored == [t for t in range(1, num_tokens) if t % ctx != 0]
        assert len(scored) == num_tokens - math.ceil(num_tokens / ctx)
        # A last window of one token would score nothing: it is not run.
        assert [w.begin for w in windows] == [b for b in range(0, num_tokens, ctx) if b + 1 < num_tokens]


def test_bad_settings_raise_invalid_request(llm, text_ids):
    for kwargs, message in [({"ctx": 1}, "--ctx must be at least 2"),
                            ({"ctx": 9000}, "larger than the model's context of 8192"),
                            ({"ctx": CTX, "stride": 0}, "--stride must be between 1 and --ctx"),
                            ({"ctx": CTX, "stride": CTX + 1}, "--stride must be between 1 and --ctx")]:
        with pytest.raises(InvalidRequestError, match=message):
            perplexity(llm.model, text_ids, **kwargs)
    with pytest.raises(InvalidRequestError, match="at least 2 are needed"):
        perplexity(llm.model, text_ids[:1], ctx=CTX)
    with pytest.raises(InvalidRequestError, match="token ids must be in"):
        perplexity(llm.model, [1, 2, 10**6], ctx=CTX)


# ---------------------------------------------------------------- the built-in texts

def test_builtin_texts_are_deterministic_disjoint_real_prose():
    calibration, heldout = builtin_text("python-docs"), builtin_text("python-docs-heldout")
    assert builtin_text("python-docs") == calibration  # built the same way every time
    assert len(calibration) > 50_000 and len(heldout) > 50_000
    assert not set(BUILTIN_TEXTS["python-docs"]) & set(BUILTIN_TEXTS["python-docs-heldout"])
    pieces = [p for p in calibration.split("\n\n") if len(p) > 200]
    assert pieces and not any(p in heldout for p in pieces)  # no shared docstring paragraph
    assert calibration.startswith(module_docstrings("argparse")[0])  # the first module's docstring
    assert heldout.startswith(module_docstrings("calendar")[0])


def test_unknown_builtin_text_lists_the_choices():
    with pytest.raises(InvalidRequestError, match="builtin:python-docs, builtin:python-docs-heldout"):
        builtin_text("shakespeare")


# ---------------------------------------------------------------- figures

@torch.inference_mode()
def hf_guide_perplexity(hf_model, ids: list[int], ctx: int, stride: int) -> tuple[float, int]:
    """The loop of the Hugging Face perplexity guide, one window at a time: labels -100 on the
    context-only tokens, then the model's shift (logits at t predict token t + 1)."""
    input_all = torch.tensor([ids])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + ctx, len(ids))
        trg_len = end - prev_end
        input_ids = input_all[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        logits = hf_model(input_ids).logits.float()
        labels = target_ids[0, 1:]
        nll_sum += F.cross_entropy(logits[0, :-1], labels, ignore_index=-100, reduction="sum").item()
        n_tokens += int((labels != -100).sum())
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.mark.slow
def test_perplexity_equals_the_transformers_reference_on_the_same_windows(hf_model, text_ids, overlapping):
    reference, reference_tokens = hf_guide_perplexity(hf_model, text_ids, CTX, STRIDE)
    # transformers runs each window alone; ours ran all three in one batch, the short last one
    # right-padded: this also pins that padding changes nothing.
    assert overlapping.windows == 3 and overlapping.batch_size >= 3
    assert overlapping.tokens == reference_tokens == len(text_ids) - 1
    assert overlapping.perplexity == pytest.approx(reference, rel=1e-3)
    assert 2 < overlapping.perplexity < 100  # a small instruct model on English docstrings


def test_token_counts_of_overlapping_and_non_overlapping_windows(text_ids, overlapping, non_overlapping):
    n = len(text_ids)
    assert (overlapping.tokens, overlapping.windows, overlapping.stride) == (n - 1, 3, STRIDE)
    assert (non_overlapping.tokens, non_overlapping.windows) == (n - math.ceil(n / CTX), 2)
    assert overlapping.token_positions.tolist() == list(range(1, n))
    assert non_overlapping.token_positions.tolist() == [t for t in range(1, n) if t != CTX]
    assert math.isclose(overlapping.perplexity, math.exp(overlapping.token_nlls.double().mean().item()))


def test_stride_changes_only_how_much_context_later_tokens_get(overlapping, non_overlapping):
    # Tokens 1..63 are scored in the first window by both, with the same context: same NLL.
    first = slice(0, CTX - 1)
    torch.testing.assert_close(overlapping.token_nlls[first], non_overlapping.token_nlls[first],
                               atol=1e-4, rtol=1e-4)
    # Tokens 65..119 see 32+ tokens before them with stride 32 but only their own window's start
    # without overlap; on this natural text more context means lower NLL, there and overall.
    later_overlapping = overlapping.token_nlls[overlapping.token_positions > CTX].mean()
    later_non_overlapping = non_overlapping.token_nlls[non_overlapping.token_positions > CTX].mean()
    assert later_overlapping < later_non_overlapping
    assert overlapping.perplexity <= non_overlapping.perplexity

