"""Sampling: parameter validation and what each filter does to a known distribution."""

from __future__ import annotations

import pytest
import torch

from leapllm.engine.sampling import Sampler, SamplingParams, greedy_token, greedy_tokens
from leapllm.errors import InvalidRequestError

VOCAB = 8
LOGITS = torch.tensor([4.0, 3.0, 2.5, 1.0, 0.0, -1.0, -2.0, -3.0])


def sampler(prompt=(), **kw) -> Sampler:
    return Sampler(SamplingParams(**kw), list(prompt), VOCAB, torch.device("cpu"))


def draw(s: Sampler, n: int = 400, logits=LOGITS) -> set[int]:
    return {s.sample(logits.clone()) for _ in range(n)}


@pytest.mark.parametrize("kw,field", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -5}, "max_tokens"), ({"max_tokens": 1.5}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"min_p": 2.0}, "min_p"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 3.0}, "presence_penalty"), ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"seed": "x"}, "seed"), ({"stop": [""]}, "stop"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
])
def test_invalid_sampling_values_are_rejected_with_the_field_named(kw, field):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**kw)


def test_a_single_stop_string_is_accepted_as_a_list():
    assert SamplingParams(stop="###").stop == ["###"]


def test_greedy_takes_the_argmax():
    assert draw(sampler(temperature=0), 5) == {0}


def test_top_k_one_is_greedy_even_at_high_temperature():
    assert draw(sampler(temperature=5.0, top_k=1), 50) == {0}


def test_top_k_limits_choices_to_the_k_most_likely():
    assert draw(sampler(temperature=100.0, top_k=3, seed=0)) == {0, 1, 2}


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.softmax(LOGITS, -1)
    assert probs[0] < 0.6 < probs[0] + probs[1]
    assert draw(sampler(temperature=1.0, top_p=0.6, seed=0)) == {0, 1}


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability():
    # exp(3 - 4) = 0.37 and exp(2.5 - 4) = 0.22 of the top token survive 0.2; exp(1 - 4) = 0.05 does not.
    assert draw(sampler(temperature=1.0, min_p=0.2, seed=0)) == {0, 1, 2}


def test_the_same_seed_gives_the_same_samples():
    a, b = sampler(temperature=1.5, seed=123), sampler(temperature=1.5, seed=123)
    assert [a.sample(LOGITS) for _ in range(50)] == [b.sample(LOGITS) for _ in range(50)]


def test_repetition_penalty_lowers_tokens_seen_in_the_prompt():
    s = sampler(prompt=[0], temperature=0, repetition_penalty=2.0)
    assert s.sample(LOGITS.clone()) == 1  # 4.0 / 2 = 2.0 < 3.0


def test_repetition_penalty_makes_negative_logits_more_negative():
    s = sampler(prompt=[5], repetition_penalty=2.0)
    assert s.apply_penalties(LOGITS.clone())[5].item() == -2.0


def test_frequency_and_presence_penalties_count_only_output_tokens():
    s = sampler(prompt=[1], frequency_penalty=0.5, presence_penalty=0.25)
    s.record(0)
    s.record(0)
    penalized = s.apply_penalties(LOGITS.clone())
    assert penalized[0].item() == pytest.approx(4.0 - 2 * 0.5 - 0.25)
    assert penalized[1].item() == 3.0  # in the prompt only: untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_tokens_are_torch_argmax_first_on_ties_in_every_dtype(dtype):
    """NumPy's argmax on the CPU (torch's is ~13x slower on a 49152-wide row), torch's for bfloat16."""
    torch.manual_seed(0)
    logits = torch.randn(5, 1000).to(dtype)
    logits[1, [7, 300]] = 50.0  # a tie: the first wins
    logits[2, 20] = float("nan")  # NaN counts as the largest, as in torch.argmax
    assert greedy_tokens(logits) == logits.argmax(dim=-1).tolist()
    assert greedy_tokens(logits)[1] == 7 and greedy_tokens(logits)[2] == 20
    assert [greedy_token(row) for row in logits] == logits.argmax(dim=-1).tolist()
    assert greedy_token(logits[3, ::2]) == int(logits[3, ::2].argmax())  # a strided view
