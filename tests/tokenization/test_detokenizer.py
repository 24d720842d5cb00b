"""Streaming detokenization gives exactly the full decode, one complete character at a time."""

from __future__ import annotations

import random

import pytest

from leapllm.tokenization import IncrementalDetokenizer

REPLACEMENT_CHAR = "\ufffd"

STREAM_TEXTS = {
    "chinese": "你好，世界！今天天气很好，我们去公园散步吧。",
    "emoji": "Launch 🚀 party 🎉🎉 thumbs 👍🏽 done",
    "emoji_zwj": "Family: 👨‍👩‍👧‍👦, flag: 🏳️‍🌈, astronaut 🧑‍🚀.",
    "mixed_scripts": "English, русский, العربية, हिन्दी, ελληνικά, 日本語, 한국어, ไทย — 🦙 ok",
    "code": "def f(x):\n\treturn x ** 2  # 平方\n",
    "chat": "<|im_start|>assistant\nSure! 当然 👍<|im_end|>\n<|endoftext|>",
}


def stream(detokenizer: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    pieces = [detokenizer.push(token_id) for token_id in ids]
    pieces.append(detokenizer.flush())
    return pieces


@pytest.mark.parametrize("skip_special_tokens", [False, True])
@pytest.mark.parametrize("text", STREAM_TEXTS.values(), ids=STREAM_TEXTS.keys())
def test_streamed_pieces_concatenate_to_the_full_decode(default_tokenizer, text, skip_special_tokens):
    ids = default_tokenizer.encode(text)
    pieces = stream(IncrementalDetokenizer(default_tokenizer, skip_special_tokens=skip_special_tokens), ids)
    assert "".join(pieces) == default_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert not any(REPLACEMENT_CHAR in piece for piece in pieces)
    if not skip_special_tokens:
        assert "".join(pieces) == text


def test_single_emoji_split_over_several_tokens_is_emitted_whole_once_complete(default_tokenizer):
    ids = default_tokenizer.encode("🦙")
    assert len(ids) > 1, "the emoji should span several byte-level tokens"
    # Each token alone is a fragment of the emoji's four UTF-8 bytes.
    assert all(REPLACEMENT_CHAR in default_tokenizer.decode([i]) for i in ids)
    detokenizer = IncrementalDetokenizer(default_tokenizer)
    pieces = [detokenizer.push(i) for i in ids]
    assert pieces == [""] * (len(ids) - 1) + ["🦙"]
    assert detokenizer.flush() == ""


def test_chinese_characters_arrive_one_whole_character_at_a_time(default_tokenizer):
    text = "我们去公园散步吧"
    pieces = [p for p in stream(IncrementalDetokenizer(default_tokenizer), default_tokenizer.encode(text)) if p]
    assert "".join(pieces) == text
    assert all(len(piece) >= 1 and REPLACEMENT_CHAR not in piece for piece in pieces)


def test_flush_emits_a_trailing_partial_character_as_replacement_char(default_tokenizer):
    ids = default_tokenizer.encode("ok 🦙")
    detokenizer = IncrementalDetokenizer(default_tokenizer)
    streamed = "".join(detokenizer.push(i) for i in ids[:-1])
    assert streamed == "ok"  # " 🦙" starts with a token holding the space and the first bytes: held back
    tail = detokenizer.flush()
    assert streamed + tail == default_tokenizer.decode(ids[:-1])
    assert tail.endswith(REPLACEMENT_CHAR)


def test_random_token_sequences_stream_to_exactly_the_full_decode(default_tokenizer):
    # Arbitrary ids make arbitrary (often invalid) byte sequences; the streamed text must still
    # equal decoding all ids at once, invalid bytes included.
    rng = random.Random(1234)
    for _ in range(50):
        ids = [rng.randrange(default_tokenizer.vocab_size) for _ in range(rng.randrange(1, 60))]
        pieces = stream(IncrementalDetokenizer(default_tokenizer), ids)
        assert "".join(pieces) == default_tokenizer.decode(ids)


class DecodeLengthRecorder:
    """Wraps a tokenizer and records how many ids each decode call is given."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.lengths: list[int] = []

    def decode(self, ids, skip_special_tokens=False):
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_each_step_decodes_a_short_window_not_the_whole_sequence(default_tokenizer):
    text = "你好 🦙 hello world, this is a long stream of text. " * 40
    ids = default_tokenizer.encode(text)
    assert len(ids) > 500
    recorder = DecodeLengthRecorder(default_tokenizer)
    pieces = stream(IncrementalDetokenizer(recorder), ids)
    assert "".join(pieces) == text
    assert max(recorder.lengths) <= 8


def test_sentencepiece_stream_keeps_spaces_between_words(tiny_spm_tokenizer):
    # "▁world" decoded on its own would lose its space; the window's context keeps it.
    ids = tiny_spm_tokenizer.encode("hello world 你 the bee")
    for skip in (False, True):
        pieces = stream(IncrementalDetokenizer(tiny_spm_tokenizer, skip_special_tokens=skip), ids)
        assert "".join(pieces) == tiny_spm_tokenizer.decode(ids, skip_special_tokens=skip)
        assert not any(REPLACEMENT_CHAR in piece for piece in pieces)
    assert "".join(stream(IncrementalDetokenizer(tiny_spm_tokenizer, skip_special_tokens=True), ids)) == (
        "hello world 你 the bee"
    )


def test_sentencepiece_space_survives_a_skipped_special_token(tiny_spm_tokenizer):
    eos = tiny_spm_tokenizer.eos_token_id
    ids = tiny_spm_tokenizer.encode("hello", add_special_tokens=False) + [eos] + tiny_spm_tokenizer.encode(
        " world", add_special_tokens=False
    )
    pieces = stream(IncrementalDetokenizer(tiny_spm_tokenizer, skip_special_tokens=True), ids)
    assert "".join(pieces) == tiny_spm_tokenizer.decode(ids, skip_special_tokens=True)
