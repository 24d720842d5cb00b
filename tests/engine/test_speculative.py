"""Speculative decoding: verification keeps the target's output (greedy: the same tokens; sampled: the
same distribution), in the single-sequence path and in the continuous-batching engine."""

from __future__ import annotations

import pytest
import torch

from leapllm.compression.distill import student_from_teacher_layers
from leapllm.config import EngineConfig, SpeculativeConfig
from leapllm.engine.llm_engine import LLMEngine
from leapllm.engine.sampling import Sampler, SamplingParams
from leapllm.engine.speculative import (
    NgramProposer,
    SpeculationController,
    check_draft_model,
    verify_proposals,
)
from leapllm.errors import InvalidRequestError
from leapllm.llm import LLM
from tests.cli_helpers import assert_one_line_error
from tests.engine_helpers import generate_one, output_tokens, run_to_completion
from tests.tiny_models import TINY_VOCAB, tiny_hf_state, write_tiny_gguf

# Chat prompts of the kinds the benchmark uses: code (repetitive), a summary of given text, free prose.
MESSAGES = [
    "Write a Python function that returns the squares of a list of numbers, then show how to call it.",
    "Repeat this sentence three times: The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Answer in one sentence.",
]


@pytest.fixture(scope="module")
def prompts(llm):
    return [llm.encode_chat([{"role": "user", "content": m}]) for m in MESSAGES]


@pytest.fixture(scope="module")
def draft(llm):
    """A shallow student of the default model (6 of its 30 blocks, untrained): nearly always wrong,
    so every rejection path runs."""
    return student_from_teacher_layers(llm.model, 6).eval()


# (method, draft): n-gram lookup; the target as its own draft (every proposal kept: multi-token
# steps and bonus tokens); the shallow student (nearly every proposal rejected).
PROPOSERS = [("ngram", None), ("draft", "self"), ("draft", "shallow")]


def speculative_config(llm, draft, method, which, k=4, **kwargs):
    model = {"self": llm.model, "shallow": draft, None: None}[which]
    return SpeculativeConfig(method, k, model, adaptive=False, **kwargs)


def plain_tokens(llm, ids, params):
    return output_tokens(generate_one(llm.model, llm.tokenizer, ids, params)[0])


# -- the verification rule ---------------------------------------------------------------------

def sampler_for(params: SamplingParams, vocab: int, seed: int = 0) -> Sampler:
    s = Sampler(params, [], vocab, torch.device("cpu"))
    s.generator = torch.Generator().manual_seed(seed)
    return s


def test_greedy_verification_keeps_proposals_up_to_the_first_that_is_not_the_argmax():
    logits = torch.full((4, 5), -1.0)
    for row, best in enumerate([2, 3, 1, 4]):
        logits[row, best] = 1.0
    s = sampler_for(SamplingParams(temperature=0, max_tokens=8), 5)
    assert verify_proposals(s, logits, [2, 3, 1], None) == [2, 3, 1, 4]  # all kept, then the bonus token
    assert verify_proposals(s, logits, [2, 0, 1], None) == [2, 3]  # the second is wrong: the target's instead
    assert verify_proposals(s, logits, [4, 3, 1], None) == [2]


def emitted_distribution(target_probs, draft_probs, n, use_draft_probs, seed=0):
    """Run the rule n times on fixed per-position target and draft distributions; the empirical
    distribution of the first and second emitted tokens."""
    vocab = target_probs.shape[1]
    k = draft_probs.shape[0]
    params = SamplingParams(temperature=1.0, max_tokens=8)
    s = sampler_for(params, vocab, seed)
    g = torch.Generator().manual_seed(seed + 1)
    counts = torch.zeros(2, vocab)
    logits = target_probs.log()
    for _ in range(n):
        proposals = [int(torch.multinomial(draft_probs[i], 1, generator=g)) for i in range(k)]
        out = verify_proposals(s, logits, proposals, draft_probs if use_draft_probs else None)
        counts[0, out[0]] += 1
        if len(out) > 1:  # a second token only after a kept first one
            counts[1, out[1]] += 1
    return counts[0] / counts[0].sum(), counts[1] / counts[1].sum()


