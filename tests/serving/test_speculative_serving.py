"""The server with speculative decoding: same completions, streamed token by token or several at a
time, and the acceptance counters in /metrics."""

from __future__ import annotations

import pytest

from leapllm.config import EngineConfig
from leapllm.engine.sampling import SamplingParams
from leapllm.config import SpeculativeConfig
from tests.serving.conftest import MODEL_NAME, read_metrics, start_server

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n" \
         "def factorial(n):\n    if n < 2:\n        return 1\n"


@pytest.fixture(scope="module")
def speculative_server(llm):
    config = EngineConfig(max_num_seqs=4, num_blocks=128,
                          speculative=SpeculativeConfig("ngram", 4, adaptive=False))
    running = start_server(llm, config, max_waiting=8)
    yield running
    running.thread.stop()


@pytest.mark.slow
def test_speculative_server_completes_and_streams_the_plain_greedy_text_and_counts_acceptance(llm, speculative_server):
    client = speculative_server.openai()
    plain = llm.run(llm.encode(PROMPT), SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)).token_ids
    expected = llm.tokenizer.decode(plain)
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=40, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == expected and r.usage.completion_tokens == 40
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=40, temperature=0, stream=True, extra_body={"ignore_eos": True})
        if c.choices)
    assert streamed == expected
    metrics = read_metrics(speculative_server.url)
    proposed = metrics[("leapllm:spec_decode_num_draft_tokens_total", ())]
    accepted = metrics[("leapllm:spec_decode_num_accepted_tokens_total", ())]
    assert 0 < accepted <= proposed
    assert metrics[("leapllm:spec_decode_acceptance_rate", ())] == pytest.approx(accepted / proposed)
    assert speculative_server.wait_idle()["kv_blocks_used"] == 0
