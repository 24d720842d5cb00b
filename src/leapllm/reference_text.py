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


# Chat requests of different kinds, for batch-1 decoding on chat prompts (bench's "chat decode b1"):
# how much speculative decoding gains depends on the kind of answer (code and rewrites repeat their
# prompt, stories do not), so the figure covers several. Written for this project; plain and generic.
CHAT_PROMPTS: list[tuple[str, str]] = [
    ("code", "Write a Python function that takes a list of integers and returns a new list without duplicates, "
             "keeping the first occurrence of each number in its original order. Add a docstring and a short "
             "example of its use."),
    ("code-edit", "Add type hints and a docstring to this Python function, and change nothing else:\n\n"
                  "def average_by_key(rows, key):\n"
                  "    totals = {}\n"
                  "    counts = {}\n"
                  "    for row in rows:\n"
                  "        value = row[key]\n"
                  "        totals[value] = totals.get(value, 0) + row[\"amount\"]\n"
                  "        counts[value] = counts.get(value, 0) + 1\n"
                  "    return {value: totals[value] / counts[value] for value in totals}\n"),
    ("rewrite", "Rewrite the following paragraph in simpler words:\n\n"
                "The municipal library has extended its opening hours on weekdays in response to requests from "
                "students who need a quiet place to study in the evening. The new schedule begins next month and "
                "will be reviewed after six months, depending on how many visitors use the library after seven "
                "o'clock. Residents may borrow up to ten books at a time, and books can be returned at any branch. "
                "Membership remains free for everyone who lives or works in the city."),
    ("summary", "Summarize the following text in two sentences:\n\n"
                "Water boils at 100 degrees Celsius at sea level, but the boiling point drops as altitude "
                "increases, because the air pressure is lower. On the summit of Mount Everest, water boils at "
                "about 70 degrees, so food cooks more slowly even though the water is bubbling. Pressure cookers "
                "work the other way round: sealing the pot raises the pressure inside, so water boils at a higher "
                "temperature and food cooks faster. This is why some recipes give separate cooking times for "
                "high altitudes."),
    ("qa", "What is the capital of France? Answer in one sentence, then name two other large French cities and "
           "say briefly what each is known for."),
    ("story", "Write a short story about a lighthouse keeper who finds a message in a bottle on the beach one "
              "morning."),
    ("list", "List ten common fruits, one per line, each with one sentence about its color and its taste."),
]


def chat_prompt_ids(tokenizer) -> list[tuple[str, list[int]]]:
    """(kind, prompt ids) for each of CHAT_PROMPTS: one user message in the model's chat template,
    ready for the assistant's answer. Raises the tokenizer's error when the model has no template."""
    return [(kind, tokenizer.encode_chat([{"role": "user", "content": message}], add_generation_prompt=True))
            for kind, message in CHAT_PROMPTS]
