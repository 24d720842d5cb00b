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
