"""One small profile of the default model (and a tiny sweep), shared by the profiler and report tests."""

from __future__ import annotations

import pytest
import torch

from leapllm.profiling.machine import MachineLimits

# Stand-in limits (the real ones are measured by `leapllm profile --machine`; tests never touch the
# user's cache): 20 GB/s and 100 GFLOP/s float32, a balance of 5 FLOPs per byte.
FAKE_MACHINE = MachineLimits(device="cpu", name="test machine", threads=1, torch_version=torch.__version__,
                             bandwidth=20e9, flops={"float32": 100e9, "bfloat16": 50e9})


@pytest.fixture(scope="session")
def small_profile(llm):
    """Prompt 32, 4 decode steps, batch 2, and a sweep of 2 prompt lengths and 2 batch sizes.

    Measured on one thread: on a small machine shared with other work, two intra-op threads that
    compete for the cores make a step's time swing by 2x from one run to the next. The tests check
    the accounting (the stages add up), not the speed, and one thread keeps the comparison steady."""
    from leapllm.profiling.profiler import profile_model, sweep_model

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = profile_model(llm.model, llm.tokenizer, prompt_len=32, gen_len=4, batch=2, repeats=3, max_repeats=15,
                             machine=FAKE_MACHINE)
        data["sweep"] = sweep_model(llm.model, llm.tokenizer, prompt_lens=[16, 32], batches=[1, 2],
                                    decode_context=16, decode_steps=2, machine=FAKE_MACHINE)
    finally:
        torch.set_num_threads(before)
    return data
