"""A contiguous, preallocated key/value cache: one buffer per layer, written in place.

Each decode step then costs one token's projections plus attention over what is cached, instead
of recomputing the whole prefix. The paged cache of the serving engine replaces this for
continuous batching; this one serves single-stream generation and batches of equal-length rows.

Keys and values may be stored narrower than the model computes (float16 for a float32 model on a
CPU, as llama.cpp stores its own): half the memory, and attention reads them widened to float32.
"""

from __future__ import annotations

import math
import mmap

import torch

from leapllm.config import KV_DTYPES
from leapllm.model.attention import AttentionParams, attention

LAZY_MIN_BYTES = 1 << 20  # smaller buffers are plain torch.zeros


def lazily_zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """torch.zeros(shape) for a cache sized for the worst case: on CPU the buffer is an anonymous
    memory map, whose pages the OS maps (zeroed) only when first written, so a cache sized for a
    whole context or a whole pool holds in memory only what its tokens have touched."""
    device = torch.device(device)
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if device.type != "cpu" or nbytes < LAZY_MIN_BYTES:
        return torch.zeros(shape, dtype=dtype, device=device)
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)  # private: a forked process gets its own copy
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # one token written must not map 2 MiB (transparent huge pages)
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(buffer, dtype=dtype).view(shape)  # the tensor keeps the map alive


def kv_storage_dtype(kv_cache_dtype: str, compute: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype a float KV cache stores its values in, for one of config.KV_DTYPES. "int8" is the paged
    pool's own format: a float cache (a contiguous one) asked for it stores what "auto" stores."""
    if kv_cache_dtype not in KV_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_cache_dtype!r}")
    if kv_cache_dtype == "float16":
        return torch.float16
    if kv_cache_dtype == "float32":
        return torch.float32
    if compute == torch.float32 and torch.device(device).type == "cpu":
        return torch.float16
    return compute


def cpu_attention_kernels(query_dtype: torch.dtype, key_dtype: torch.dtype, device: torch.device):
    """leapllm's CPU kernels when attention can read keys of key_dtype in place (float32 queries,
    float32 or float16 keys, on the CPU, kernels built), else None."""
    if device.type != "cpu" or query_dtype != torch.float32 or key_dtype not in (torch.float32, torch.float16):
        return None
    from leapllm.kernels import cpu_kernels
    return cpu_kernels()


class KVCache:
    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_seq_len: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str):
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)  # (batch, kv_heads, seq, head_dim)
        self.k = [lazily_zeroed(shape, dtype, device) for _ in range(num_layers)]
        self.v = [lazily_zeroed(shape, dtype, device) for _ in range(num_layers)]
        self.max_seq_len = max_seq_len

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (batch, kv_heads, new, head_dim) at start_pos; return views of everything cached."""
        end = start_pos + k.shape[2]
        if end > self.max_seq_len:
            raise ValueError(f"KV cache holds {self.max_seq_len} positions, asked to write up to {end}")
        self.k[layer][:, :, start_pos:end] = k
        self.v[layer][:, :, start_pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def attend(self, layer: int, start_pos: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               params: AttentionParams, mask: torch.Tensor | None) -> torch.Tensor:
        """Write k, v (batch, kv_heads, new, hd) at start_pos, then attend q (batch, heads, new, hd) over
        every cached key it sees (`mask`: model/attention.py's visible_keys) -> (batch, heads, new, hd).

        On the CPU the kernels read the cache in place: one new token per row (batched decode) or a
        causal chunk (a prefill); elsewhere, and for soft-capped scores, the cached keys and values go
        to PyTorch's SDPA, widened to q's dtype where stored narrower."""
        k, v = self.update(layer, start_pos, k, v)  # (batch, kv_heads, start_pos + new, hd), as stored
        kernels = cpu_attention_kernels(q.dtype, k.dtype, q.device) if params.softcap is None else None
        if kernels is not None:
            scale, window = params.softmax_scale(q.shape[-1]), params.window or 0
            if q.shape[2] == 1:
                return kernels.cached_decode_attention(q[:, :, 0], self.k[layer], self.v[layer], start_pos + 1,
                                                       window, scale)[:, :, None]
            if q.shape[-1] % 16 == 0:
                out = kernels.cached_prefill_attention(q, self.k[layer], self.v[layer], start_pos, window, scale)
                return out.transpose(1, 2)  # (batch, heads, new, hd) over the (batch, new, heads, hd) buffer
        return attention(q, k.to(q.dtype), v.to(q.dtype), params, mask, is_causal=mask is None and q.shape[2] > 1)

    def rows(self, first: int, end: int) -> KVCache:
        """The cache of batch rows first .. end - 1: views of these buffers, so what it writes lands
        here (a caller can prefill a large batch a few rows at a time, bounding its activations)."""
        if not 0 <= first < end <= self.k[0].shape[0]:
            raise ValueError(f"rows {first}..{end} are outside a batch of {self.k[0].shape[0]}")
        view = KVCache.__new__(KVCache)
        view.k = [t[first:end] for t in self.k]
        view.v = [t[first:end] for t in self.v]
        view.max_seq_len = self.max_seq_len
        return view

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
