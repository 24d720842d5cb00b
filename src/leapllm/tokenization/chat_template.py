"""Rendering a model's chat template: a Jinja template that turns a conversation into prompt text.

Chat templates ship inside model files, so they are untrusted code. They run in Jinja's
`ImmutableSandboxedEnvironment`, and any touch of an unsafe attribute (`__class__`, `append`, ...)
is a hard error instead of Jinja's default of silently rendering an empty string. The environment
otherwise mirrors what Hugging Face `apply_chat_template` offers templates (`trim_blocks`,
`lstrip_blocks`, `loopcontrols`, `raise_exception`, `strftime_now`, a non-escaping `tojson`, the
`{% generation %}` tag), so that templates written for it render identically here.

A template's cost is bounded too, since a model file can carry one that loops for hours or builds
a string of gigabytes: rendering stops with a ChatTemplateError after RENDER_SECONDS (a trace hook
on the template's own compiled code checks the clock at every line it runs), once the output passes
MAX_RENDER_CHARS, and before a `*` would build a string or list longer than that.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from leapllm.errors import TokenizerError

ALLOWED_ROLES = frozenset({"system", "user", "assistant", "tool"})
RENDER_SECONDS = 2.0  # real templates render in about a millisecond
MAX_RENDER_CHARS = 16 * 2**20  # twice what a request body may carry (the server's --max-request-bytes)
MAX_POWER_EXPONENT = 1000  # `**` beyond this is refused: 10 ** 10 ** 9 would compute for ages


# Gemma's turn format (its published template, without the image parts): system text joins the
# first user turn, the assistant's role is "model".
GEMMA_TURN_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


class ChatTemplateError(TokenizerError):
    """The conversation is malformed, the model has no chat template, or the template failed."""


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """A sandbox that raises on unsafe attribute access instead of returning an empty Undefined, and
    refuses `*` and `**` whose result would be too large."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and len(seq) * times > MAX_RENDER_CHARS:
                    raise SecurityError(f"the template repeats a {type(seq).__name__} of length {len(seq)} {times} "
                                        f"times, more than {MAX_RENDER_CHARS} items")
        elif isinstance(right, int) and abs(right) > MAX_POWER_EXPONENT and isinstance(left, int) and abs(left) > 1:
            raise SecurityError(f"the template raises a number to the power {right}")
        return super().call_binop(context, operator, left, right)


class _RenderBudget:
    """The time and output limits of one render, enforced from inside the running template."""

    def __init__(self):
        self.deadline = time.monotonic() + RENDER_SECONDS

    def trace_calls(self, frame, event, arg):
        # Only the template's compiled code is traced line by line; Python's own frames run untraced.
        return self.trace_lines if frame.f_code.co_filename == "<template>" else None

    def trace_lines(self, frame, event, arg):
        if event == "line" and time.monotonic() > self.deadline:
            raise SecurityError(f"the chat template ran for more than {RENDER_SECONDS} s")
        return self.trace_lines

    def render(self, compiled: jinja2.Template, context: dict[str, Any]) -> str:
        previous = sys.gettrace()
        sys.settrace(self.trace_calls)
        try:
            pieces, size = [], 0
            for piece in compiled.generate(**context):
                size += len(piece)
                if size > MAX_RENDER_CHARS:
                    raise SecurityError(f"the chat template wrote more than {MAX_RENDER_CHARS} characters")
                pieces.append(piece)
            return "".join(pieces)
        finally:
            sys.settrace(previous)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: HF uses it to mark assistant text; here it renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    # Templates call this to reject conversations they cannot format (e.g. roles not alternating).
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's built-in tojson HTML-escapes `<`, `>`, `&` and `'`, which would corrupt tool schemas.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """Compile once per distinct template text; a server renders the same template for every request."""
    environment = _StrictSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment.from_string(template)


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check the conversation shape; return it as a list of dicts. Raise ChatTemplateError if malformed."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(
            f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
        )
    if not messages:
        raise ChatTemplateError("messages must not be empty")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(
                f"message {index} must be a dict with 'role' and 'content', got {type(message).__name__}"
            )
        role = message.get("role")
        if role not in ALLOWED_ROLES:
            raise ChatTemplateError(
                f"message {index} has role {role!r}; expected one of {', '.join(sorted(ALLOWED_ROLES))}"
            )
        content = message.get("content")
        if not isinstance(content, str):
            raise ChatTemplateError(
                f"message {index} ({role}) must have string 'content', got {type(content).__name__}"
            )
        checked.append(dict(message))
    return checked


def render_chat_template(
    template: str | None,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str | None = "",
    eos_token: str | None = "",
    **extra: Any,
) -> str:
    """Render `messages` with a model's chat template, the way HF `apply_chat_template(tokenize=False)` does.

    `extra` is passed to the template as further variables (e.g. `tools`, `enable_thinking`).
    Raises ChatTemplateError for a missing template, malformed messages, or a template that fails,
    calls `raise_exception`, or is refused by the sandbox.
    """
    if not template:
        raise ChatTemplateError("this model has no chat template; pass a raw prompt instead of chat messages")
    checked_messages = validate_messages(messages)
    try:
        compiled = _compile(template)
    except TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template has a syntax error at line {exc.lineno}: {exc.message}") from None
    try:
        return _RenderBudget().render(compiled, dict(
            messages=checked_messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
            **extra,
        ))
    except SecurityError as exc:
        raise ChatTemplateError(f"chat template refused by the sandbox: {exc}") from None
    except TemplateError as exc:
        raise ChatTemplateError(f"chat template failed: {exc}") from None
    except Exception as exc:  # a template bug (e.g. adding str and None) surfaces as a plain Python error
        raise ChatTemplateError(f"chat template failed to render ({type(exc).__name__}: {exc})") from None
