"""Chat templates render like Hugging Face's, reject bad conversations, and cannot run code."""

from __future__ import annotations

import re

import pytest

from leapllm.errors import LeapLLMError, TokenizerError
from leapllm.tokenization import ChatTemplateError, Tokenizer, render_chat_template

CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "What is the capital of France?"}],
    "with_system": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
    ],
    "multi_turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Say 你好 and 🚀."},
    ],
    "multi_turn_without_system": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?\nThanks"},
    ],
}


@pytest.mark.parametrize("messages", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
def test_rendering_matches_hf_apply_chat_template(default_tokenizer, hf_tokenizer, messages):
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert default_tokenizer.apply_chat_template(messages) == expected


@pytest.mark.parametrize("messages", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
def test_rendering_without_generation_prompt_matches_hf(default_tokenizer, hf_tokenizer, messages):
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert default_tokenizer.apply_chat_template(messages, add_generation_prompt=False) == expected


def test_default_model_prompt_has_the_chatml_shape(default_tokenizer):
    prompt = default_tokenizer.apply_chat_template(CONVERSATIONS["single_user"])
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_encode_chat_gives_ids_of_the_rendered_prompt(default_tokenizer, hf_tokenizer):
    messages = CONVERSATIONS["multi_turn"]
    prompt = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = default_tokenizer.encode_chat(messages)
    assert ids == hf_tokenizer.encode(prompt, add_special_tokens=False)
    assert ids[0] == default_tokenizer.token_to_id("<|im_start|>")


def test_encode_chat_does_not_add_a_second_bos_when_the_template_writes_it(default_gguf_metadata):
    metadata = {
        **default_gguf_metadata,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    tokenizer = Tokenizer.from_gguf_metadata(metadata)
    ids = tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    assert ids == [tokenizer.bos_token_id] + tokenizer.encode("hi", add_special_tokens=False)


BAD_MESSAGES = {
    "empty_list": ([], "must not be empty"),
    "plain_string": ("hello", "must be a list"),
    "none": (None, "must be a list"),
    "not_a_dict": (["hello"], "message 0 must be a dict"),
    "unknown_role": ([{"role": "robot", "content": "beep"}], "message 0 has role 'robot'"),
    "missing_role": ([{"content": "hi"}], "message 0 has role None"),
    "missing_content": ([{"role": "user"}], "message 0 (user) must have string 'content'"),
    "none_content": ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None}], "message 1"),
    "list_content": ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "string 'content'"),
}


@pytest.mark.parametrize("messages,message_part", BAD_MESSAGES.values(), ids=BAD_MESSAGES.keys())
def test_bad_messages_raise_a_clear_chat_template_error(default_tokenizer, messages, message_part):
    with pytest.raises(ChatTemplateError, match=re.escape(message_part)) as caught:
        default_tokenizer.apply_chat_template(messages)
    assert isinstance(caught.value, TokenizerError) and isinstance(caught.value, LeapLLMError)
    assert "\n" not in str(caught.value)


GOOD = [{"role": "user", "content": "hi"}]


def test_model_without_chat_template_raises_a_clear_error(default_gguf_metadata):
    metadata = {k: v for k, v in default_gguf_metadata.items() if k != "tokenizer.chat_template"}
    tokenizer = Tokenizer.from_gguf_metadata(metadata)
    assert tokenizer.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tokenizer.apply_chat_template(GOOD)


SANDBOX_ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ messages.__class__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ messages.append({'role': 'user', 'content': 'x'}) }}",
    "{% set d = {} %}{{ d.update({'a': 1}) }}",
]


@pytest.mark.parametrize("template", SANDBOX_ESCAPES)
def test_template_that_reaches_for_python_internals_is_refused_by_the_sandbox(template):
    with pytest.raises(ChatTemplateError, match="refused by the sandbox"):
        render_chat_template(template, GOOD)


def test_template_cannot_run_shell_commands(tmp_path):
    marker = tmp_path / "pwned"
    template = (
        "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
        "{{ self.__init__.__globals__.__builtins__.__import__('os').system('touch " + str(marker) + "') }}"
    )
    with pytest.raises(ChatTemplateError, match="refused by the sandbox"):
        render_chat_template(template, GOOD)
    assert not marker.exists()


