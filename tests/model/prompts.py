"""The prompt battery for reference tests: varied scripts, code, and one 1,000+ token prompt."""

from __future__ import annotations

import argparse
import inspect


def long_prompt() -> str:
    # Real text the project did not write: the source of Python's own argparse module (about 1,500
    # tokens), shipped with every Python.
    source = inspect.getsource(argparse)
    return source[:6000]


PROMPTS = {
    "english": "The history of the printing press begins in the fifteenth century, when",
    "chat": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "chinese": "中国的首都是北京。北京有很多名胜古迹，比如",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n",
    "emoji": "Weather report 🌦️: sunny ☀️ in the morning, rain 🌧️ later. Pack an umbrella ☂️ and",
    "math": "Question: What is 17 * 23? Answer: 17 * 23 = 391. Question: What is 144 / 12? Answer:",
    "french": "La tour Eiffel a été construite pour l'Exposition universelle de 1889 à Paris, et",
    "long": long_prompt(),
}
