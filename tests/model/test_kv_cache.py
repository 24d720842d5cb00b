"""The contiguous KV cache's memory: sized for the whole context, in memory only where written."""

from __future__ import annotations

import pytest
import torch

from leapllm.model.attention import AttentionParams, attention
from leapllm.model.kv_cache import KVCache, kv_storage_dtype, lazily_zeroed


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


def test_auto_stores_float16_only_for_a_float32_model_on_a_cpu():
    assert kv_storage_dtype("auto", torch.float32, "cpu") == torch.float16
    assert kv_storage_dtype("auto", torch.bfloat16, "cpu") == torch.bfloat16
    assert kv_storage_dtype("auto", torch.float32, "meta") == torch.float32  # not a CPU: the model's dtype
    assert kv_storage_dtype("float32", torch.float32, "cpu") == torch.float32
    assert kv_storage_dtype("float16", torch.bfloat16, "cpu") == torch.float16
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        kv_storage_dtype("fp8", torch.float32, "cpu")


def test_a_view_of_some_rows_writes_into_the_whole_batch():
    cache = KVCache(2, 5, 2, 16, 8, torch.float16, "cpu")
    view = cache.rows(1, 3)
    view.update(1, 4, torch.ones(2, 2, 3, 8), torch.full((2, 2, 3, 8), 2.0))
    assert torch.equal(cache.k[1][1:3, :, 4:7], torch.ones(2, 2, 3, 8, dtype=torch.float16))
    assert not cache.k[1][0].any() and not cache.k[1][3:].any() and not cache.v[0].any()
    with pytest.raises(ValueError, match="outside a batch of 5"):
        cache.rows(4, 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [None, 5])
@torch.inference_mode()
def test_batched_one_token_attention_on_the_cache_equals_sdpa_over_its_widened_keys(dtype, window):
    """KVCache.attend for one new token per row (batched decode; the CPU kernels read the cache in
    place where built) gives SDPA's answer over the keys as stored."""
    from leapllm.model.attention import visible_keys

    torch.manual_seed(0)
    rows, heads, kv_heads, hd, cached = 4, 6, 2, 32, 11
    cache = KVCache(1, rows, kv_heads, 24, hd, dtype, "cpu")
    cache.update(0, 0, torch.randn(rows, kv_heads, cached, hd), torch.randn(rows, kv_heads, cached, hd))
    q, k, v = torch.randn(rows, heads, 1, hd), torch.randn(rows, kv_heads, 1, hd), torch.randn(rows, kv_heads, 1, hd)
    params = AttentionParams(grouped=True, window=window)
    mask = visible_keys(cached, 1, window, "cpu")[0]
    out = cache.attend(0, cached, q, k, v, params, mask)
    keys, values = cache.k[0][:, :, :cached + 1].float(), cache.v[0][:, :, :cached + 1].float()
    assert torch.equal(keys[:, :, cached], k[:, :, 0].to(dtype).float())  # the new token was written
    torch.testing.assert_close(out, attention(q, keys, values, params, mask), rtol=1e-5, atol=1e-5)