def test_sampled_verification_with_a_draft_distribution_emits_the_targets_distribution():
    target = torch.tensor([[0.50, 0.20, 0.15, 0.10, 0.05], [0.05, 0.05, 0.30, 0.30, 0.30],
                           [0.20, 0.20, 0.20, 0.20, 0.20]])
    draft = torch.tensor([[0.10, 0.10, 0.10, 0.30, 0.40], [0.60, 0.10, 0.10, 0.10, 0.10]])
    first, second = emitted_distribution(target, draft, 20000, use_draft_probs=True)
    assert (first - target[0]).abs().sum() / 2 < 0.02, first
    # The second token is emitted after a kept first one or as a resample; either way it is p_1's.
    assert (second - target[1]).abs().sum() / 2 < 0.03, second


def test_sampled_verification_of_certain_proposals_emits_the_targets_distribution():
    """n-gram proposals are point masses: the rule keeps one with probability p(d)."""
    target = torch.tensor([[0.40, 0.30, 0.20, 0.10], [0.25, 0.25, 0.25, 0.25]])
    point = torch.tensor([[0.0, 0.0, 1.0, 0.0]])  # always proposes token 2
    first, _ = emitted_distribution(target, point, 20000, use_draft_probs=False)
    assert (first - target[0]).abs().sum() / 2 < 0.02, first


def test_ngram_proposer_continues_the_latest_earlier_occurrence_of_the_longest_matching_tail():
    p = NgramProposer(ngram_max=3, ngram_min=1)
    ids = [5, 6, 7, 8, 9, 1, 6, 7, 8, 2, 3, 6, 7]
    assert p.propose(ids, 3) == [8, 2, 3]  # "6 7" last seen at 6..7, followed by 8 2 3
    assert p.propose(ids + [4], 2) == []  # 4 never appeared before
    assert p.propose(ids + [4, 6, 7], 2) == [4, 6]  # the index grows with the list


def simulate(controller, steps: int, plain_s: float, step_s, kept) -> list[int]:
    """Decode `steps` steps under the controller: a plain step takes plain_s, one with k proposals
    step_s(k, plain steps since the last speculative one) and keeps kept(k) of them. Returns the k
    of every step."""
    ks, run = [], 0
    for _ in range(steps):
        k = controller.num_tokens()
        ks.append(k)
        if k == 0:
            controller.record_plain(plain_s)
            run += 1
        else:
            controller.record_speculative(step_s(k, run), k, kept(k))
            run = 0
    return ks


def test_controller_stops_speculating_while_it_is_slower_than_plain_decoding_and_probes_with_one_token():
    c = SpeculationController(4, catches_up=True)
    assert c.num_tokens() == 0  # a plain step is measured first
    c.record_plain(0.010)
    assert c.num_tokens() == 1  # the prior (alpha 1/2, 30% per proposal) favours one proposal
    c.record_speculative(0.030, 1, 0)  # 30 ms for one token: worse than 10 ms
    assert simulate(c, 8, 0.010, None, None) == [0] * 8
    assert c.num_tokens() == 1  # the probe: one proposal
    c.record_speculative(0.030, 1, 0)
    # at least four times as long before the next probe (32 steps), here longer: the probe lost
    # 20 ms, and the next is expected to lose that much per 8 plain steps since (a draft catches
    # up on them), so probing again would take the loss beyond 2% of the decode time
    assert simulate(c, 500, 0.010, None, None) == [0] * 500
    assert c.probe_loss_s == pytest.approx(0.020) and c.acceptance_rate == 0.0


@pytest.mark.parametrize("catch_up_s", [0.0, 0.0006, 0.005])
@pytest.mark.parametrize("verify_s", [0.012, 0.030])
def test_controller_keeps_a_useless_proposer_within_its_probe_budget(catch_up_s, verify_s):
    """However long the request, probing a proposer that is never right costs about 2% of the
    time: a draft model that also catches up on every token since its last step (catch_up_s per
    token), or a proposer that costs nothing but the verification (n-gram lookup)."""
    c = SpeculationController(4, catches_up=catch_up_s > 0)
    ks = simulate(c, 5000, 0.010, lambda k, run: verify_s + catch_up_s * run, lambda k: 0)
    assert c.elapsed_s / (5000 * 0.010) - 1 < 0.03
    assert ks.count(1) >= (5 if catch_up_s == 0 else 2)  # probes go on where they cost little


