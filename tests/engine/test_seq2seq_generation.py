"""Encoder-decoder generation on the batching engine, token for token against transformers' generate().

Random-weight T5, Flan-T5, BART, mBART and Marian models from the real configs
(tests/model/seq2seq_reference.py), a batch of different-length sources, greedy and beam search
with several length penalties and each early_stopping rule; the folder's own defaults (forced
BOS/EOS, no_repeat_ngram_size, bad_words_ids, renormalize_logits, num_beams) on both sides.
"""

from __future__ import annotations

import pytest
import torch

from leapllm.engine.seq2seq_lm import Seq2SeqLM
from leapllm.errors import InvalidRequestError
from tests.model.seq2seq_reference import REAL, reference, source_batch

TEXTS = ["the house is wonderful", "a cat", "we go home today and the dog runs fast", "sun moon tree"]
SETTINGS = [
    {"num_beams": 1},
    {"num_beams": 2, "length_penalty": 0.6, "early_stopping": True},
    {"num_beams": 3, "length_penalty": 1.7, "early_stopping": False},
    {"num_beams": 3, "length_penalty": 1.7, "early_stopping": True},
    {"num_beams": 4, "length_penalty": 2.0, "early_stopping": "never"},
    {"num_beams": 4, "length_penalty": -0.5, "early_stopping": "never"},
]


@pytest.fixture(scope="module", params=list(REAL))
def pair(request):
    hf, folder = reference(request.param)
    return request.param, hf, folder, Seq2SeqLM(folder)


def trim(row: list[int], eos: list[int]) -> list[int]:
    """transformers' output row without the start token, cut after the first EOS (then padding)."""
    for i, t in enumerate(row):
        if t in eos:
            return row[:i + 1]
    return row


def hf_generate(hf, folder, lm, texts=TEXTS, **kwargs) -> list[list[int]]:
    ids, mask = source_batch(folder, texts, lm.defaults.pad_token_id)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kwargs)
    return [trim(row[1:].tolist(), lm.defaults.eos_token_ids) for row in out]


def ours(lm, texts=TEXTS, **kwargs) -> list[list[int]]:
    return [o.token_ids for o in lm.generate(texts, **kwargs)]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_greedy_and_beam_search_match_transformers(pair, settings):
    name, hf, folder, lm = pair
    want = hf_generate(hf, folder, lm, max_new_tokens=12, **settings)
    assert ours(lm, max_new_tokens=12, **settings) == want


def test_folder_defaults_match_transformers(pair):
    """Nothing but a length: num_beams, forced BOS/EOS, no_repeat_ngram_size, bad words and
    renormalization come from the folder on both sides."""
    name, hf, folder, lm = pair
    assert ours(lm, max_new_tokens=9) == hf_generate(hf, folder, lm, max_new_tokens=9)


def test_beam_search_ends_hypotheses_at_eos_at_varied_lengths():
    """The T5 reference's beams finish on EOS before max_length, where early stopping decides."""
    _, folder = reference("t5-small")
    out = Seq2SeqLM(folder).generate(TEXTS, max_new_tokens=15, num_beams=3, early_stopping=True)
    reasons = [o.finish_reason for o in out]
    assert "stop" in reasons and "length" in reasons
    assert all(o.score is not None for o in out)


def test_processors_match_transformers_on_t5():
    hf, folder = reference("t5-small")
    lm = Seq2SeqLM(folder)
    settings = {"no_repeat_ngram_size": 2, "min_length": 6, "bad_words_ids": [[5], [19, 75]], "num_beams": 1}
    assert ours(lm, max_new_tokens=12, **settings) == hf_generate(hf, folder, lm, max_new_tokens=12, **settings)
    settings["num_beams"] = 3
    assert ours(lm, max_new_tokens=12, **settings) == hf_generate(hf, folder, lm, max_new_tokens=12, **settings)


def test_max_length_counts_the_decoder_start_token_as_transformers():
    hf, folder = reference("bart-base")
    lm = Seq2SeqLM(folder)
    assert ours(lm, max_length=7, num_beams=1) == hf_generate(hf, folder, lm, max_length=7, num_beams=1)
    assert all(len(t) <= 6 for t in ours(lm, max_length=7, num_beams=1))


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    _, folder = reference("flan-t5-small")
    lm = Seq2SeqLM(folder)
    a = lm.generate(TEXTS, max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, seed=7, num_beams=1)
    b = lm.generate(TEXTS, max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, seed=7, num_beams=1)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    greedy = lm.generate(TEXTS, max_new_tokens=8, num_beams=1)
    top1 = lm.generate(TEXTS, max_new_tokens=8, do_sample=True, top_k=1, seed=3, num_beams=1)
    assert [o.token_ids for o in top1] == [o.token_ids for o in greedy]


