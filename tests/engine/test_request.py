"""The state of a request (engine/request.py) and generation with the default model: stop tokens,
stop strings, lengths, context limits."""

from __future__ import annotations

import pytest
import torch

from leapllm import SamplingParams
from leapllm.engine.request import Request, StopStringWatcher, fit_prompt
from leapllm.errors import InvalidRequestError


def feed(watcher: StopStringWatcher, pieces):
    out, stop = [], None
    for p in pieces:
        text, stop = watcher.add(p)
        out.append(text)
        if stop:
            break
    else:
        out.append(watcher.flush())
    return "".join(out), stop


def test_stop_string_split_across_pieces_is_not_emitted():
    text, stop = feed(StopStringWatcher(["</end>"]), ["Hello </", "en", "d> more"])
    assert (text, stop) == ("Hello ", "</end>")


def test_text_resembling_a_stop_prefix_is_released_once_it_diverges():
    w = StopStringWatcher(["STOP"])
    assert w.add("ST") == ("", None)  # held back: could be the start of STOP
    assert w.add("ay") == ("STay", None)


def test_earliest_of_several_stop_strings_wins():
    assert feed(StopStringWatcher(["b", "a"]), ["xxab"]) == ("xx", "a")


def test_no_stop_strings_passes_everything_through():
    assert feed(StopStringWatcher([]), ["a", "b", "c"]) == ("abc", None)


def test_prompt_plus_max_tokens_beyond_the_context_is_an_error_naming_the_numbers():
    with pytest.raises(InvalidRequestError, match=r"prompt \(10 tokens\) \+ max_tokens \(95\) exceeds .* 100"):
        fit_prompt(list(range(10)), SamplingParams(max_tokens=95), 100)


def test_truncation_when_asked_keeps_the_most_recent_prompt_tokens():
    assert fit_prompt(list(range(10)), SamplingParams(max_tokens=95, truncate_prompt=True), 100) == [5, 6, 7, 8, 9]


def test_max_tokens_filling_the_whole_context_is_an_error():
    with pytest.raises(InvalidRequestError, match="leaves no room"):
        fit_prompt([1], SamplingParams(max_tokens=100, truncate_prompt=True), 100)


def test_empty_prompt_is_an_error(llm):
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([""], SamplingParams(max_tokens=4))


def test_out_of_vocabulary_token_ids_are_an_error(llm):
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.generate([[1, 2, 10**6]], SamplingParams(max_tokens=4))


def test_length_finish_reason_after_exactly_max_tokens(llm):
    out = llm.generate(["Once upon a time"], SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))[0]
    assert (len(out.token_ids), out.finish_reason, out.stop_reason) == (7, "length", None)
    assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_chat_answer_ends_with_the_end_of_turn_token_which_is_not_in_the_text(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=64, temperature=0))
    assert "Paris" in out.text
    assert out.finish_reason == "stop" and out.stop_reason in llm.tokenizer.stop_token_ids
    assert "<|im_end|>" not in out.text


def test_stop_string_ends_generation_and_is_not_returned(llm):
    greedy = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    full = llm.generate(["One, two, three, four,"], greedy)[0].text
    assert "six" in full
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=["six"])
    out = llm.generate(["One, two, three, four,"], params)[0]
    assert (out.finish_reason, out.stop_reason) == ("stop", "six")
    assert out.text == full[:full.index("six")]


def test_stop_token_ids_end_generation(llm):
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    first = llm.generate(["The sky is"], greedy)[0].token_ids
    out = llm.generate(["The sky is"], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[first[2]]))[0]
    assert out.token_ids == first[:3] and out.stop_reason == first[2]


def test_seeded_sampling_is_reproducible_and_seeds_differ(llm):
    params = [SamplingParams(max_tokens=16, temperature=1.0, seed=s, ignore_eos=True) for s in (7, 7, 8)]
    a, b, c = (llm.generate(["My favourite food is"], p)[0].token_ids for p in params)
    assert a == b and a != c


def test_streamed_pieces_join_to_the_generated_text(llm):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    pieces = list(llm.stream("写一首关于春天的诗：", params))
    assert "".join(pieces) == llm.generate(["写一首关于春天的诗："], params)[0].text
    assert all("\ufffd" not in p for p in pieces)


def test_generate_returns_one_output_per_prompt_in_order(llm):
    params = SamplingParams(max_tokens=4, temperature=0)
    outs = llm.generate(["Hello", "Bonjour"], params)
    assert [o.prompt for o in outs] == ["Hello", "Bonjour"]
    assert outs[0].text == llm.generate("Hello", params)[0].text


# -- the request state every path shares -------------------------------------------------------

def new_request(llm, **params) -> Request:
    return Request("r", [1, 2, 3], SamplingParams(**params), llm.tokenizer, llm.config.vocab_size,
                   torch.device("cpu"))


def test_a_request_ends_after_max_tokens_with_length_and_all_its_text(llm):
    ids = llm.tokenizer.encode(" red green blue")
    request = new_request(llm, max_tokens=len(ids), ignore_eos=True)
    pieces, finish = [], None
    for t in ids:
        assert finish is None
        text, finish = request.append_token(t)
        pieces.append(text)
    assert finish == ("length", None)
    assert "".join(pieces) == llm.tokenizer.decode(ids)


def test_a_stop_token_ends_a_request_and_is_not_in_its_text(llm):
    eos = min(llm.tokenizer.stop_token_ids)
    request = new_request(llm, max_tokens=10)
    first, finish = request.append_token(llm.tokenizer.encode(" sky")[0])
    assert finish is None
    text, finish = request.append_token(eos)
    assert finish == ("stop", eos)
    assert llm.tokenizer.decode([eos], skip_special_tokens=False) not in first + text


def test_a_stop_string_is_held_back_then_dropped_with_what_follows(llm):
    ids = llm.tokenizer.encode(" one two three four")
    request = new_request(llm, max_tokens=20, stop=["three"], ignore_eos=True)
    emitted, finish = "", None
    for t in ids:
        text, finish = request.append_token(t)
        emitted += text
        if finish is not None:
            break
    assert finish == ("stop", "three")
    assert emitted == " one two "


def test_ignore_eos_keeps_going_past_the_end_of_turn_token(llm):
    eos = min(llm.tokenizer.stop_token_ids)
    request = new_request(llm, max_tokens=5, ignore_eos=True)
    assert request.append_token(eos)[1] is None
