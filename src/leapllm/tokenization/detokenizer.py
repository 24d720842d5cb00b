"""Streaming detokenization: turn generated ids into text one token at a time.

Decoding each token on its own is wrong in two ways: a UTF-8 character (Chinese, emoji) can be
split over several byte-level tokens, and SentencePiece decoders treat the first token of a
sequence specially (they drop its leading space). Decoding the whole sequence every step is right
but O(n) per token. Like vLLM and TGI, we decode a short window instead: the tokens emitted last
time (as context) plus the new ones, and emit the text the new ones add. While the window's text
ends in U+FFFD its last character is incomplete, so we wait for more tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from leapllm.tokenization.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"

# A UTF-8 character is at most 4 bytes, so a valid one is complete within 4 tokens. Past this many
# held tokens we emit anyway (a partial character as U+FFFD), so that garbage output cannot make
# the window, and the cost of each step, grow without bound.
MAX_HELD_TOKENS = 8


def partial_match_len(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a proper prefix of `marker`: streamed text
    that may yet become the marker (a stop string, a tool call's opening) and so is held back."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class IncrementalDetokenizer:
    """Feed ids with `push`; each call returns only the newly completed text. Call `flush` at the end.

    The concatenation of everything returned equals `tokenizer.decode(all_ids)` (unless the model
    emits more than MAX_HELD_TOKENS tokens in a row that end mid-character, i.e. garbage bytes).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # window[:read_offset] are the tokens of the last emitted text (decoding context);
        # window[read_offset:] are tokens whose text has not been emitted yet.
        self._window: list[int] = []
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes ("" while a character is still partial)."""
        self._window.append(int(token_id))
        emitted_text = self._decode(self._window[: self._read_offset])
        window_text = self._decode(self._window)
        new_text = window_text[len(emitted_text):]
        # Hold back a partial character. Also hold tokens that add no text yet (a skipped special
        # token): keeping the earlier text as context lets SentencePiece decode a following
        # "▁word" as " word" rather than as the start of a sequence ("word").
        waiting = window_text.endswith(REPLACEMENT_CHAR) or not new_text
        if waiting and len(self._window) - self._read_offset < MAX_HELD_TOKENS:
            return ""
        return self._emit(new_text)

    def _emit(self, new_text: str) -> str:
        # The tokens just emitted become the next window's context; older tokens are dropped.
        self._window = self._window[self._read_offset:]
        self._read_offset = len(self._window)
        return new_text

    def flush(self) -> str:
        """Return whatever text is still held back (a trailing partial character decodes as U+FFFD)."""
        if self._read_offset == len(self._window):
            return ""
        emitted_text = self._decode(self._window[: self._read_offset])
        window_text = self._decode(self._window)
        return self._emit(window_text[len(emitted_text):])
