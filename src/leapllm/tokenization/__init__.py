"""Tokenization: text <-> token ids, chat templates, and streaming detokenization."""

from leapllm.tokenization.chat_template import ChatTemplateError, render_chat_template
from leapllm.tokenization.detokenizer import IncrementalDetokenizer, partial_match_len
from leapllm.tokenization.tokenizer import Tokenizer

__all__ = ["ChatTemplateError", "IncrementalDetokenizer", "Tokenizer", "partial_match_len", "render_chat_template"]
