"""Agreement with a reference: exact with itself, high but imperfect for a bfloat16 copy."""

from __future__ import annotations

import pytest
import torch

from leapllm import LLM
from leapllm.errors import InvalidRequestError
from leapllm.evaluation import builtin_text
from leapllm.evaluation.agreement import agreement
from leapllm.model.config import ModelConfig
from leapllm.model.llama import Transformer

CTX, TOKENS = 64, 128  # three windows: [0, 64), [32, 96) and [64, 128)


@pytest.fixture(scope="module")
def text_ids(llm):
    return llm.tokenizer.encode(builtin_text("python-docs-heldout"))[:TOKENS]


def test_a_model_agrees_with_itself_exactly(llm, text_ids):
    result = agreement(llm.model, llm.model, text_ids[:80], ctx=64)  # windows [0, 64) and [32, 80)
    assert (result.tokens, result.windows, result.stride) == (79, 2, 32)
    assert result.agreement == 1.0 and result.top5_overlap == 1.0
    assert abs(result.mean_kl) < 1e-6
    assert result.model_perplexity == pytest.approx(result.reference_perplexity, rel=1e-6)


@pytest.mark.slow
def test_a_bfloat16_copy_agrees_highly_but_not_perfectly(llm, text_ids):
    bf16 = LLM(dtype="bfloat16", device="cpu")
    result = agreement(bf16.model, llm.model, text_ids, ctx=CTX)
    assert 0.85 < result.agreement < 1.0
    assert 0.0 < result.mean_kl < 0.1
    assert 0.8 < result.top5_overlap < 1.0
    assert result.model_perplexity == pytest.approx(result.reference_perplexity, rel=0.1)


def test_different_vocabularies_are_refused(llm, text_ids):
    config = ModelConfig(architecture="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=1,
                         num_heads=4, num_kv_heads=2, head_dim=16, context_length=256)
    other = Transformer(config).eval()
    with pytest.raises(InvalidRequestError, match="vocabulary mismatch: the model has 512 tokens, the reference 49152"):
        agreement(other, llm.model, torch.tensor(text_ids) % 512, ctx=CTX)
