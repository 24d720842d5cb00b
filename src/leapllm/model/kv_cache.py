"""A contiguous, preallocated key/value cache: one buffer per layer, written in place.

Each decode step then costs one token's projections plus attention over what is cached, instead
of recomputing the whole prefix. The paged cache of the serving engine replaces this for
continuous batching; this one serves single-stream generation.
"""

from __future__ import annotations

import math
import mmap

import torch

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

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