def test_controller_picks_the_k_with_the_most_expected_tokens_per_second():
    c = SpeculationController(7)
    c.record_plain(0.010)
    for _ in range(30):  # every proposal kept, 1 ms per proposal: alpha -> 1, so the longest k pays best
        k = c.num_tokens()
        assert k >= 1
        c.record_speculative(0.010 + 0.001 * k, k, k)
    assert c.num_tokens() == 7
    # alpha 0.6 and 2 ms per proposal: E(k) / cost(k) peaks at k = 2 (1.96 tokens in 14 ms, against
    # 1.6 in 12 and 2.18 in 16)
    c = SpeculationController(7)
    c.record_plain(0.010)
    c.kept_w, c.tested_w = 6.0, 10.0
    for k in range(1, 8):
        c.cost_s[k] = 0.010 + 0.002 * k
    assert abs(c.alpha - 0.6) < 1e-9
    assert c.best_k()[0] == 2 and c.num_tokens() == 2
    # measured k's set the per-proposal cost of the others: 4 ms here, so k = 3 costs 22 ms
    c.cost_s = {1: 0.014}
    assert abs(c.cost(3) - 0.022) < 1e-9


def test_controller_counts_kept_proposals_up_to_the_first_rejection_as_tested():
    c = SpeculationController(4)
    c.kept_w, c.tested_w = 0.0, 1e-9  # no prior
    c.record_speculative(None, 4, 2)  # kept 2, the third rejected, the fourth never tested
    assert abs(c.alpha - 2 / 3) < 1e-6
    assert c.cost_s == {}  # a time that is not comparable is not a cost


# -- single sequence ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method,which", PROPOSERS)
def test_greedy_speculative_generation_gives_the_same_tokens_as_plain_decoding(llm, prompts, draft, method, which):
    params = SamplingParams(max_tokens=48, temperature=0)
    spec = speculative_config(llm, draft, method, which)
    steps = proposed = accepted = 0
    for ids in prompts:
        outs, engine = generate_one(llm.model, llm.tokenizer, ids, params, spec)
        assert output_tokens(outs) == plain_tokens(llm, ids, params)
        steps += engine.num_spec_steps
        proposed += engine.num_spec_proposed
        accepted += engine.num_spec_accepted
    assert steps > 0
    if which == "self":
        assert accepted == proposed
    elif method == "ngram":
        assert 0 < accepted < proposed


@pytest.mark.slow
def test_speculation_honours_penalties_stop_strings_and_max_tokens(llm, prompts, draft):
    params = SamplingParams(max_tokens=37, temperature=0, repetition_penalty=1.3, frequency_penalty=0.5,
                            stop=["\n\n"])
    spec = speculative_config(llm, draft, "draft", "self", k=7)
    for ids in prompts:
        plain = generate_one(llm.model, llm.tokenizer, ids, params)[0]
        got = generate_one(llm.model, llm.tokenizer, ids, params, spec)[0]
        # Kept proposals arrive as one delta, so compare the tokens, the text and how it ended.
        assert output_tokens(got) == output_tokens(plain)
        assert "".join(o.new_text for o in got) == "".join(o.new_text for o in plain)
        assert (got[-1].finish_reason, got[-1].stop_reason) == (plain[-1].finish_reason, plain[-1].stop_reason)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_gguf_path):
    """A 2-block random model with a 512-token vocabulary, fast enough to sample hundreds of times."""
    from leapllm.loading.loader import load_model

    path = write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", default_gguf_path,
                           tiny_hf_state(TINY_VOCAB))
    return load_model(path)


def test_sampled_speculative_generation_keeps_the_distribution_of_the_next_tokens(tiny):
    """Tokens 2 to 4 (which go through verification) have the same joint distribution with and
    without speculation: over 400 seeds, the speculative histogram is as close to a plain one as
    two plain ones of different seeds are to each other."""
    model, tokenizer = tiny.model, tiny.tokenizer
    ids = tokenizer.encode("the cat sat on the mat and the cat sat on the")
    spec = SpeculativeConfig("draft", 3, student_from_teacher_layers(model, 1).eval(), adaptive=False)

    def histogram(config, seeds):
        counts: dict[tuple, int] = {}
        for seed in seeds:
            params = SamplingParams(max_tokens=4, temperature=1.0, top_k=3, seed=seed, ignore_eos=True)
            toks = tuple(output_tokens(generate_one(model, tokenizer, ids, params, config)[0]))[1:3]
            counts[toks] = counts.get(toks, 0) + 1
        return counts

    def distance(a, b):
        na, nb = sum(a.values()), sum(b.values())
        return sum(abs(a.get(k, 0) / na - b.get(k, 0) / nb) for k in set(a) | set(b)) / 2

    plain_a, plain_b = histogram(None, range(400)), histogram(None, range(10_000, 10_400))
    speculative = histogram(spec, range(20_000, 20_400))
    assert distance(speculative, plain_a) < max(0.12, 1.5 * distance(plain_a, plain_b)), (speculative, plain_a)


