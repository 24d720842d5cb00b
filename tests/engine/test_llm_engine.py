"""The continuous-batching engine on the default model: same greedy tokens as the single-sequence
path whatever the batch, the pool's limits, prefix caching and chunked prefill; every block back."""

from __future__ import annotations

import pytest
import torch

from leapllm.config import EngineConfig
from leapllm.engine.llm_engine import LLMEngine
from leapllm.engine.sampling import SamplingParams
from leapllm.errors import InvalidRequestError
from tests.model.prompts import PROMPTS

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def run_all(engine: LLMEngine, requests: dict[str, list[int]], params=GREEDY, **kw) -> dict[str, list]:
    for request_id, ids in requests.items():
        engine.add_request(request_id, ids, params, **kw)
    outs: dict[str, list] = {r: [] for r in requests}
    while engine.has_unfinished():
        for out in engine.step():
            outs[out.request_id].append(out)
    return outs


def tokens(outs) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def assert_pool_free(engine: LLMEngine) -> None:
    a = engine.allocator
    assert a.num_free == a.num_blocks and all(c == 0 for c in a.ref_count)


@pytest.fixture(scope="module")
def prompt_ids(llm):
    return {name: llm.encode(text) for name, text in PROMPTS.items()}


@pytest.fixture(scope="module")
def alone(llm, prompt_ids):
    """Greedy tokens of each prompt from the core single-sequence path (contiguous KV cache)."""
    return {name: llm.run(ids, GREEDY).token_ids for name, ids in prompt_ids.items()}


@pytest.mark.slow
def test_greedy_tokens_in_a_batch_of_32_equal_each_prompt_alone(llm, prompt_ids, alone):
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(max_num_seqs=32, num_blocks=512))
    names = list(prompt_ids)
    requests = {f"{names[i % len(names)]}-{i}": prompt_ids[names[i % len(names)]] for i in range(32)}
    outs = run_all(engine, requests)
    for request_id, o in outs.items():
        assert tokens(o) == alone[request_id.rsplit("-", 1)[0]], request_id
        assert o[-1].finished and o[-1].finish_reason == "length"
    assert_pool_free(engine)


def test_tiny_pool_preempts_and_recomputes_without_changing_tokens(llm, prompt_ids, alone):
    # 10 blocks of 16 tokens cannot hold four ~40-token sequences at once: someone is preempted.
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(max_num_seqs=4, max_num_batched_tokens=64,
                                                              num_blocks=10, enable_prefix_caching=False))
    names = ["english", "code", "emoji", "math"]
    outs = run_all(engine, {n: prompt_ids[n] for n in names})
    assert engine.scheduler.num_preemptions > 0
    for n in names:
        assert tokens(outs[n]) == alone[n], n
    assert_pool_free(engine)


def test_chunked_prefill_of_a_long_prompt_gives_the_same_tokens(llm, prompt_ids, alone):
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(max_num_seqs=4, max_num_batched_tokens=96,
                                                              num_blocks=128))
    outs = run_all(engine, {"long": prompt_ids["long"], "french": prompt_ids["french"]})
    assert len(prompt_ids["long"]) > 1000  # at least 11 chunks, interleaved with the other's decode
    assert tokens(outs["long"]) == alone["long"]
    assert tokens(outs["french"]) == alone["french"]
    assert_pool_free(engine)


def test_shared_prompt_prefix_is_served_from_cache_with_identical_output(llm):
    system = llm.encode(PROMPTS["long"])[:400]
    a, b = system + llm.encode(" First question:"), system + llm.encode(" Second question:")
    plain = LLMEngine(llm.model, llm.tokenizer, EngineConfig(num_blocks=128, enable_prefix_caching=False))
    expected = {k: tokens(v) for k, v in run_all(plain, {"a": a, "b": b}).items()}
    cached = LLMEngine(llm.model, llm.tokenizer, EngineConfig(num_blocks=128))
    first = run_all(cached, {"a": a})
    second = run_all(cached, {"b": b})
    assert first["a"][0].num_cached_tokens == 0
    assert second["b"][0].num_cached_tokens == 400 // 16 * 16  # every full block of the shared prefix
    assert tokens(first["a"]) == expected["a"] and tokens(second["b"]) == expected["b"]
    assert cached.allocator.prefix_hits == 400 // 16 * 16
    assert_pool_free(cached)


