"""leapllm profile's speculative-decoding section: what speculation did on one prompt."""

from __future__ import annotations

from leapllm.config import SpeculativeConfig
from leapllm.profiling.speculation import describe, profile_speculation

REPETITIVE = "one two three four five six seven eight nine ten. one two three four five six seven eight nine ten."


def test_speculation_profile_counts_acceptance_and_times_and_checks_the_output(llm):
    ids = llm.encode(REPETITIVE)
    # ngram_min=1: the lookup must find something within 12 tokens; what is pinned here is the counts
    spec = SpeculativeConfig("ngram", 4, adaptive=False, ngram_min=1)
    s = profile_speculation(llm.model, llm.tokenizer, spec, ids, 12)
    assert s["identical_to_plain"] is True
    assert s["verification_steps"] > 0 and 0 <= s["accepted_tokens"] <= s["proposed_tokens"]
    assert s["acceptance_rate"] == s["accepted_tokens"] / s["proposed_tokens"]
    # every emitted token after the first comes from a verification (kept proposals + 1) or a plain step
    assert s["accepted_tokens"] + s["verification_steps"] + s["plain_steps"] == 11
    assert s["verify_ms"] > 0 and s["plain_decode_tokens_per_s"] > 0 and s["speculative_decode_tokens_per_s"] > 0
    text = describe(s)
    assert "proposed tokens kept" in text and "identical to plain" in text