def test_seq2seq_lm_texts_match_transformers_decode():
    from transformers import PreTrainedTokenizerFast

    hf, folder = reference("bart-base")
    lm = Seq2SeqLM(folder)
    outputs = lm.generate(TEXTS, max_new_tokens=10, num_beams=2)
    want = hf_generate(hf, folder, lm, max_new_tokens=10, num_beams=2)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    assert [o.token_ids for o in outputs] == want
    assert [o.text for o in outputs] == [tok.decode(ids, skip_special_tokens=True) for ids in want]
    assert outputs[0].timings["generated_tokens"] == sum(len(o.token_ids) for o in outputs)


def test_t5_translate_applies_the_task_prefix_and_settings():
    hf, folder = reference("t5-small")
    lm = Seq2SeqLM(folder)
    task = REAL["t5-small"]["config"]["task_specific_params"]["translation_en_to_de"]
    got = lm.translate(TEXTS[:2], target_lang="de", max_new_tokens=6)
    prefixed = [task["prefix"] + t for t in TEXTS[:2]]
    assert got[0].source_token_ids == lm.tokenizer.encode(prefixed[0])
    ids, mask = source_batch(folder, prefixed, 0)
    with torch.no_grad():  # the task's num_beams and early_stopping, as transformers' pipeline applies them
        want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=task["num_beams"],
                           early_stopping=task["early_stopping"])
    assert [o.token_ids for o in got] == [trim(r[1:].tolist(), [1]) for r in want]
    with pytest.raises(InvalidRequestError, match="knows en->de"):
        lm.translate(TEXTS[:1], target_lang="xx")


def test_summarize_chunks_long_text_at_sentence_ends():
    _, folder = reference("bart-base")  # 64 positions
    lm = Seq2SeqLM(folder)
    sentence = "the house is wonderful and small. "
    text = sentence * 30
    chunks = lm.chunks(text)
    assert len(chunks) > 1 and all(len(lm.encode(c)) <= 64 for c in chunks)
    assert " ".join(chunks) == text.strip()
    assert all(c.endswith(".") for c in chunks)  # cut at sentence ends
    summary = lm.summarize(text, max_new_tokens=4, num_beams=1)[0]
    parts = lm.generate(chunks, max_new_tokens=4, num_beams=1)
    assert summary.text == " ".join(p.text.strip() for p in parts)
    with pytest.raises(InvalidRequestError, match="64"):
        lm.generate([text])  # without chunking: too long, one clear error


def test_bad_requests_raise_invalid_request_error():
    _, folder = reference("bart-base")
    lm = Seq2SeqLM(folder)
    for bad in ({"num_beams": 0}, {"max_new_tokens": 0}, {"early_stopping": "sometimes"},
                {"do_sample": True, "num_beams": 2}, {"bad_words_ids": [[10_000]]}, {"length_penalty": float("nan")}):
        with pytest.raises(InvalidRequestError):
            lm.generate(TEXTS[:1], **bad)
    with pytest.raises(InvalidRequestError, match="unknown generation setting"):
        lm.generate(TEXTS[:1], beams=2)


def test_llm_of_an_encoder_decoder_folder_is_a_seq2seq_lm_that_takes_sampling_params():
    from leapllm.engine.sampling import SamplingParams
    from leapllm.llm import LLM

    _, folder = reference("opus-mt-en-de")
    lm = LLM(folder)
    assert isinstance(lm, Seq2SeqLM)
    greedy = lm.generate(TEXTS, SamplingParams(max_tokens=6, temperature=0))
    assert [o.token_ids for o in greedy] == [o.token_ids for o in lm.generate(TEXTS, max_new_tokens=6, num_beams=1)]
    sampled = [lm.generate(TEXTS, SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, seed=3)) for _ in range(2)]
    assert [o.token_ids for o in sampled[0]] == [o.token_ids for o in sampled[1]]  # seeded
    with pytest.raises(InvalidRequestError, match="stop"):
        lm.generate(TEXTS, SamplingParams(stop=["."]))
    with pytest.raises(InvalidRequestError, match="tensor_parallel"):
        LLM(folder, tensor_parallel=2)
