"""The contiguous KV cache's memory: sized for the whole context, in memory only where written."""

from __future__ import annotations

import pytest
import torch

from leapllm.model.kv_cache import KVCache, lazily_zeroed


def resident_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not hasattr(torch, "frombuffer"), reason="needs torch.frombuffer")
def test_a_cache_sized_for_a_long_context_takes_memory_only_for_the_positions_written():
    before = resident_mib()
    cache = KVCache(num_layers=4, batch_size=1, num_kv_heads=2, max_seq_len=32768, head_dim=64,
                    dtype=torch.float32, device="cpu")  # 4 x 2 x 16 MiB reserved
    assert cache.nbytes() == 128 << 20
    k, v = cache.update(0, 0, torch.ones(1, 2, 10, 64), torch.full((1, 2, 10, 64), 2.0))
    assert k.shape == (1, 2, 10, 64) and torch.equal(v, torch.full((1, 2, 10, 64), 2.0))
    assert torch.count_nonzero(cache.k[1][:, :, :100]) == 0  # unwritten positions read as zeros
    assert resident_mib() - before < 32  # far below the 128 MiB reserved


def test_small_or_non_cpu_buffers_are_plain_zeros():
    t = lazily_zeroed((4, 8), torch.float32, "cpu")
    assert torch.equal(t, torch.zeros(4, 8)) and t.is_contiguous()
    big = lazily_zeroed((1024, 1024), torch.bfloat16, "cpu")
    assert big.dtype == torch.bfloat16 and big.shape == (1024, 1024) and torch.count_nonzero(big[:3]) == 0
    big[5, 5] = 1.0
    assert big.sum().item() == 1.0


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_forked_process_writes_its_own_copy_of_a_cache():
    import ctypes
    import os

    t = lazily_zeroed((1024, 1024), torch.float32, "cpu")
    address = t.data_ptr()
    pid = os.fork()
    if pid == 0:  # the child writes (no torch call after a fork) and leaves at once
        ctypes.c_float.from_address(address).value = 100.0
        os._exit(0)
    os.waitpid(pid, 0)
    assert t[0, 0].item() == 0.0
