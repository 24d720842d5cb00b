"""One decode loop: `LLM.run`, `stream` and `chat` are requests on an LLMEngine whose model runner
keeps one contiguous cache per request (EngineConfig(single_sequence=True)), and they give what the
batching engine gives."""

from __future__ import annotations

import pytest

from leapllm.config import EngineConfig
from leapllm.engine.llm_engine import LLMEngine, single_sequence_config
from leapllm.engine.sampling import SamplingParams
from leapllm.errors import InvalidRequestError
from tests.engine_helpers import generate_one, output_tokens

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def test_run_goes_through_the_single_sequence_engine_and_leaves_nothing_behind(llm):
    engine = llm.single_sequence_engine
    before = engine.num_prompt_tokens
    ids = llm.encode("The capital of France is")
    out = llm.run(ids, GREEDY)
    assert engine.config.single_sequence and engine.num_prompt_tokens == before + len(ids)
    assert len(out.token_ids) == 16 and out.finish_reason == "length"
    assert not engine.has_unfinished() and not engine.runner.caches


def test_run_and_the_batching_engine_give_the_same_greedy_tokens_and_text(llm):
    prompts = ["Once upon a time", "def add(a, b):", "Les fleurs du printemps"]
    batched = llm.generate(prompts, GREEDY)
    for prompt, expected in zip(prompts, batched):
        out = llm.run(llm.encode(prompt), GREEDY)
        assert (out.token_ids, out.text, out.finish_reason) == (expected.token_ids, expected.text,
                                                                expected.finish_reason)


def test_stop_strings_end_run_and_generate_alike(llm):
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=["four"])
    ran = llm.run(llm.encode("One, two, three,"), params)
    generated = llm.generate(["One, two, three,"], params)[0]
    assert (ran.text, ran.finish_reason, ran.stop_reason) == (generated.text, "stop", "four")


def test_closing_a_stream_early_aborts_its_request_and_frees_its_cache(llm):
    stream = llm.stream("Tell me a long story about a dragon", SamplingParams(max_tokens=64, temperature=0))
    next(stream)
    stream.close()
    engine = llm.single_sequence_engine
    assert not engine.has_unfinished() and not engine.sequences and not engine.runner.caches


def test_a_prompt_that_does_not_fit_is_an_error_before_anything_runs(llm):
    too_long = [1] * llm.config.context_length
    with pytest.raises(InvalidRequestError, match="exceeds the context length"):
        llm.run(too_long, SamplingParams(max_tokens=8))
    assert not llm.single_sequence_engine.has_unfinished()


def test_prompt_logprobs_and_chunked_prefill_work_on_a_contiguous_cache(llm):
    """A single-sequence engine with a small token budget prefills in chunks on its contiguous cache
    and still reports every prompt token's logprob; the tokens match the one-pass prefill."""
    ids = llm.encode("The quick brown fox jumps over the lazy dog because")
    config = EngineConfig(max_num_seqs=1, max_num_batched_tokens=4, num_blocks=64, enable_prefix_caching=False,
                          single_sequence=True)
    engine = LLMEngine(llm.model, llm.tokenizer, config)
    engine.add_request("a", ids, GREEDY, prompt_logprobs=0)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert output_tokens(outs) == output_tokens(generate_one(llm.model, llm.tokenizer, ids, GREEDY)[0])
    first = next(o for o in outs if o.prompt_logprobs is not None)
    assert len(first.prompt_logprobs) == len(ids) and first.prompt_logprobs[0] is None


@pytest.mark.parametrize("changes", [{"max_num_seqs": 2, "max_num_batched_tokens": 8},
                                     {"enable_prefix_caching": True}])
def test_a_single_sequence_engine_runs_one_request_without_prefix_caching(changes):
    settings = {"max_num_seqs": 1, "enable_prefix_caching": False, "single_sequence": True} | changes
    with pytest.raises(InvalidRequestError, match="single-sequence"):
        EngineConfig(**settings).validate()


def test_single_sequence_config_counts_blocks_for_a_whole_context():
    config = single_sequence_config(8192)
    config.validate()
    assert config.num_blocks * config.block_size >= 8192 and config.max_num_batched_tokens == 8192


@pytest.mark.parametrize("kv_cache_dtype,stored", [("auto", "float16"), ("float32", "float32")])
def test_the_contiguous_cache_stores_what_the_engine_config_asks(llm, kv_cache_dtype, stored):
    """LLM.run's cache follows EngineConfig.kv_cache_dtype ("auto": float16 for a float32 model on a CPU)."""
    import torch

    config = single_sequence_config(llm.model.config.context_length, kv_cache_dtype=kv_cache_dtype)
    engine = LLMEngine(llm.model, llm.tokenizer, config)
    engine.add_request("r", llm.encode("Hello"), SamplingParams(max_tokens=3, temperature=0))
    engine.step()
    assert engine.runner.caches["r"].k[0].dtype == getattr(torch, stored)