def test_raise_exception_in_template_becomes_chat_template_error():
    template = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('first message must be system') }}{% endif %}"
    with pytest.raises(ChatTemplateError, match="first message must be system"):
        render_chat_template(template, GOOD)


def test_template_syntax_error_becomes_chat_template_error():
    with pytest.raises(ChatTemplateError, match="syntax error at line 1"):
        render_chat_template("{% for m in messages %}{{ m.content }}", GOOD)


def test_template_runtime_error_becomes_chat_template_error():
    with pytest.raises(ChatTemplateError, match="TypeError"):
        render_chat_template("{{ messages[0]['content'] + 1 }}", GOOD)


def test_template_globals_and_filters_match_hf():
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "|{{ tools | tojson }}|{{ strftime_now('%Y') | length }}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{% generation %}!{% endgeneration %}{% endfor %}"
        "{% if add_generation_prompt %}>{% endif %}"
    )
    tools = [{"name": "lookup", "description": "a <b> & 'c'", "unicode": "é"}]
    rendered = render_chat_template(
        template, GOOD * 2, add_generation_prompt=True, bos_token="<s>", eos_token="</s>", tools=tools
    )
    # tojson keeps <, >, &, ' and non-ASCII as they are (Jinja's own tojson would HTML-escape them).
    assert rendered == '<s>user:hi</s>user:hi</s>|[{"name": "lookup", "description": "a <b> & \'c\'", "unicode": "é"}]|4!>'


def test_trim_blocks_and_lstrip_blocks_are_on():
    template = "{% for m in messages %}\n    {% if true %}\n{{ m['content'] }}\n    {% endif %}\n{% endfor %}"
    assert render_chat_template(template, GOOD) == "hi\n"


def _word_level_tokenizer(words: list[str], chat_template: str | None = None):
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers.models import WordLevel

    from leapllm.tokenization.tokenizer import Tokenizer

    backend = BackendTokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    return Tokenizer(backend, vocab_size=len(words), bos_token_id=1, eos_token_id=2, chat_template=chat_template)


def test_a_file_without_a_template_but_with_gemma_turn_tokens_chats_in_gemma_turns():
    tok = _word_level_tokenizer(["<unk>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"])
    prompt = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Hi "},
                                      {"role": "assistant", "content": "Hello"},
                                      {"role": "user", "content": "Capital of France?"}])
    assert prompt == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
                      "<start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\n")
    assert tok.token_to_id("<end_of_turn>") in tok.stop_token_ids


def test_a_file_without_a_template_or_turn_tokens_still_refuses_chat_messages():
    from leapllm.tokenization.chat_template import ChatTemplateError

    tok = _word_level_tokenizer(["<unk>", "<bos>", "<eos>"])
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "Hi"}])


@pytest.mark.parametrize("template, words", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "ran for more than"),
    ("{% for c in 'x' * 100000 %}{% for d in 'y' * 100000 %}{{ '' }}{% endfor %}{% endfor %}", "ran for more than"),
    ("{{ 'x' * 200000000 }}", "repeats a str"),
    ("{{ ['x'] * 200000000 }}", "repeats a list"),
    ("{% for i in range(100000) %}{{ 'abcdefghij' * 100 }}{% endfor %}", "wrote more than"),
    ("{{ 2 ** 100000000 }}", "power"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "RecursionError"),
])
def test_a_template_that_would_run_or_grow_without_end_fails_within_its_budget(template, words):
    import time

    from leapllm.tokenization.chat_template import RENDER_SECONDS

    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match=words):
        render_chat_template(template, [{"role": "user", "content": "hi"}])
    assert time.monotonic() - start < RENDER_SECONDS + 3


def test_the_budget_leaves_the_callers_own_trace_hook_in_place():
    import sys

    def hook(frame, event, arg):
        return None

    sys.settrace(hook)
    try:
        render_chat_template("{{ messages[0]['content'] }}", [{"role": "user", "content": "hi"}])
        assert sys.gettrace() is hook
    finally:
        sys.settrace(None)
