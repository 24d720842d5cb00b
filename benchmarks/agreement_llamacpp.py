"""Greedy agreement of leapllm with llama.cpp on the same GGUF file: 8 prompts x 64 tokens.

    .venv/bin/python benchmarks/agreement_llamacpp.py [MODEL.gguf] [--systems leapllm,leapllm-float32]
        [--tokens 64] [--threads 2] [--json out.json]

Each system decodes greedily from the same token ids (leapllm's tokenizer) through the same code
`leapllm bench` times (benchmarking/systems.py); llama.cpp runs through llama-cpp-python. Reported
per prompt: the common prefix with llama.cpp's tokens, and the share of positions with the same
token. Greedy decoding amplifies the first near-tie that rounds the other way, so the prefix is
the strict figure and the share the forgiving one.
"""

from __future__ import annotations

import argparse
import json
import platform

from leapllm.benchmarking.systems import make_system
from leapllm.loading.default_model import default_model_path
from leapllm.loading.gguf_file import open_gguf
from leapllm.tokenization import Tokenizer

PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "The three laws of thermodynamics state that",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nGive me three tips for learning a new language.<|im_end|>\n<|im_start|>assistant\n",
    "Photosynthesis is the process by which plants",
    "SELECT name, COUNT(*) FROM orders WHERE",
    "La tour Eiffel est un monument situé à Paris, construit pour",
]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--systems", default="leapllm,leapllm-float32")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args()
    path = default_model_path() if args.model is None else args.model
    tokenizer = Tokenizer.from_gguf_metadata(open_gguf(path)[1])
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    max_len = max(len(ids) for ids in prompts) + args.tokens + 1

    def run(name: str) -> list[list[int]]:
        system = make_system(name, path, "cpu", args.threads, max_len)
        system.import_libraries()
        system.load()
        return [system.decode(ids, args.tokens)[1] for ids in prompts]

    reference = run("llamacpp")
    report = {"model": str(path), "cpu": platform.processor() or platform.machine(), "tokens": args.tokens,
              "systems": {}}
    for name in args.systems.split(","):
        tokens = run(name)
        prefixes = [common_prefix(t, r) for t, r in zip(tokens, reference)]
        same = [sum(x == y for x, y in zip(t, r)) / args.tokens for t, r in zip(tokens, reference)]
        report["systems"][name] = {"common_prefix": prefixes, "same_position_share": [round(s, 3) for s in same],
                                   "full_agreement": sum(n == args.tokens for n in prefixes)}
        print(f"{name:18s} prefix with llama.cpp per prompt {prefixes}; "
              f"{report['systems'][name]['full_agreement']}/{len(prompts)} prompts agree on all {args.tokens}; "
              f"same token at {sum(same) / len(same):.0%} of positions")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
