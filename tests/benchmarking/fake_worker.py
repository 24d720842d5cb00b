"""A stand-in benchmark worker for the harness tests: the real worker's loop (protocol, loading,
error replies) around a system that misbehaves on cue, so no model has to be loaded.

    python fake_worker.py MODE <the worker's usual arguments>

MODE: ok (instant fake timings), wrong (the same, with other greedy tokens), crash (dies at its
second decode call: the warm-up's batch-1 decode goes fine), hang (never answers its second decode
call), no-llama-cpp (the real system, with `llama_cpp` made unimportable).

A speculative system name (leapllm-int4+ngram) plays a speculative system: every decode proposes 4
tokens and keeps 3, and its info echoes the speculation options the worker was given.
"""

from __future__ import annotations

import os
import sys
import time

from leapllm.benchmarking import worker
from leapllm.benchmarking.systems import System

FAKE_TOKENS = list(range(100, 400))


class FakeSystem(System):
    mode = "ok"

    def load(self) -> None:
        self.decodes = 0

    def prefill(self, ids):
        return 0.001 * len(ids)

    def decode(self, ids, n):
        self.decodes += 1  # decode_many calls this once per prompt
        if self.decodes > 1:  # the warm-up went fine; the first timed run does not
            if self.mode == "crash":
                os._exit(3)
            if self.mode == "hang":
                time.sleep(3600)
        return 0.01 * (n - 1), self.tokens(n)

    def batched_decode(self, batch_ids, n):
        return 0.02 * (n - 1), [self.tokens(n) for _ in batch_ids]

    def serve(self, prompts, n):
        # Request i's first token 10 ms after the one before it; the last finishes 0.1 s after that.
        ttft = [0.01 * (i + 1) for i in range(len(prompts))]
        return ttft[-1] + 0.1, ttft, [self.tokens(n) for _ in prompts]

    def tokens(self, n):
        return FAKE_TOKENS[::-1][:n] if self.mode == "wrong" else FAKE_TOKENS[:n]

    def speculation_counts(self):
        if self.speculative is None:
            return None
        return {"proposed": 4 * self.decodes, "accepted": 3 * self.decodes, "speculative_steps": self.decodes}

    def info(self):
        if self.speculative is None:
            return {}
        return {"draft_model": str(self.draft_model) if self.draft_model else None,
                "num_speculative_tokens": self.num_speculative_tokens}


def main() -> int:
    mode, argv = sys.argv[1], sys.argv[2:]
    if mode == "no-llama-cpp":
        sys.modules["llama_cpp"] = None  # `import llama_cpp` now raises ImportError
        return worker.main(argv)
    FakeSystem.mode = mode
    return worker.main(argv, make=lambda name, path, device, threads, max_seq_len, **options:
                       FakeSystem(name, path, device, threads, max_seq_len, **options))


if __name__ == "__main__":
    sys.exit(main())
