"""Driving an LLMEngine by hand in tests."""

from __future__ import annotations


def run_to_completion(engine, prompt_ids: list[list[int]], params) -> list[list[int]]:
    """Add the prompts as requests "0", "1", ..., step until all finish; the tokens of each, in order."""
    for i, ids in enumerate(prompt_ids):
        engine.add_request(str(i), ids, params)
    tokens = {str(i): [] for i in range(len(prompt_ids))}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    return [tokens[str(i)] for i in range(len(prompt_ids))]


def generate_one(model, tokenizer, prompt_ids: list[int], params, speculative=None):
    """One request through a single-sequence engine (what LLM.run uses): (its deltas, the engine)."""
    from leapllm.engine.llm_engine import LLMEngine, single_sequence_config

    engine = LLMEngine(model, tokenizer, single_sequence_config(model.config.context_length, speculative))
    return list(engine.stream("0", prompt_ids, params)), engine


def output_tokens(outputs) -> list[int]:
    return [t for out in outputs for t in out.new_token_ids]
