"""Encoder-decoders on the batching engine: requests that join at any step, beam searches whose
beams share blocks (copy-on-write of the partly filled last one), pools too small for everyone at
once (preemption; a beam search starts over), give the tokens each request gets alone; every block
of both pools comes back."""

from __future__ import annotations

from collections import Counter

import pytest

from leapllm.config import EngineConfig
from leapllm.engine.llm_engine import LLMEngine
from leapllm.engine.seq2seq import DecoderTokenizer, Seq2SeqParams, engine_request, plan_generation
from leapllm.engine.seq2seq_lm import Seq2SeqLM
from leapllm.errors import InvalidRequestError
from tests.model.seq2seq_reference import reference

TEXTS = ["the house is wonderful", "a cat", "we go home today and the dog runs fast", "sun moon tree",
         "it was very good", "the big red tree and the small blue house"]
SEARCHES = [Seq2SeqParams(max_new_tokens=12, num_beams=1), Seq2SeqParams(max_new_tokens=12, num_beams=3),
            Seq2SeqParams(max_new_tokens=10, num_beams=2, early_stopping=True),
            Seq2SeqParams(max_new_tokens=12, do_sample=True, temperature=0.9, top_k=20, seed=5, num_beams=1)]


@pytest.fixture(scope="module", params=["t5-small", "opus-mt-en-de"])
def lm(request):
    return Seq2SeqLM(reference(request.param)[1])


def new_engine(lm: Seq2SeqLM, **config) -> LLMEngine:
    return LLMEngine(lm.model, DecoderTokenizer(lm.tokenizer, lm.defaults.eos_token_ids), EngineConfig(**config))


def add(engine: LLMEngine, lm: Seq2SeqLM, request_id: str, text: str, params: Seq2SeqParams) -> None:
    r = engine_request(plan_generation(params, lm.defaults, lm.model))
    engine.add_request(request_id, r.prompt_ids, r.params, encoder_ids=lm.encode(text),
                       logits_processor=r.logits_processor, beam_search=r.beam_search)


def alone(lm: Seq2SeqLM, text: str, params: Seq2SeqParams) -> list[int]:
    engine = new_engine(lm, num_blocks=256)
    add(engine, lm, "x", text, params)
    got = []
    while engine.has_unfinished():
        for out in engine.step():
            got += out.new_token_ids
    return got


def run_staggered(engine: LLMEngine, lm: Seq2SeqLM) -> dict[str, list[int]]:
    """Every text with every search; a new request joins every other step."""
    pending = [(f"{i}-{j}", text, params) for i, text in enumerate(TEXTS) for j, params in enumerate(SEARCHES)]
    got: dict[str, list[int]] = {rid: [] for rid, _, _ in pending}
    finished = set()
    steps = 0
    while pending or engine.has_unfinished():
        if pending and steps % 2 == 0:
            add(engine, lm, *pending.pop(0))
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
            if out.finished:
                finished.add(out.request_id)
        steps += 1
    assert finished == set(got)
    return got


def assert_pools_free(engine: LLMEngine) -> None:
    for group in engine.scheduler.groups:
        a = group.allocator
        assert a.num_free == a.num_blocks and all(c == 0 for c in a.ref_count)


@pytest.mark.parametrize("config", [
    {"num_blocks": 256, "block_size": 4},  # room for everyone: batches of searches, shared blocks
    {"num_blocks": 14, "block_size": 4, "max_num_seqs": 12},  # preemption and restarted beam searches
    {"num_blocks": 64, "block_size": 1, "max_num_seqs": 8},  # every beam step on a full block: no copies
], ids=["roomy", "tiny-pool", "block-1"])
def test_requests_joining_any_step_get_the_tokens_they_get_alone(lm, config):
    engine = new_engine(lm, **config)
    got = run_staggered(engine, lm)
    for i, text in enumerate(TEXTS):
        for j, params in enumerate(SEARCHES):
            assert got[f"{i}-{j}"] == alone(lm, text, params), (text, params)
    assert_pools_free(engine)
    if config["num_blocks"] == 14:
        assert engine.scheduler.num_preemptions > 0


