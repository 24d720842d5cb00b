"""The int8 KV cache: values come back within a rounding step, the pool holds ~3.8x the tokens,
and greedy generations stay close to the float cache's."""

from __future__ import annotations

import pytest
import torch

from leapllm.config import EngineConfig
from leapllm.engine.llm_engine import LLMEngine
from leapllm.engine.sampling import SamplingParams
from leapllm.errors import InvalidRequestError
from leapllm.model.paged_kv_cache import PagedKVCache
from tests.engine_helpers import run_to_completion
from tests.model.prompts import PROMPTS


def test_int8_pool_stores_and_gathers_within_half_a_step_per_token_and_head():
    cache = PagedKVCache(1, num_blocks=4, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float32,
                         device="cpu", kv_dtype="int8")
    torch.manual_seed(0)
    k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8) * 10
    slots = torch.tensor([3, 0, 7, 12, 9])
    cache.store(0, slots, k, v)
    k_back, v_back = cache.gather(0, slots)
    for x, back in ((k, k_back), (v, v_back)):
        step = x.abs().amax(-1, keepdim=True) / 127
        assert back.dtype == torch.float32 and ((back - x).abs() <= step / 2 + 1e-6).all()


def test_int8_blocks_take_about_a_quarter_of_float32s_and_float16_half():
    f32 = PagedKVCache.bytes_per_block(30, 16, 3, 64, torch.float32, "float32")
    int8 = PagedKVCache.bytes_per_block(30, 16, 3, 64, torch.float32, "int8")
    assert int8 / f32 == pytest.approx((1 + 4 / 64) / 4)
    # "auto" for a float32 model on a CPU: float16
    assert PagedKVCache.bytes_per_block(30, 16, 3, 64, torch.float32) * 2 == f32
    assert PagedKVCache.bytes_per_block(30, 16, 3, 64, torch.float32, "auto", "meta") == f32
    cache = PagedKVCache(2, 3, 16, 3, 64, torch.float32, "cpu", kv_dtype="int8")
    assert cache.nbytes() == PagedKVCache.bytes_per_block(2, 16, 3, 64, torch.float32, "int8") * 3


def test_unknown_kv_cache_dtype_is_an_error(llm):
    with pytest.raises(InvalidRequestError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="fp4").validate()


@pytest.mark.slow
def test_greedy_generations_with_the_int8_cache_mostly_match_the_float_cache(llm):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outputs = {}
    for kv_dtype in ("auto", "int8"):
        engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(num_blocks=256, kv_cache_dtype=kv_dtype))
        prompts = [llm.encode(p) for name, p in PROMPTS.items() if name != "long"]  # short prompts keep it quick
        outputs[kv_dtype] = run_to_completion(engine, prompts, params)
    # Same tokens up to the first divergence for most prompts; report how far they agree.
    agree = [next((j for j, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
             for x, y in zip(outputs["auto"], outputs["int8"])]
    assert sum(agree) / sum(len(x) for x in outputs["auto"]) > 0.7, agree
