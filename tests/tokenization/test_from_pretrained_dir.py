"""Loading a Hugging Face tokenizer folder (tokenizer.json + config files)."""

from __future__ import annotations

import json
import shutil

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import processors

from leapllm.errors import TokenizerError
from leapllm.tokenization import Tokenizer

from .texts import BATTERY, NUMERALS

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi 👋"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]


@pytest.fixture(scope="module")
def saved_hf_dir(hf_tokenizer, tmp_path_factory):
    """The HF reference tokenizer written out with `save_pretrained` (tokenizer.json, config, jinja)."""
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    hf_tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def dir_tokenizer(saved_hf_dir):
    return Tokenizer.from_pretrained_dir(saved_hf_dir)


def copy_folder(source, destination):
    shutil.copytree(source, destination)
    return destination


@pytest.mark.parametrize("text", list(BATTERY.values()) + NUMERALS)
def test_ids_match_the_hf_tokenizer_that_wrote_the_folder(dir_tokenizer, hf_tokenizer, text):
    assert dir_tokenizer.encode(text) == hf_tokenizer.encode(text)
    assert dir_tokenizer.decode(dir_tokenizer.encode(text)) == text


def test_special_ids_and_chat_template_come_from_the_config_files(dir_tokenizer, hf_tokenizer):
    assert dir_tokenizer.bos_token_id == 1 and dir_tokenizer.eos_token_id == 2 and dir_tokenizer.pad_token_id == 2
    assert dir_tokenizer.add_bos is False
    assert dir_tokenizer.vocab_size == 49152
    assert dir_tokenizer.stop_token_ids == frozenset({0, 2})
    assert dir_tokenizer.apply_chat_template(MESSAGES) == hf_tokenizer.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True
    )


def test_chat_template_is_read_from_tokenizer_config_when_there_is_no_jinja_file(saved_hf_dir, tmp_path):
    folder = copy_folder(saved_hf_dir, tmp_path / "tok")
    template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))

    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}), encoding="utf-8")
    assert Tokenizer.from_pretrained_dir(folder).chat_template == template

    named = [{"name": "tool_use", "template": "{{ 'tools' }}"}, {"name": "default", "template": template}]
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": named}), encoding="utf-8")
    assert Tokenizer.from_pretrained_dir(folder).chat_template == template

    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert Tokenizer.from_pretrained_dir(folder).chat_template is None


def test_generation_config_eos_ids_are_stop_ids(saved_hf_dir, tmp_path):
    folder = copy_folder(saved_hf_dir, tmp_path / "tok")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}), encoding="utf-8")
    tokenizer = Tokenizer.from_pretrained_dir(folder)
    assert tokenizer.stop_token_ids == frozenset({0, 2, 5})
    assert tokenizer.eos_token_id == 2


def test_bos_added_by_the_post_processor_is_detected_and_added_once(saved_hf_dir, tmp_path):
    folder = copy_folder(saved_hf_dir, tmp_path / "tok")
    backend = BackendTokenizer.from_file(str(folder / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    backend.save(str(folder / "tokenizer.json"))

    tokenizer = Tokenizer.from_pretrained_dir(folder)
    assert tokenizer.add_bos is True
    assert tokenizer.encode("hi") == [1] + tokenizer.encode("hi", add_special_tokens=False)
    assert tokenizer.encode("hi", add_special_tokens=False)[0] != 1

    # An explicit flag in tokenizer_config.json wins over the post-processor.
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}), encoding="utf-8")
    assert Tokenizer.from_pretrained_dir(folder).add_bos is False


def test_missing_tokenizer_json_raises_tokenizer_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_pretrained_dir(tmp_path)


def test_corrupt_tokenizer_json_raises_tokenizer_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": "nope"', encoding="utf-8")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        Tokenizer.from_pretrained_dir(tmp_path)


def test_corrupt_tokenizer_config_raises_tokenizer_error(saved_hf_dir, tmp_path):
    folder = copy_folder(saved_hf_dir, tmp_path / "tok")
    (folder / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: cannot read JSON"):
        Tokenizer.from_pretrained_dir(folder)
