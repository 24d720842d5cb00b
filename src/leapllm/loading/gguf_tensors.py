"""A GGUF file's tensors, read lazily from the memory map, and the block formats that run as they are.

Q4_0, Q4_1 and Q8_0 store blocks of 32 consecutive weights of a row with a float16 scale (and a
float16 minimum for Q4_1): exactly the blocks of leapllm's packed int4 / int8 layouts
(kernels/packing.py). So their bytes are repacked bit for bit, never through floats:
    Q4_1  w = d * q + m           q in [0, 15]      -> int4 (scale d, minimum m)
    Q4_0  w = d * (q - 8)         q in [0, 15]      -> int4 (scale d, minimum -8 d, exact in float16)
    Q8_0  w = d * q               q in [-127, 127]  -> int8 with a scale per block
Every other type (F16, BF16, Q5_*, the K-quants, ...) has no kernel yet: it is dequantized by the
`gguf` package (llama.cpp's own reference code) to float32 when the model is built, one tensor at a
time, and `leapllm info` says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from leapllm.errors import ModelLoadError

# The GGUF types leapllm's kernels run without converting a weight: type -> packed layout.
KERNEL_FORMATS = {
    GGMLQuantizationType.Q4_0: "int4",
    GGMLQuantizationType.Q4_1: "int4",
    GGMLQuantizationType.Q8_0: "int8",
}
BLOCK = 32


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of each head's rotary halves (rows of a Q or K weight; the rows
    may be float values or a quantized row's bytes, which move as a whole)."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _float16_field(blocks: np.ndarray, offset: int) -> np.ndarray:
    """(rows, blocks, bytes) -> the float16 at byte `offset` of every block, as (rows, blocks) float32."""
    return np.ascontiguousarray(blocks[..., offset:offset + 2]).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(rows, blocks, 16) bytes -> (rows, blocks * 32) values: element j < 16 is byte j's low nibble,
    element 16 + j its high nibble (ggml's order)."""
    q = np.concatenate([qs & 15, qs >> 4], axis=-1)
    return q.reshape(q.shape[0], -1)


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file, in PyTorch's shape (out_features, in_features), not yet read."""

    name: str  # the file's name for it
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray  # the reader's memory-mapped view: (rows, bytes per row) for block types
    source: Path
    unpermute_heads: int | None = None  # undo llama.cpp's Q/K row interleaving over this many heads

    @property
    def type_name(self) -> str:
        return self.ggml_type.name

    @property
    def kernel_format(self) -> str | None:
        """"int4" or "int8" where leapllm's packed kernels run this type as it is stored, else None."""
        return KERNEL_FORMATS.get(self.ggml_type) if len(self.shape) == 2 else None

    def _rows(self) -> np.ndarray:
        data = self.data
        return data if self.unpermute_heads is None else unpermute_qk(data, self.unpermute_heads)

    def raw_rows(self) -> torch.Tensor:
        """The stored bytes, (rows, bytes per row) uint8, rows in PyTorch's order, copied into memory."""
        rows = self._rows()
        return torch.from_numpy(np.array(rows.reshape(rows.shape[0], -1).view(np.uint8)))

    def dequantize(self) -> torch.Tensor:
        """The float32 values, by the gguf package's reference dequantization."""
        try:
            values = dequantize(self._rows(), self.ggml_type)
        except NotImplementedError:
            raise ModelLoadError(
                f"{self.source}: tensor {self.name!r} uses quantization {self.type_name}, "
                "which the gguf package cannot dequantize"
            ) from None
        # np.array copies out of the read-only memory map into memory torch may own.
        return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(self.shape)

    def _blocks(self, block_bytes: int) -> np.ndarray:
        n, k = self.shape
        return np.asarray(self._rows()).reshape(n, k // BLOCK, block_bytes)

    def int4_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q4_0 / Q4_1 -> (q (N, K) uint8 in [0, 15], scale (N, K/32), minimum (N, K/32)) with
        w = q * scale + minimum, both float32 holding float16 values exactly."""
        if self.ggml_type == GGMLQuantizationType.Q4_1:
            blocks = self._blocks(20)
            scale, minimum, qs = _float16_field(blocks, 0), _float16_field(blocks, 2), blocks[..., 4:]
        elif self.ggml_type == GGMLQuantizationType.Q4_0:
            blocks = self._blocks(18)
            scale, qs = _float16_field(blocks, 0), blocks[..., 2:]
            minimum = -8 * scale
            if not np.isfinite(minimum.astype(np.float16)).all():
                raise ModelLoadError(f"{self.source}: tensor {self.name!r} has a Q4_0 scale too large for float16")
        else:
            raise ValueError(f"{self.type_name} is not a 4-bit block type")
        return torch.from_numpy(_nibbles(qs)), torch.from_numpy(scale), torch.from_numpy(minimum)

    def int8_parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Q8_0 -> (q (N, K) int8, scale (N, K/32) float16) with w = q * scale per block."""
        if self.ggml_type != GGMLQuantizationType.Q8_0:
            raise ValueError(f"{self.type_name} is not Q8_0")
        blocks = self._blocks(34)
        scale = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
        q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(self.shape)
        return torch.from_numpy(q), torch.from_numpy(scale)


def as_float(tensor: GGUFTensor | torch.Tensor) -> torch.Tensor:
    """A loader's tensor as float values: GGUF tensors are dequantized here, one at a time."""
    return tensor.dequantize() if isinstance(tensor, GGUFTensor) else tensor
