"""A GGUF file's tensors, read lazily from the memory map, and the block formats that run as they are.

Q4_0, Q4_1 and Q8_0 store blocks of 32 consecutive weights of a row with a float16 scale (and a
float16 minimum for Q4_1): exactly the blocks of leapllm's packed int4 / int8 layouts
(kernels/packing.py). So their bytes are repacked bit for bit, never through floats:
    Q4_1  w = d * q + m           q in [0, 15]      -> int4 (scale d, minimum m)
    Q4_0  w = d * (q - 8)         q in [0, 15]      -> int4 (scale d, minimum -8 d, exact in float16)
    Q8_0  w = d * q               q in [-127, 127]  -> int8 with a scale per block
    Q5_0  w = d * (q - 16)        q in [0, 31]      -> int8 with a scale per block (q - 16 as the int8)
The K-quants (Q2_K .. Q6_K) store super-blocks of 256 with 4- to 8-bit sub-block scales (and
minimums) under a float16 super-scale: each sub-block's d = super-scale * sub-scale is exact in
float32. Q4_K (sub-blocks of 32) becomes int4 with float32 scales and minimums (6 bits per weight,
its file 4.5); the others become int8 values with a float32 scale and minimum per 16 features
("int8-16", 12 bits per weight), w = d * u + m, as does Q5_1 (5-bit values with a minimum).
Both dequantize to the gguf package's values bit for bit: exact, 2.7x to 5x smaller than float32,
not yet the file's size. Every type above can take the int8-16 form, so a fused projection whose
parts differ (a Q4_K_M layer's Q4_K q/k and Q6_K v) runs as one int8-16 layer.
Every other type (F16, BF16, IQ*, ...) has no kernel yet: it is dequantized by the
`gguf` package (llama.cpp's own reference code) to float32 when the model is built, one tensor at a
time, and `leapllm info` says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from leapllm.errors import ModelLoadError

# The GGUF types leapllm's kernels run without converting a weight: type -> packed layout.
KERNEL_FORMATS = {
    GGMLQuantizationType.Q4_0: "int4",
    GGMLQuantizationType.Q4_1: "int4",
    GGMLQuantizationType.Q8_0: "int8",
    GGMLQuantizationType.Q5_0: "int8",
    GGMLQuantizationType.Q5_1: "int8-16",
    GGMLQuantizationType.Q2_K: "int8-16",
    GGMLQuantizationType.Q3_K: "int8-16",
    GGMLQuantizationType.Q4_K: "int4",
    GGMLQuantizationType.Q5_K: "int8-16",
    GGMLQuantizationType.Q6_K: "int8-16",
}
# What `leapllm info` says runs each format.
KERNEL_DESCRIPTIONS = {"int4": "leapllm int4 kernels", "int8": "leapllm int8 kernels",
                       "int8-16": "leapllm int8 kernels, a scale and minimum per 16 weights"}
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
    release_pages: Callable[[], None] | None = None  # drop the file's pages once the tensor is built

    @property
    def type_name(self) -> str:
        return self.ggml_type.name

    @property
    def kernel_format(self) -> str | None:
        """The packed format ("int4", "int8" or "int8-16") leapllm's kernels run this type in as it is
        stored, else None."""
        return KERNEL_FORMATS.get(self.ggml_type) if len(self.shape) == 2 else None

    def _rows(self) -> np.ndarray:
        data = self.data
        return data if self.unpermute_heads is None else unpermute_qk(data, self.unpermute_heads)

    def expert(self, e: int) -> GGUFTensor:
        """Expert e's (out, in) matrix of a stacked (experts, out, in) tensor: still the file's bytes."""
        _, out, inp = self.shape
        data = self.data[e] if self.data.ndim == 3 else self.data[e * out:(e + 1) * out]
        return GGUFTensor(f"{self.name}[{e}]", self.ggml_type, (out, inp), data, self.source)

    def row_slice(self, start: int, stop: int) -> GGUFTensor:
        """Rows [start, stop) of a 2-D tensor stored in PyTorch's row order: still the file's bytes."""
        if self.unpermute_heads is not None or len(self.shape) != 2:
            raise ValueError(f"{self.name}: row slices are of plain 2-D tensors")
        return GGUFTensor(f"{self.name}[{start}:{stop}]", self.ggml_type, (stop - start, self.shape[1]),
                          self.data[start:stop], self.source)

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

    def _blocks(self) -> np.ndarray:
        """The stored rows as (rows, blocks, bytes per block): blocks of 32, or super-blocks of 256
        for the K-quants."""
        n, k = self.shape
        block, block_bytes = GGML_QUANT_SIZES[self.ggml_type]
        return np.asarray(self._rows()).reshape(n, k // block, block_bytes)

    @property
    def float16_scales(self) -> bool:
        """Whether the int4 form's scales and minimums fit float16 exactly (not Q4_K's products)."""
        return self.ggml_type != GGMLQuantizationType.Q4_K

    def int4_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q4_0 / Q4_1 / Q4_K -> (q (N, K) uint8 in [0, 15], scale (N, K/32), minimum (N, K/32))
        with w = q * scale + minimum, float32 (holding float16 values exactly but for Q4_K)."""
        if self.ggml_type == GGMLQuantizationType.Q4_K:
            n, k = self.shape
            u, scale, minimum = _k_quant_parts(self.ggml_type, self._blocks())
            return (torch.from_numpy(np.ascontiguousarray(u).reshape(n, k)),
                    torch.from_numpy(np.ascontiguousarray(scale[..., ::2]).reshape(n, k // BLOCK)),
                    torch.from_numpy(np.ascontiguousarray(minimum[..., ::2]).reshape(n, k // BLOCK)))
        if self.ggml_type == GGMLQuantizationType.Q4_1:
            blocks = self._blocks()
            scale, minimum, qs = _float16_field(blocks, 0), _float16_field(blocks, 2), blocks[..., 4:]
        elif self.ggml_type == GGMLQuantizationType.Q4_0:
            blocks = self._blocks()
            scale, qs = _float16_field(blocks, 0), blocks[..., 2:]
            minimum = -8 * scale
            if not np.isfinite(minimum.astype(np.float16)).all():
                raise ModelLoadError(f"{self.source}: tensor {self.name!r} has a Q4_0 scale too large for float16")
        else:
            raise ValueError(f"{self.type_name} is not a 4-bit block type")
        return torch.from_numpy(_nibbles(qs)), torch.from_numpy(scale), torch.from_numpy(minimum)

    def int8_parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Q8_0 / Q5_0 -> (q (N, K) int8, scale (N, K/32) float16) with w = q * scale per block."""
        if self.ggml_type == GGMLQuantizationType.Q5_0:
            u, scale, _ = self.sub_block_parts()
            return (u.to(torch.int16) - 16).to(torch.int8), scale[:, ::2].half()  # d: float16 in the file
        if self.ggml_type != GGMLQuantizationType.Q8_0:
            raise ValueError(f"{self.type_name} is neither Q8_0 nor Q5_0")
        blocks = self._blocks()
        scale = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
        q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(self.shape)
        return torch.from_numpy(q), torch.from_numpy(scale)

    def sub_block_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Any type with a kernel format -> (u (N, K) uint8, scale (N, K/16), minimum (N, K/16)
        float32) with w = u * scale + minimum per 16 values, exact (dequantized with one fused
        multiply-add, as the gguf package's d * (q - offset))."""
        n, k = self.shape
        t = self.ggml_type
        if t in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1):  # (Q4_K: below, per 16 already)
            q, scale, minimum = self.int4_parts()
            return q, scale.repeat_interleave(2, dim=1), minimum.repeat_interleave(2, dim=1)
        if t == GGMLQuantizationType.Q8_0:
            q, scale = self.int8_parts()
            scale = scale.float().repeat_interleave(2, dim=1)
            return q.view(torch.uint8) ^ 128, scale, -128 * scale  # u = q + 128
        if t in (GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1):
            has_min = t == GGMLQuantizationType.Q5_1
            blocks = self._blocks()
            scale = _float16_field(blocks, 0)
            minimum = _float16_field(blocks, 2) if has_min else -16 * scale  # Q5_0: w = d * (q - 16)
            start = 4 if has_min else 2
            qh = np.ascontiguousarray(blocks[..., start:start + 4]).view("<u4")  # (rows, blocks, 1): bit j -> value j
            high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # (rows, blocks, 32)
            u = _nibbles(blocks[..., start + 4:start + 20]).reshape(high.shape) | (high << 4)
            return (torch.from_numpy(u.reshape(n, k)), torch.from_numpy(scale).repeat_interleave(2, dim=1),
                    torch.from_numpy(minimum).repeat_interleave(2, dim=1))
        u, scale, minimum = _k_quant_parts(t, self._blocks())
        return (torch.from_numpy(np.ascontiguousarray(u).reshape(n, k)),
                torch.from_numpy(np.ascontiguousarray(scale, np.float32).reshape(n, k // 16)),
                torch.from_numpy(np.ascontiguousarray(minimum, np.float32).reshape(n, k // 16)))


def _k_scales_mins(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's 12 bytes of 6-bit scales and minimums (..., 12) -> two (..., 8) arrays (ggml's
    get_scale_min_k4)."""
    d, m, m_d = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _k_quant_parts(qtype: GGMLQuantizationType, sb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Super-blocks (rows, n, bytes) of a K-quant -> (u (rows, n, 256) uint8, d, m (rows, n, 16) float32)
    with w = d * u + m per 16 values, computed as the gguf package computes each sub-block's factors."""
    rows, n = sb.shape[:2]
    f16 = _float16_field
    if qtype in (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K):
        d, dmin = f16(sb, 0)[..., None], f16(sb, 2)[..., None]
        sc, mn = _k_scales_mins(sb[..., 4:16])
        if qtype == GGMLQuantizationType.Q4_K:
            qs = sb[..., 16:144]
            u = ((qs.reshape(rows, n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(2, 1)) & 15).reshape(rows, n, 8, 32)
        else:
            qh, qs = sb[..., 16:48], sb[..., 48:176]
            low = ((qs.reshape(rows, n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(2, 1)) & 15).reshape(rows, n, 8, 32)
            high = (qh.reshape(rows, n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1
            u = low | (high << 4)
        scale = d * sc.astype(np.float32)  # (rows, n, 8) per 32
        minimum = -(dmin * mn.astype(np.float32))
        return u.reshape(rows, n, 256), np.repeat(scale, 2, axis=-1), np.repeat(minimum, 2, axis=-1)
    if qtype == GGMLQuantizationType.Q6_K:
        ql, qh, scales = sb[..., 0:128], sb[..., 128:192], sb[..., 192:208]
        d = f16(sb, 208)[..., None]
        low = ((ql.reshape(rows, n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(2, 1)) & 15).reshape(rows, n, 8, 32)
        high = ((qh.reshape(rows, n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3).reshape(rows, n, 8, 32)
        scale = d * np.ascontiguousarray(scales).view(np.int8).astype(np.float32)  # (rows, n, 16)
        return (low | (high << 4)).reshape(rows, n, 256), scale, -32 * scale  # w = d * (u - 32)
    if qtype == GGMLQuantizationType.Q3_K:
        hmask, qs, packed = sb[..., 0:32], sb[..., 32:96], sb[..., 96:108]
        d = f16(sb, 108)[..., None]
        low4 = (packed[..., 0:8].reshape(rows, n, 1, 8) >> np.array([0, 4], np.uint8).reshape(2, 1)).reshape(rows, n, 16)
        high2 = (packed[..., 8:12].reshape(rows, n, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)).reshape(rows, n, 16)
        sc = ((low4 & 15) | ((high2 & 3) << 4)).astype(np.int8) - np.int8(32)
        low = (qs.reshape(rows, n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3
        high = (hmask.reshape(rows, n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1
        scale = d * sc.astype(np.float32)
        return (low.reshape(rows, n, 256) | (high.reshape(rows, n, 256) << 2)), scale, -4 * scale  # w = d * (u - 4)
    if qtype == GGMLQuantizationType.Q2_K:
        scales, qs = sb[..., 0:16], sb[..., 16:80]
        d, dmin = f16(sb, 80)[..., None], f16(sb, 82)[..., None]
        u = (qs.reshape(rows, n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3
        return (u.reshape(rows, n, 256), d * (scales & 15).astype(np.float32),
                -(dmin * (scales >> 4).astype(np.float32)))
    raise ValueError(f"{qtype.name} is not a K-quant")


def as_float(tensor: GGUFTensor | torch.Tensor) -> torch.Tensor:
    """A loader's tensor as float values: GGUF tensors are dequantized here, one at a time."""
    return tensor.dequantize() if isinstance(tensor, GGUFTensor) else tensor
