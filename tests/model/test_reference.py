"""Our decoder against the reference: Hugging Face transformers on the same GGUF, float32.

Logits must agree to 1e-3 at every position and 64 greedy tokens must be identical, on a battery
of prompts that includes Chinese, emoji, code and a 1,000+ token prompt.
"""

from __future__ import annotations

import pytest
import torch

from leapllm import LLM, SamplingParams
from tests.conftest import requires_cuda
from tests.model.hf_reference import hf_greedy
from tests.model.prompts import PROMPTS

GREEDY_TOKENS = 64


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PROMPTS))
@torch.inference_mode()
def test_float32_logits_and_64_greedy_tokens_match_transformers(llm, hf_model, name):
    ids = llm.encode(PROMPTS[name])
    if name == "long":
        assert len(ids) >= 1000
    ours = llm.model(torch.tensor([ids]))
    ref = hf_model(torch.tensor([ids])).logits
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-3

    greedy = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0, ignore_eos=True)
    out = llm.generate([ids], greedy)[0]
    assert out.token_ids == hf_greedy(hf_model, ids, GREEDY_TOKENS)


def cached_pieces(llm, ids: list[int], kv_cache_dtype: str) -> torch.Tensor:
    """Logits of ids run as a 7-token chunk, a 13-token chunk, then one token at a time on a cache."""
    with torch.inference_mode():
        cache = llm.model.new_kv_cache(1, len(ids), kv_cache_dtype)
        pieces = [llm.model(torch.tensor([ids[:7]]), 0, cache), llm.model(torch.tensor([ids[7:20]]), 7, cache)]
        pieces += [llm.model(torch.tensor([[t]]), pos, cache) for pos, t in enumerate(ids[20:], start=20)]
    return torch.cat(pieces, dim=1)


def test_cached_decode_matches_a_full_forward_pass(llm):
    ids = llm.encode(PROMPTS["english"] + " " + PROMPTS["french"])
    with torch.inference_mode():
        full = llm.model(torch.tensor([ids]))
    # Different matmul shapes reduce in different orders: agreement to float32 rounding, not bits.
    assert (cached_pieces(llm, ids, "float32") - full).abs().max().item() < 1e-3


def test_a_float16_cache_halves_the_bytes_and_keeps_every_next_token_choice(llm):
    ids = llm.encode(PROMPTS["english"] + " " + PROMPTS["french"])
    assert llm.model.new_kv_cache(1, 64).k[0].dtype == torch.float16  # "auto" for a float32 model on a CPU
    assert llm.model.new_kv_cache(1, 64).nbytes() * 2 == llm.model.new_kv_cache(1, 64, "float32").nbytes()
    with torch.inference_mode():
        full = llm.model(torch.tensor([ids]))
    half = cached_pieces(llm, ids, "float16")
    # Keys and values rounded to float16 (11 significant bits) move logits of magnitude ~20 by a few
    # hundredths; the choice of the next token stays.
    assert (half - full).abs().max().item() < 0.1
    assert torch.equal(half.argmax(-1), full.argmax(-1))


def top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item()


@pytest.mark.slow
@torch.inference_mode()
def test_bfloat16_on_cpu_agrees_with_float32_on_next_token_choice(llm):
    bf16 = LLM(dtype="bfloat16", device="cpu")
    assert bf16.model.dtype == torch.bfloat16
    ids = torch.tensor([llm.encode(PROMPTS["long"])])
    assert top1_agreement(bf16.model(ids), llm.model(ids)) > 0.9


@requires_cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@torch.inference_mode()
def test_cuda_logits_match_transformers_reference(llm, hf_model, dtype):
    gpu = LLM(dtype=dtype, device="cuda")
    assert gpu.model.device.type == "cuda"
    for name in ("english", "chinese", "code", "long"):
        ids = llm.encode(PROMPTS[name])
        ours = gpu.model(torch.tensor([ids], device="cuda")).cpu()
        ref = hf_model(torch.tensor([ids])).logits
        if dtype == "float32":  # TF32 matmuls are off by default, so float32 on CUDA is close too
            assert (ours - ref).abs().max().item() < 1e-2
        else:
            # Half precision: the argmax may flip only where the top two logits nearly tie.
            # bfloat16 keeps 8 mantissa bits to float16's 11, so its rounding error is ~8x larger
            # (measured on an H100: mean |diff| 0.11 in bfloat16, below 0.1 in float16).
            assert top1_agreement(ours, ref) > 0.9
            assert (ours - ref).abs().mean().item() < (0.25 if dtype == "bfloat16" else 0.1)
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    ids = llm.encode(PROMPTS["chat"])
    assert gpu.generate([ids], greedy)[0].token_ids[:8] == llm.generate([ids], greedy)[0].token_ids[:8]