# -- the continuous-batching engine ------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method,which", PROPOSERS)
def test_engine_speculation_gives_every_request_the_tokens_it_gets_alone(llm, prompts, draft, method, which):
    params = SamplingParams(max_tokens=40, temperature=0)
    spec = speculative_config(llm, draft, method, which, max_batch_size=4)
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(speculative=spec, max_num_batched_tokens=256))
    batch = prompts + [prompts[0][:-3]]  # four at once: all of them speculate
    got = run_to_completion(engine, batch, params)
    assert got == [plain_tokens(llm, ids, params) for ids in batch]
    stats = engine.stats()
    assert stats["spec_decode_steps"] > 0 and stats["spec_decode_accepted_tokens"] <= stats["spec_decode_draft_tokens"]
    if which == "self":
        assert stats["spec_decode_accepted_tokens"] == stats["spec_decode_draft_tokens"]
    elif method == "ngram":
        assert stats["spec_decode_accepted_tokens"] > 0
    assert stats["kv_blocks_used"] == 0


@pytest.mark.slow
def test_engine_speculation_survives_preemption_and_a_full_pool(llm, prompts, draft):
    """A pool of 10 blocks cannot hold four ~90-token requests and their proposals: sequences are
    preempted and proposals shrink to the room left, and the tokens still match."""
    params = SamplingParams(max_tokens=40, temperature=0)
    spec = speculative_config(llm, draft, "draft", "self", k=6)
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(
        speculative=spec, num_blocks=10, max_num_seqs=4, max_num_batched_tokens=64, enable_prefix_caching=False))
    batch = prompts + [prompts[0][:-3]]
    got = run_to_completion(engine, batch, params)
    assert got == [plain_tokens(llm, ids, params) for ids in batch]
    assert engine.stats()["num_preemptions"] > 0 and engine.stats()["kv_blocks_used"] == 0


# -- bad input ---------------------------------------------------------------------------------

def test_a_draft_with_another_vocabulary_is_refused(llm, tmp_path, default_gguf_path):
    from leapllm.loading.loader import load_model

    tiny = load_model(write_tiny_gguf(tmp_path / "tiny.gguf", default_gguf_path, tiny_hf_state(TINY_VOCAB)))
    with pytest.raises(InvalidRequestError, match="draft model cannot propose.*vocabulary mismatch"):
        check_draft_model(llm.model, llm.tokenizer, tiny.model, tiny.tokenizer)
    with pytest.raises(InvalidRequestError, match="vocabulary mismatch"):
        LLM(draft_model=tmp_path / "tiny.gguf")


def test_cli_refuses_bad_speculative_settings_in_one_line(capsys, tmp_path):
    assert_one_line_error(capsys, ["generate", "hi", "--num-speculative-tokens", "9", "--speculative", "ngram"],
                          "num-speculative-tokens must be from 1 to 7")
    assert_one_line_error(capsys, ["generate", "hi", "--speculative", "draft"], "needs --draft-model")
    assert_one_line_error(capsys, ["generate", "hi", "--num-speculative-tokens", "3"], "needs --speculative")
    assert_one_line_error(capsys, ["serve", "--draft-model", str(tmp_path / "missing.gguf")], "draft model not found")
    assert_one_line_error(capsys, ["chat", "--speculative", "ngram", "--draft-model", str(tmp_path)],
                          "takes no --draft-model")


@pytest.mark.parametrize("k", [0, 8, -1, True])
def test_an_out_of_range_number_of_speculative_tokens_is_refused(k):
    with pytest.raises(InvalidRequestError, match="num_speculative_tokens"):
        SpeculativeConfig("ngram", k).validate()


def test_an_unknown_method_or_a_draft_method_without_a_model_is_refused():
    with pytest.raises(InvalidRequestError, match="method"):
        SpeculativeConfig("medusa").validate()
    with pytest.raises(InvalidRequestError, match="needs a draft model"):
        SpeculativeConfig("draft").validate()
