"""Distillation text for the speculative-decoding draft: the target's own greedy answers to chat prompts.

    .venv/bin/python benchmarks/speculative/teacher_answers.py PROMPTS.txt OUT.txt [--max-tokens N]

Every prompt runs through the target at once (LLM.generate: the continuous-batching engine), and
each answer is written after its prompt, in the chat template's own markup, so the student learns
the target's distributions on exactly the kind of text it will have to propose.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from leapllm import LLM, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("prompts", type=Path, help="one chat prompt per line")
    p.add_argument("output", type=Path)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--model", default=None, help="the target (default: the default model)")
    args = p.parse_args()
    messages = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    llm = LLM(args.model)
    ids = [llm.encode_chat([{"role": "user", "content": m}]) for m in messages]
    outs = llm.generate(ids, SamplingParams(max_tokens=args.max_tokens, temperature=0))
    with args.output.open("w") as f:
        for prompt_ids, out in zip(ids, outs):
            f.write(llm.tokenizer.decode(prompt_ids + out.token_ids) + "\n\n")
    print(f"{len(outs)} answers, {sum(len(o.token_ids) for o in outs)} tokens -> {args.output}")


if __name__ == "__main__":
    main()
