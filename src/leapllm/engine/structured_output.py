"""Structured outputs: decoding held to a JSON schema, a regex, a list of choices or a grammar.

The grammar engine is llguidance (Rust, no Python dependencies). It computes each step's token
mask lazily from a lexer and an Earley parser instead of precomputing per-state masks over the
vocabulary, so a new schema compiles in milliseconds and needs no per-schema warm-up;
benchmarks/grammar_engines.py compares it with xgrammar on our tokenizer.

One GrammarCompiler per engine: it builds llguidance's tokenizer from ours once, compiles each
distinct constraint once (an LRU cache of compiled matchers that requests deep-copy), and bounds
the cost of a hostile grammar with llguidance's parser limits. Each constrained request owns one
LLMatcher that follows its tokens (request.py). While the model runs a step's forward pass, a
worker thread fills the next masks of every constrained request that samples in that step
(llguidance releases the GIL), and the engine applies them to those logits rows at once.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np
import torch
from llguidance import LLMatcher, LLParserLimits, LLTokenizer

from leapllm.errors import InvalidRequestError

MAX_CONSTRAINT_CHARS = 200_000  # a schema, regex or grammar longer than this is refused
CACHE_SIZE = 256  # compiled constraints kept for reuse
# JSON is written compactly but readably (`{"a": 1, "b": [2, 3]}`): no free whitespace, which a
# small model could otherwise fill forever.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# llguidance's limits bound compile and per-step work (its defaults, with the per-step lexer
# fuel halved); a grammar that exceeds them is refused at compile time or ends the request.
PARSER_LIMITS = dict(step_lexer_fuel=100_000, max_grammar_size=200_000)

KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True)
class StructuredOutputParams:
    """Exactly one constraint on a request's output (vLLM's `StructuredOutputsParams`)."""
    json: dict[str, Any] | str | None = None  # a JSON schema, as a dict or JSON text
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None  # the output is exactly one of these strings
    grammar: str | None = None  # a Lark grammar (llguidance's dialect) or a llama.cpp GBNF grammar
    json_object: bool = False  # any JSON object

    def __post_init__(self):
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise InvalidRequestError(
                "a structured output takes exactly one of json, regex, choice, grammar or json_object; "
                f"got {', '.join(given) if given else 'none'}")
        if self.choice is not None:
            if (isinstance(self.choice, str) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise InvalidRequestError("choice must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise InvalidRequestError(f"{name} must be a string")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise InvalidRequestError("json must be a JSON schema: an object or its JSON text")
        if self.json_object not in (True, False):
            raise InvalidRequestError("json_object must be a boolean")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple[str, str]:
        """What identifies the compiled grammar: equal keys share one compilation. A schema's key order
        is kept: properties are written in the order the schema lists them, as OpenAI does."""
        value = getattr(self, self.kind)
        if self.kind == "json" and isinstance(value, dict):
            value = json.dumps(value)
        elif self.kind == "choice":
            value = json.dumps(list(value))
        return self.kind, str(value)

    def grammar_text(self) -> str:
        """The constraint in llguidance's grammar format; raises InvalidRequestError if it cannot be read."""
        kind, text = self.key()
        if len(text) > MAX_CONSTRAINT_CHARS:
            raise InvalidRequestError(f"the {kind} constraint is {len(text)} characters; at most "
                                      f"{MAX_CONSTRAINT_CHARS} are accepted")
        try:
            if kind == "json":
                schema = json.loads(text)
                if not isinstance(schema, (dict, bool)):
                    raise InvalidRequestError("the JSON schema must be an object")
                return LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
            if kind == "json_object":
                return LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_OPTIONS)
            return llguidance.grammar_from(kind, text)
        except InvalidRequestError:
            raise
        except (ValueError, TypeError) as exc:
            raise InvalidRequestError(f"the {kind} constraint cannot be read: {exc}") from None


class GrammarCompiler:
    """Compiles constraints for one tokenizer and vocabulary, caching each compiled matcher."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.limits = LLParserLimits(**PARSER_LIMITS)
        self._lltokenizer: LLTokenizer | None = None
        self._cache: OrderedDict[tuple[str, str], LLMatcher] = OrderedDict()
        self._lock = threading.Lock()  # the server compiles on its event loop, the engine steps elsewhere
        self._pool: ThreadPoolExecutor | None = None
        self.num_compiled = 0
        self.num_cache_hits = 0

    @property
    def lltokenizer(self) -> LLTokenizer:
        """llguidance's view of our tokenizer, built on first use (0.25 s for SmolLM2's 49k vocabulary)."""
        with self._lock:
            if self._lltokenizer is None:
                eos = sorted(self.tokenizer.stop_token_ids) or None
                self._lltokenizer = LLTokenizer(self.tokenizer.backend_json(), n_vocab=self.vocab_size,
                                                eos_token=eos)
            return self._lltokenizer

    def compile(self, spec: StructuredOutputParams) -> LLMatcher:
        """The compiled, cached matcher of a constraint, never consumed itself (requests take copies:
        `matcher`); raises InvalidRequestError naming what is wrong."""
        key = spec.key()
        with self._lock:
            proto = self._cache.get(key)
            if proto is not None:
                self._cache.move_to_end(key)
                self.num_cache_hits += 1
                return proto
        grammar = spec.grammar_text()
        tok = self.lltokenizer
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, tok, limits=self.limits)
        if is_error:
            raise InvalidRequestError(f"invalid {spec.kind} constraint: {one_line(messages[0])}")
        proto = LLMatcher(tok, grammar, log_level=0, limits=self.limits)
        if proto.is_error():
            raise InvalidRequestError(f"invalid {spec.kind} constraint: {one_line(proto.get_error())}")
        with self._lock:
            self._cache[key] = proto
            self.num_compiled += 1
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return proto

    def matcher(self, spec: StructuredOutputParams) -> LLMatcher:
        """A fresh matcher for one request, in the constraint's start state."""
        return self.compile(spec).deep_copy()

    # -- masks ---------------------------------------------------------------------------------
    def fill_masks_async(self, matchers: list[LLMatcher]) -> Future:
        """Start computing each matcher's next mask in a worker thread: a Future of an int32
        bitmask (len(matchers), ceil(vocab / 32)), one bit per token (bit t % 32 of word t // 32)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="leapllm-grammar")
        return self._pool.submit(self._fill_masks, matchers)

    def _fill_masks(self, matchers: list[LLMatcher]) -> torch.Tensor:
        words = (self.vocab_size + 31) // 32
        bitmask = torch.empty((len(matchers), words), dtype=torch.int32)
        for i, m in enumerate(matchers):
            row = bitmask[i]
            m.unsafe_compute_mask_ptr(row.data_ptr(), words * 4)  # releases the GIL
        return bitmask


def one_line(message: str) -> str:
    """llguidance's error text without the grammar excerpt and caret lines it quotes."""
    lines = [ln.strip() for ln in message.splitlines() if not re.match(r"\s*(\d+ \||\^|$)", ln)]
    return " ".join(lines)[:500]


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int, device: torch.device) -> torch.Tensor:
    """An int32 bitmask (rows, words) as a bool (rows, vocab_size) tensor on `device`."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]
    return torch.from_numpy(bits).to(device=device, dtype=torch.bool)