def test_abort_frees_blocks_and_leaves_other_requests_untouched(llm, prompt_ids, alone):
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(num_blocks=64))
    engine.add_request("keep", prompt_ids["english"], GREEDY)
    engine.add_request("drop", prompt_ids["code"], GREEDY)
    kept = []
    for _ in range(3):
        kept += [o for o in engine.step() if o.request_id == "keep"]
    final = engine.abort_request("drop")
    assert final.finished and final.finish_reason == "abort"
    assert engine.abort_request("drop") is None  # already gone
    while engine.has_unfinished():
        kept += engine.step()
    assert tokens(kept) == alone["english"]
    assert_pool_free(engine)


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(llm, prompt_ids):
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(num_blocks=128))
    alone_out = tokens(run_all(engine, {"x": prompt_ids["english"]}, params)["x"])
    batch = run_all(engine, {"x": prompt_ids["english"], "y": prompt_ids["code"], "z": prompt_ids["math"]}, params)
    assert tokens(batch["x"]) == alone_out


def test_stop_tokens_stop_strings_and_max_tokens_end_requests_with_their_reason(llm, prompt_ids, alone):
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(num_blocks=64))
    ref = alone["english"]
    stop_text = llm.tokenizer.decode(ref[:6])[-3:]
    outs = run_all(engine, {"tok": prompt_ids["english"]},
                   SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[ref[4]], ignore_eos=True))
    assert outs["tok"][-1].finish_reason == "stop" and outs["tok"][-1].stop_reason == ref[4]
    outs = run_all(engine, {"str": prompt_ids["english"]},
                   SamplingParams(max_tokens=24, temperature=0, stop=[stop_text], ignore_eos=True))
    text = "".join(o.new_text for o in outs["str"])
    assert outs["str"][-1].stop_reason == stop_text and stop_text not in text
    assert_pool_free(engine)


def test_logprobs_are_the_model_distribution_and_prompt_logprobs_match_a_full_forward(llm, prompt_ids):
    # A float32 pool: the full forward pass below keeps its keys unrounded.
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(num_blocks=64, max_num_batched_tokens=64,
                                                              kv_cache_dtype="float32"))
    ids = prompt_ids["math"]
    outs = run_all(engine, {"m": ids}, SamplingParams(max_tokens=4, temperature=0), logprobs=3, prompt_logprobs=2)
    with torch.inference_mode():
        full = torch.log_softmax(llm.model(torch.tensor([ids])).float()[0], dim=-1)  # (seq, vocab)
    prompt_lp = outs["m"][0].prompt_logprobs
    assert prompt_lp[0] is None and len(prompt_lp) == len(ids)
    for i in range(1, len(ids)):
        assert prompt_lp[i].token_id == ids[i]
        assert prompt_lp[i].logprob == pytest.approx(float(full[i - 1, ids[i]]), abs=1e-3)
        assert len(prompt_lp[i].top) == 2
    first = outs["m"][0].new_logprobs[0]
    assert first.logprob == pytest.approx(float(full[-1].max()), abs=1e-3)
    assert first.top[0][0] == first.token_id and len(first.top) == 3  # greedy picks the most likely
    assert all(o.prompt_logprobs is None for o in outs["m"][1:])


def test_requests_that_can_never_run_are_refused_up_front(llm):
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(num_blocks=4))
    with pytest.raises(InvalidRequestError, match="KV-cache blocks"):
        engine.add_request("big", list(range(100)), SamplingParams(max_tokens=100))
    with pytest.raises(InvalidRequestError, match="logprobs"):
        engine.add_request("lp", [1, 2, 3], SamplingParams(max_tokens=4), logprobs=21)
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        engine.add_request("voc", [1, 10**7], SamplingParams(max_tokens=4))
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("empty", [], SamplingParams(max_tokens=4))
    engine.add_request("ok", [1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("ok", [1, 2, 3], SamplingParams(max_tokens=2))
    assert not engine.has_unfinished() or engine.num_waiting == 1


def test_bad_engine_settings_are_user_errors(llm):
    with pytest.raises(InvalidRequestError):
        LLMEngine(llm.model, llm.tokenizer, EngineConfig(max_num_seqs=0))
    with pytest.raises(InvalidRequestError):
        LLMEngine(llm.model, llm.tokenizer, EngineConfig(max_num_seqs=8, max_num_batched_tokens=4))
    with pytest.raises(InvalidRequestError):
        LLMEngine(llm.model, llm.tokenizer, EngineConfig(kv_cache_gb=-1))
    with pytest.raises(InvalidRequestError):
        LLMEngine(llm.model, llm.tokenizer, EngineConfig(kv_cache_gb=1e-6))


def test_llm_generate_batches_prompts_and_keeps_their_order(llm, prompt_ids, alone):
    names = ["english", "code", "chinese"]
    outs = llm.generate([PROMPTS[n] for n in names], GREEDY)
    for n, out in zip(names, outs):
        assert out.token_ids == alone[n] and out.prompt == PROMPTS[n]
    assert_pool_free(llm.engine)
