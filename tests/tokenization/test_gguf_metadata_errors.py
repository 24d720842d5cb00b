"""Malformed or unsupported tokenizer metadata in a GGUF file gives a clear TokenizerError."""

from __future__ import annotations

import re

import pytest

from leapllm.errors import LeapLLMError, TokenizerError
from leapllm.tokenization import Tokenizer
from tests.kernel_paths import PATHS, take_path

from .texts import BATTERY


def without(metadata, key):
    return {k: v for k, v in metadata.items() if k != key}


def assert_clear_tokenizer_error(metadata, message_part):
    with pytest.raises(TokenizerError, match=re.escape(message_part)) as caught:
        Tokenizer.from_gguf_metadata(metadata)
    assert isinstance(caught.value, LeapLLMError)
    assert "\n" not in str(caught.value)


def test_missing_tokenizer_model_is_an_error(default_gguf_metadata):
    assert_clear_tokenizer_error(without(default_gguf_metadata, "tokenizer.ggml.model"), "no tokenizer.ggml.model")


def test_missing_token_list_is_an_error(default_gguf_metadata):
    assert_clear_tokenizer_error(without(default_gguf_metadata, "tokenizer.ggml.tokens"), "tokenizer.ggml.tokens")


def test_empty_token_list_is_an_error(default_gguf_metadata):
    assert_clear_tokenizer_error({**default_gguf_metadata, "tokenizer.ggml.tokens": []}, "tokenizer.ggml.tokens")


def test_missing_merges_for_byte_level_bpe_is_an_error(default_gguf_metadata):
    assert_clear_tokenizer_error(without(default_gguf_metadata, "tokenizer.ggml.merges"), "no tokenizer.ggml.merges")


@pytest.fixture(params=PATHS)
def merge_splitter(request, monkeypatch):
    """Each way merges are split: leapllm's kernels where they build, else Python."""
    from leapllm.tokenization import tokenizer

    return take_path(request.param, tokenizer, monkeypatch)


@pytest.mark.parametrize("entry", ["nospace", " leading", "x", 7])
def test_malformed_merge_entry_is_an_error_naming_it(default_gguf_metadata, entry, merge_splitter):
    """A merge splits at its first space after position 0, as llama.cpp splits it: one without is malformed."""
    merges = ["Ġ t", entry] + default_gguf_metadata["tokenizer.ggml.merges"][2:]
    assert_clear_tokenizer_error({**default_gguf_metadata, "tokenizer.ggml.merges": merges}, repr(entry))


def test_both_merge_splitters_split_alike(default_gguf_metadata, monkeypatch):
    from leapllm.kernels import cpu_kernels
    from leapllm.tokenization import tokenizer

    if cpu_kernels() is None:
        pytest.skip("leapllm's CPU kernels do not build here")
    merges = default_gguf_metadata["tokenizer.ggml.merges"] + [" a b", "a  b", "é ü", "a "]
    in_cpp = tokenizer._split_merges(merges)
    monkeypatch.setattr(tokenizer, "cpu_kernels", lambda: None)
    assert in_cpp == tokenizer._split_merges(merges)
    assert in_cpp[-4:] == [(" a", "b"), ("a", " b"), ("é", "ü"), ("a", "")]


def test_a_repeated_token_string_keeps_its_first_id():
    assert Tokenizer._vocab(["a", "b", "a", "c", "b"]) == {"a": 0, "b": 1, "c": 3}


@pytest.mark.parametrize("model_type", ["bert", "t5", "rwkv", "no_vocab"])
def test_unsupported_tokenizer_model_is_an_error(default_gguf_metadata, model_type):
    metadata = {**default_gguf_metadata, "tokenizer.ggml.model": model_type}
    assert_clear_tokenizer_error(metadata, f"unsupported tokenizer model {model_type!r}")


def test_token_type_list_of_the_wrong_length_is_an_error(default_gguf_metadata):
    metadata = {**default_gguf_metadata, "tokenizer.ggml.token_type": [1, 1, 3]}
    assert_clear_tokenizer_error(metadata, "token_type has 3 entries for 49152 tokens")


@pytest.mark.parametrize("key", ["bos_token_id", "eos_token_id", "padding_token_id"])
def test_special_token_id_outside_the_vocabulary_is_an_error(default_gguf_metadata, key):
    metadata = {**default_gguf_metadata, f"tokenizer.ggml.{key}": 49152}
    assert_clear_tokenizer_error(metadata, f"tokenizer.ggml.{key} = 49152 is not a token id")


def test_sentencepiece_model_without_scores_is_an_error(tiny_spm_gguf_path):
    from leapllm.loading.gguf_file import open_gguf

    _, metadata = open_gguf(tiny_spm_gguf_path)
    assert_clear_tokenizer_error(without(metadata, "tokenizer.ggml.scores"), "needs tokenizer.ggml.scores")


def test_missing_token_types_still_loads_without_special_tokens(default_gguf_metadata):
    # Old files may lack token types; the vocabulary still works, "<|im_end|>" is just not matched whole.
    tokenizer = Tokenizer.from_gguf_metadata(without(default_gguf_metadata, "tokenizer.ggml.token_type"))
    assert tokenizer.encode("Hello world") == [19556, 905]
    assert tokenizer.eos_token_id == 2


def test_unknown_pre_tokenizer_falls_back_to_the_gpt2_regex(default_gguf_metadata, caplog):
    tokenizer = Tokenizer.from_gguf_metadata({**default_gguf_metadata, "tokenizer.ggml.pre": "brand-new-model"})
    assert "brand-new-model" in caplog.text
    # The GPT-2 regex keeps a space glued to a following non-ASCII numeral.
    assert [tokenizer.id_to_token(i) for i in tokenizer.encode(" ½")] == ["ĠÂ", "½"]


@pytest.mark.parametrize(
    "pre", ["smollm", "gpt2", "default", "llama-bpe", "qwen2", "gpt-4o", "tekken", None]
)
def test_every_supported_pre_tokenizer_builds_and_round_trips_text(default_gguf_metadata, pre):
    # Checks each split regex compiles and loses no text; the ids themselves only mean something
    # for the vocabulary the regex was made for.
    metadata = {**default_gguf_metadata, "tokenizer.ggml.pre": pre}
    if pre is None:
        del metadata["tokenizer.ggml.pre"]
    tokenizer = Tokenizer.from_gguf_metadata(metadata)
    for text in BATTERY.values():
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    # llama.cpp adds BOS by default for the Llama 3 and Tekken families; the file's flag still wins.
    assert tokenizer.add_bos is False
    assert Tokenizer.from_gguf_metadata(without(metadata, "tokenizer.ggml.add_bos_token")).add_bos is (
        pre in ("llama-bpe", "tekken")
    )
