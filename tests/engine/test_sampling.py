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


MIXED = [dict(temperature=0.7), dict(temperature=1.3, top_k=5), dict(temperature=0.9, top_p=0.6),
         dict(temperature=1.0, min_p=0.2), dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
         dict(temperature=2.0, top_k=1000)]


def literal_filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The filters as the docstring states them, one row, with nothing shared with the engine's code."""
    x = logits.double() / p.temperature
    if 0 < p.top_k < x.shape[0]:
        x[x < sorted(x.tolist(), reverse=True)[p.top_k - 1]] = float("-inf")
    probs = torch.softmax(x, 0)
    if p.top_p < 1.0:
        order = sorted(range(len(probs)), key=lambda i: -probs[i].item())
        mass = 0.0
        for i in order:
            if mass >= p.top_p:
                probs[i] = 0.0
            mass += torch.softmax(x, 0)[i].item()
    if p.min_p > 0.0:
        probs[probs < p.min_p * probs.max()] = 0.0
    return probs


def test_rows_with_different_filters_are_filtered_in_one_batch_as_each_alone():
    from leapllm.engine.sampling import filtered_probs

    logits = torch.randn(len(MIXED), 64, generator=torch.Generator().manual_seed(3)) * 3
    params = [SamplingParams(**kw) for kw in MIXED]
    batch = filtered_probs(params, logits)
    for row, p, got in zip(logits, params, batch):
        assert torch.allclose(got.double(), literal_filter(row, p), atol=1e-6), p


def test_a_batch_of_rows_draws_as_each_sampler_would():
    from leapllm.engine.sampling import sample_rows

    logits = torch.randn(8, 64, generator=torch.Generator().manual_seed(4)) * 3
    kinds = [dict(temperature=0), dict(temperature=0, repetition_penalty=5.0), dict(temperature=1.0, top_k=3),
             dict(temperature=0.8, seed=11), dict(temperature=1.0, top_k=1), dict(temperature=1.2, seed=12, top_p=0.9),
             dict(temperature=0.5, top_p=0.5), dict(temperature=1.0, presence_penalty=2.0, top_k=2)]
    prompt = [int(logits[1].argmax())]  # the penalized greedy row must move off its argmax
    samplers, twins = ([Sampler(SamplingParams(**kw), prompt, 64, torch.device("cpu")) for kw in kinds]
                       for _ in range(2))
    for s in samplers + twins:
        s.record(int(logits[7].argmax()))
    for _ in range(20):
        tokens = sample_rows(samplers, logits)
        assert tokens[0] == int(logits[0].argmax())
        assert tokens[1] == twins[1].sample(logits[1]) != int(logits[1].argmax())
        assert tokens[2] in logits[2].topk(3).indices.tolist() and tokens[4] == int(logits[4].argmax())
        assert tokens[3] == twins[3].sample(logits[3]) and tokens[5] == twins[5].sample(logits[5])  # seeded streams
        assert tokens[7] in twins[7].apply_penalties(logits[7]).topk(2).indices.tolist()


@pytest.mark.parametrize("kw", MIXED + [dict(temperature=1.0, top_p=0.97), dict(temperature=0.3, top_p=0.8)])
def test_each_filter_draws_tokens_at_its_distributions_frequencies(kw):
    """20,000 draws of one row (a peaked vocabulary of 2,000, as a model's: the top-p rows take the
    candidates path) against literal_filter's probabilities, by total variation distance."""
    from leapllm.engine import sampling

    assert sampling.NUCLEUS_CANDIDATES < 2000
    from leapllm.engine.sampling import sample_rows

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2000, generator=g) * 2
    logits[:20] += 8  # a nucleus of ~20 likely tokens
    params = SamplingParams(**kw)
    expected = literal_filter(logits, params)
    expected /= expected.sum()
    samplers = [Sampler(params, [], 2000, torch.device("cpu")) for _ in range(500)]
    counts = torch.zeros(2000)
    for _ in range(40):
        for t in sample_rows(samplers, logits.expand(500, -1)):
            counts[t] += 1
    assert counts[expected == 0].sum() == 0  # nothing a filter drops is ever drawn
    # As close as torch.multinomial's own 20,000 draws from the literal distribution come (sampling noise
    # grows with the number of tokens kept).
    reference = torch.bincount(torch.multinomial(expected, 20000, replacement=True, generator=g), minlength=2000)

    def distance(c):
        return 0.5 * (c / c.sum() - expected).abs().sum().item()

    assert distance(counts) < 1.3 * distance(reference.double()) + 0.01


def test_ties_at_the_kth_logit_are_all_kept_as_the_full_filter_keeps_them():
    logits = torch.tensor([5.0, 3.0, 3.0, 3.0, 0.0])
    seen = {sampler(top_k=2, temperature=1.0).sample(logits) for _ in range(300)}
    assert seen == {0, 1, 2, 3}
