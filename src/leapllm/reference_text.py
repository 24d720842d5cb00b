"""Prompts for timing runs (profile, bench): real text the project did not write, present on every
machine: the source of Python's own `argparse` module."""

from __future__ import annotations

import argparse
import inspect
import math


def reference_token_ids(tokenizer, length: int, offset: int = 0) -> list[int]:
    """`length` token ids of the text starting `offset` tokens in; the text repeats when too short."""
    ids = tokenizer.encode(inspect.getsource(argparse), add_special_tokens=False)
    ids = ids * math.ceil((offset + length) / len(ids))
    return ids[offset:offset + length]
