"""Tokenization: text <-> token ids, chat templates, and streaming detokenization."""

from leapllm.tokenization.chat_template import ChatTemplateError, render_chat_template
from leapllm.tokenization.detokenizer import IncrementalDetokenizer
from leapllm.tokenization.tokenizer import Tokenizer

__all__ = ["ChatTemplateError", "IncrementalDetokenizer", "Tokenizer", "render_chat_template"]
