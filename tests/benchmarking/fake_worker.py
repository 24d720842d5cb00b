"""A stand-in benchmark worker for the harness tests: the real worker's loop (protocol, loading,
error replies) around a system that misbehaves on cue, so no model has to be loaded.

    python fake_worker.py MODE <the worker's usual arguments>

MODE: ok (instant fake timings), wrong (the same, with other greedy tokens), crash (dies at its
first timed decode), hang (never answers its first timed decode), no-llama-cpp (the real system,
with `llama_cpp` made unimportable).
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
        self.decodes += 1
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


def main() -> int:
    mode, argv = sys.argv[1], sys.argv[2:]
    if mode == "no-llama-cpp":
        sys.modules["llama_cpp"] = None  # `import llama_cpp` now raises ImportError
        return worker.main(argv)
    FakeSystem.mode = mode
    return worker.main(argv, make=lambda name, path, device, threads, max_seq_len:
                       FakeSystem(name, path, device, threads, max_seq_len))


if __name__ == "__main__":
    sys.exit(main())