def test_beams_share_the_source_and_copy_only_the_partly_filled_last_block(lm):
    engine = new_engine(lm, num_blocks=64, block_size=4)
    add(engine, lm, "b", TEXTS[2], Seq2SeqParams(max_new_tokens=12, num_beams=4))
    engine.step()  # the first beam's step: its start token, its source; then four beams
    kv, sources = (g.allocator for g in engine.scheduler.groups)
    assert len(engine.scheduler.running) == 4
    # One source for all; the first block (start token) copied for three beams, as each writes into it.
    assert sources.num_used == -(-len(lm.encode(TEXTS[2])) // 4) and kv.num_used == 4
    while engine.has_unfinished():
        engine.step()
        beams = engine.scheduler.running
        references = Counter(b for beam in beams for b in beam.block_tables[0])
        assert all(kv.ref_count[b] == n for b, n in references.items()) and kv.num_used == len(references)
        partial = [beam.block_tables[0][-1] for beam in beams if beam.num_computed % 4]
        assert len(set(partial)) == len(partial)  # one writer for each partly filled block
    assert_pools_free(engine)


def test_a_request_named_like_a_beam_reads_its_own_source(lm):
    """Beams are sequences named after their request; a request that takes such a name is another
    sequence, with its own source."""
    engine = new_engine(lm, num_blocks=64, block_size=4)
    add(engine, lm, "a", TEXTS[2], Seq2SeqParams(max_new_tokens=8, num_beams=2))
    engine.step()  # "a" has two beams now
    add(engine, lm, "a#beam1", TEXTS[0], Seq2SeqParams(max_new_tokens=8, num_beams=1))
    got = {"a": [], "a#beam1": []}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    assert got["a#beam1"] == alone(lm, TEXTS[0], Seq2SeqParams(max_new_tokens=8, num_beams=1))
    assert got["a"] == alone(lm, TEXTS[2], Seq2SeqParams(max_new_tokens=8, num_beams=2))


def test_an_aborted_beam_search_gives_back_every_block(lm):
    engine = new_engine(lm, num_blocks=64, block_size=4)
    add(engine, lm, "b", TEXTS[0], Seq2SeqParams(max_new_tokens=12, num_beams=3))
    for _ in range(4):
        assert engine.step() == []  # a beam search says nothing before it ends
    out = engine.abort_request("b")
    assert out.finished and out.finish_reason == "abort"
    assert not engine.has_unfinished()
    assert_pools_free(engine)


def test_bad_encoder_decoder_requests_are_refused(lm):
    engine = new_engine(lm, num_blocks=8, block_size=4, max_num_seqs=4)
    r = engine_request(plan_generation(Seq2SeqParams(max_new_tokens=4, num_beams=1), lm.defaults, lm.model))
    for source, match in ((None, "source"), ([], "source"), ([10_000], "outside the vocabulary"),
                          ([5] * 40, "cross-attention pool")):
        with pytest.raises(InvalidRequestError, match=match):
            engine.add_request("x", r.prompt_ids, r.params, encoder_ids=source)
    beams = engine_request(plan_generation(Seq2SeqParams(max_new_tokens=4, num_beams=5), lm.defaults, lm.model))
    with pytest.raises(InvalidRequestError, match="num_beams"):
        engine.add_request("x", beams.prompt_ids, beams.params, encoder_ids=[5], beam_search=beams.beam_search)
    assert not engine.has_unfinished()


def test_decoder_models_take_no_source_and_no_beam_search(llm):
    from leapllm.engine.beam_search import BeamSearchParams
    from leapllm.engine.sampling import SamplingParams

    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(num_blocks=16))
    with pytest.raises(InvalidRequestError, match="no encoder"):
        engine.add_request("x", [1, 2], SamplingParams(max_tokens=2), encoder_ids=[3])
    with pytest.raises(InvalidRequestError, match="encoder-decoder"):
        engine.add_request("x", [1, 2], SamplingParams(max_tokens=2), beam_search=BeamSearchParams(num_beams=2))
