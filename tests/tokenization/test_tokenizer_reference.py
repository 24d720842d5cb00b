"""The GGUF tokenizer gives the same ids as the Hugging Face reference built from the same file."""

from __future__ import annotations

import pytest
from tokenizers import pre_tokenizers

from .texts import BATTERY, NUMERALS


@pytest.mark.parametrize("text", BATTERY.values(), ids=BATTERY.keys())
def test_ids_match_hf_tokenizer(default_tokenizer, hf_tokenizer, text):
    expected = hf_tokenizer.encode(text, add_special_tokens=False)
    assert default_tokenizer.encode(text, add_special_tokens=False) == expected
    # SmolLM2 adds no BOS, so the default encode gives the same ids as HF's default encode.
    assert default_tokenizer.encode(text) == hf_tokenizer.encode(text)


@pytest.mark.parametrize("text", BATTERY.values(), ids=BATTERY.keys())
def test_decode_of_encode_gives_back_the_text(default_tokenizer, text):
    assert default_tokenizer.decode(default_tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", BATTERY.values(), ids=BATTERY.keys())
def test_decode_matches_hf_reference_with_and_without_special_tokens(default_tokenizer, hf_tokenizer, text):
    ids = default_tokenizer.encode(text)
    for skip in (False, True):
        assert default_tokenizer.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(
            ids, skip_special_tokens=skip
        )


def test_special_tokens_in_text_become_single_control_ids(default_tokenizer):
    ids = default_tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert default_tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


# --- digit splitting ---------------------------------------------------------------------------
#
# The file says `tokenizer.ggml.pre = "smollm"`, for which llama.cpp isolates every numeric char
# (`\p{N}`) before the GPT-2 regex: the `Digits(individual_digits=True)` step of the original
# SmolLM2 tokenizer.json. transformers' GGUF converter has no entry for "smollm" and uses the plain
# GPT-2 regex. We follow llama.cpp and the original tokenizer, because:
#  * the vocabulary was trained with single digits: apart from "0".."9" no token contains an ASCII
#    digit and no merge involves one (checked below). So on ASCII numbers ("12345", "3.14159",
#    " 2026") both splits give the same ids, and the battery matches transformers exactly;
#  * they differ only where a space precedes a non-ASCII numeric char (`²`, `½`, `①`, Arabic-Indic
#    digits): the GPT-2 regex glues the space to it (" ½" -> "ĠÂ", "½"), digit splitting keeps the
#    character whole ("Ġ", "Â½"), the token the model saw in training.

ORIGINAL_SMOLLM2_PRE_TOKENIZER = pre_tokenizers.Sequence(
    [
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ]
)



@pytest.fixture(scope="module")
def original_smollm2_reference(hf_tokenizer):
    """The HF reference's vocabulary and merges with the original SmolLM2 pre-tokenizer."""
    from tokenizers import Tokenizer as BackendTokenizer

    backend = BackendTokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    backend.pre_tokenizer = ORIGINAL_SMOLLM2_PRE_TOKENIZER
    return backend


def test_vocabulary_has_no_multi_digit_tokens_so_digit_splitting_is_how_it_was_trained(default_gguf_metadata):
    tokens = default_gguf_metadata["tokenizer.ggml.tokens"]
    merges = default_gguf_metadata["tokenizer.ggml.merges"]
    assert sorted(t for t in tokens if any(c in "0123456789" for c in t)) == list("0123456789")
    assert not [m for m in merges if any(c in "0123456789" for c in m)]


def test_numbers_are_split_into_single_digits(default_tokenizer):
    ids = default_tokenizer.encode("12345 3.14159 2026")
    assert [default_tokenizer.id_to_token(i) for i in ids] == [
        "1", "2", "3", "4", "5", "Ġ", "3", ".", "1", "4", "1", "5", "9", "Ġ", "2", "0", "2", "6"
    ]


@pytest.mark.parametrize("text", NUMERALS + list(BATTERY.values()))
def test_ids_match_original_smollm2_digit_splitting(default_tokenizer, original_smollm2_reference, text):
    assert default_tokenizer.encode(text) == original_smollm2_reference.encode(text, add_special_tokens=False).ids


def test_space_before_non_ascii_numeral_stays_a_separate_token(default_tokenizer):
    ids = default_tokenizer.encode(" ½ cup")
    assert [default_tokenizer.id_to_token(i) for i in ids] == ["Ġ", "Â½", "Ġcup"]
    assert default_tokenizer.decode(ids) == " ½ cup"


# --- special ids and vocabulary ----------------------------------------------------------------


def test_special_token_ids_come_from_the_gguf_metadata(default_tokenizer):
    assert default_tokenizer.vocab_size == 49152
    assert default_tokenizer.bos_token_id == 1 and default_tokenizer.bos_token == "<|im_start|>"
    assert default_tokenizer.eos_token_id == 2 and default_tokenizer.eos_token == "<|im_end|>"
    assert default_tokenizer.pad_token_id == 2
    assert default_tokenizer.add_bos is False
    assert default_tokenizer.encode("") == []


def test_stop_token_ids_are_eos_and_end_of_turn_control_tokens(default_tokenizer):
    # <|im_end|> (eos, end of a chat turn) and <|endoftext|> (end of a document).
    assert default_tokenizer.stop_token_ids == frozenset({2, 0})
    assert isinstance(default_tokenizer.stop_token_ids, frozenset)


def test_token_to_id_and_id_to_token_are_inverse(default_tokenizer):
    for token in ["<|im_start|>", "<|im_end|>", "Ġthe", "Ċ", "!"]:
        assert default_tokenizer.id_to_token(default_tokenizer.token_to_id(token)) == token
    assert default_tokenizer.token_to_id("definitely-not-a-token-xyz") is None
    assert default_tokenizer.id_to_token(10**9) is None


def test_decode_accepts_any_iterable_of_ints(default_tokenizer):
    torch = pytest.importorskip("torch")
    ids = default_tokenizer.encode("Hello world")
    assert default_tokenizer.decode(torch.tensor(ids)) == "Hello world"
    assert default_tokenizer.decode(iter(ids)) == "Hello world"


def test_add_bos_prepends_bos_only_with_special_tokens(default_gguf_metadata):
    from leapllm.tokenization import Tokenizer

    tokenizer = Tokenizer.from_gguf_metadata({**default_gguf_metadata, "tokenizer.ggml.add_bos_token": True})
    plain = tokenizer.encode("hi", add_special_tokens=False)
    assert tokenizer.encode("hi") == [1] + plain
    assert tokenizer.encode("") == [1]


# --- SentencePiece ('llama') vocabularies, against transformers on a tiny GGUF ------------------

SPM_TEXTS = [
    "hello world",
    "Hello world!",
    " the  bee",
    "你好 🦙",  # not in the vocabulary: byte fallback
    "<s>hello</s> world<think>the",
    "",
    "  leading",
    "trailing  ",
    "line\nbreak",
]


@pytest.fixture(scope="module")
def tiny_spm_hf_reference(tiny_spm_gguf_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tiny_spm_gguf_path.parent), gguf_file=tiny_spm_gguf_path.name)


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_sentencepiece_gguf_ids_and_text_match_hf_reference(tiny_spm_tokenizer, tiny_spm_hf_reference, text):
    ids = tiny_spm_tokenizer.encode(text)
    assert ids == tiny_spm_hf_reference.encode(text)
    for skip in (False, True):
        assert tiny_spm_tokenizer.decode(ids, skip_special_tokens=skip) == tiny_spm_hf_reference.decode(
            ids, skip_special_tokens=skip
        )


def test_sentencepiece_gguf_adds_bos_by_default_and_uses_byte_fallback(tiny_spm_tokenizer):
    assert tiny_spm_tokenizer.add_bos is True
    ids = tiny_spm_tokenizer.encode("你")
    assert ids[0] == tiny_spm_tokenizer.bos_token_id
    # "▁" then the three UTF-8 bytes of 你 (E4 BD A0) as <0xNN> tokens.
    assert [tiny_spm_tokenizer.id_to_token(i) for i in ids[1:]] == ["▁", "<0xE4>", "<0xBD>", "<0xA0>"]
    assert tiny_spm_tokenizer.decode(ids, skip_special_tokens=True) == "你"
    assert tiny_spm_tokenizer.stop_token_ids == frozenset({2})
