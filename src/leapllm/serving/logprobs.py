"""Logprobs as OpenAI reports them: each token's text, its UTF-8 bytes and its top alternatives.

Completions report parallel lists (tokens, token_logprobs, top_logprobs as {text: logprob},
text_offset); chat reports one entry per token with its bytes, so that a client can rebuild a
character split over several tokens.
"""

from __future__ import annotations

import functools
import re

from leapllm.engine.request import TokenLogprob
from leapllm.serving.protocol import (
    ChatLogprobEntry,
    ChatLogprobs,
    CompletionLogprobs,
    TopLogprob,
)


def _gpt2_byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character a byte-level BPE vocabulary writes for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs)}


GPT2_BYTE_OF_CHAR = _gpt2_byte_of_char()


class TokenStrings:
    """A token's text and bytes as OpenAI's logprobs report them, cached per token id."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = functools.lru_cache(maxsize=1 << 16)(self._text)
        self.bytes = functools.lru_cache(maxsize=1 << 16)(self._bytes)

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _bytes(self, token_id: int) -> list[int]:
        text = self.text(token_id)
        if "\ufffd" not in text:
            return list(text.encode("utf-8"))
        # Part of a multi-byte character: recover the raw bytes from the vocabulary entry.
        piece = self.tokenizer.id_to_token(token_id) or ""
        if m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece):  # SentencePiece byte fallback
            return [int(m.group(1), 16)]
        if piece and all(ch in GPT2_BYTE_OF_CHAR for ch in piece):  # byte-level BPE
            return [GPT2_BYTE_OF_CHAR[ch] for ch in piece]
        return list(text.encode("utf-8"))

    def completion_logprobs(self, entries: list[TokenLogprob | None], token_ids: list[int],
                            offset: int) -> tuple[CompletionLogprobs, int]:
        """Completions' logprobs for tokens whose text starts at `offset`; returns them and the next offset.
        An entry of None (the prompt's first token, which has no context) has null logprobs."""
        lp = CompletionLogprobs()
        for token_id, entry in zip(token_ids, entries):
            text = self.text(token_id)
            lp.tokens.append(text)
            lp.text_offset.append(offset)
            offset += len(text)
            if entry is None:
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
                continue
            lp.token_logprobs.append(entry.logprob)
            top = {self.text(t): v for t, v in reversed(entry.top)}  # the likelier one wins a clash of strings
            top = dict(sorted(top.items(), key=lambda kv: -kv[1]))
            top.setdefault(text, entry.logprob)  # OpenAI always includes the chosen token
            lp.top_logprobs.append(top)
        return lp, offset

    def chat_logprobs(self, entries: list[TokenLogprob]) -> ChatLogprobs:
        return ChatLogprobs(content=[
            ChatLogprobEntry(token=self.text(e.token_id), logprob=e.logprob, bytes=self.bytes(e.token_id),
                             top_logprobs=[TopLogprob(token=self.text(t), logprob=v, bytes=self.bytes(t))
                                           for t, v in e.top])
            for e in entries])
