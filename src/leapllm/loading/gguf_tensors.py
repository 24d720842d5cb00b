"""A GGUF file's tensors, read lazily from the memory map, and the block formats that run as they are.

Q4_0, Q4_1 and Q8_0 store blocks of 32 consecutive weights of a row with a float16 scale (and a
float16 minimum for Q4_1): exactly the blocks of leapllm's packed int4 / int8 layouts
(kernels/packing.py). So their bytes are repacked bit for bit, never through floats:
    Q4_1  w = d * q + m           q in [0, 15]      -> int4 (scale d, minimum m)
    Q4_0  w = d * (q - 8)         q in [0, 15]      -> int4 (scale d, minimum -8 d, exact in float16)
    Q8_0  w = d * q               q in [-127, 127]  -> int8 with a scale per block
    Q5_0  w = d * (q - 16)        q in [0, 31]      -> int5: q as low nibbles and fifth bits, a scale per block
The K-quants (Q2_K .. Q6_K) store super-blocks of 256 with 4- to 8-bit sub-block scales (and
minimums) under a float16 super-scale: each sub-block's factor, super-scale * sub-scale, is exact in
float32. They run in their own integers (SuperBlockParts, kernels/cpu/super_blocks.h): values as
low nibbles plus 0-2 high bits, int8 sub-block scales and minimums, float32 super-block factors;
Q4_K 4.75 bits a weight (its file 4.5), Q5_K 5.75 (5.5), Q6_K 6.75 (6.56), Q3_K 4.75 (3.44), Q2_K
5.25 (2.63). Q5_1 (5-bit values with a minimum) becomes int8 values with a float32 scale and minimum
per 16 features ("int8-16", 12 bits a weight). Every form dequantizes to the gguf package's values
bit for bit. Every type with a kernel can take the int8-16 form, so a fused projection whose parts
mix a K-quant with another type runs as one int8-16 layer (K-quants alone join as super-blocks).
The loader packs the int4, int8, int5 and super-block forms in C++ straight from the file's rows
(kernels/cpu/gguf_blocks.h, GGUFTensor.stored_rows); the numpy decoding here (int4_parts,
super_block_parts, ...) is their reference in the tests and builds the int8-16 form.
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
    GGMLQuantizationType.Q5_0: "int5",
    GGMLQuantizationType.Q5_1: "int8-16",
    GGMLQuantizationType.Q2_K: "super-blocks",
    GGMLQuantizationType.Q3_K: "super-blocks",
    GGMLQuantizationType.Q4_K: "super-blocks",
    GGMLQuantizationType.Q5_K: "super-blocks",
    GGMLQuantizationType.Q6_K: "super-blocks",
}
# What `leapllm info` says runs each format.
KERNEL_DESCRIPTIONS = {"int4": "leapllm int4 kernels", "int8": "leapllm int8 kernels",
                       "int8-16": "leapllm int8 kernels, a scale and minimum per 16 weights",
                       "int5": "leapllm 5-bit kernels, the file's layout",
                       "super-blocks": "leapllm super-block kernels, the file's layout"}
BLOCK = 32
RAW_ROWS_AT_ONCE = 8192  # rows of a stored table copied at a time (raw_rows)


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
        """The stored bytes, (rows, bytes per row) uint8, rows in PyTorch's order, copied into memory
        a slice at a time, each slice's file pages dropped once copied (a big embedding table's pages
        and its copy would otherwise both count at the load's peak)."""
        rows = self._rows()
        rows = rows.reshape(rows.shape[0], -1).view(np.uint8)
        out = torch.empty(rows.shape, dtype=torch.uint8)
        for r0 in range(0, rows.shape[0], RAW_ROWS_AT_ONCE):
            out[r0:r0 + RAW_ROWS_AT_ONCE] = torch.from_numpy(np.array(rows[r0:r0 + RAW_ROWS_AT_ONCE]))
            if self.release_pages is not None:
                self.release_pages()
        return out

    def stored_rows(self) -> tuple[np.ndarray, torch.Tensor]:
        """(the stored bytes as (rows, bytes per row), a view of the file; the stored row of each of
        PyTorch's rows, int64): what cpu/gguf_blocks.h packs from without copying the file's bytes."""
        data = np.asarray(self.data).reshape(self.shape[0], -1)
        order = np.arange(self.shape[0], dtype=np.int64)
        if self.unpermute_heads is not None:
            order = np.ascontiguousarray(unpermute_qk(order, self.unpermute_heads))
        return data, torch.from_numpy(order)

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

    def int4_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q4_0 / Q4_1 -> (q (N, K) uint8 in [0, 15], scale (N, K/32), minimum (N, K/32))
        with w = q * scale + minimum, float32 holding float16 values exactly."""
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

    def int5_parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Q5_0 -> (u (N, K) uint8 = q in [0, 31], scale (N, K/32) float16) with w = scale * (u - 16)."""
        if self.ggml_type != GGMLQuantizationType.Q5_0:
            raise ValueError(f"{self.type_name} is not Q5_0")
        u, scale, _ = self.sub_block_parts()
        return u, scale[:, ::2].half()  # d: float16 in the file

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
        if t in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1):
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
        return self.super_block_parts().sub_block_form()

    def super_block_parts(self) -> SuperBlockParts:
        """A K-quant's integers and factors, exactly as stored (SuperBlockParts)."""
        if self.ggml_type not in SUPER_BLOCK_FORMS:
            raise ValueError(f"{self.type_name} is not a K-quant")
        return _super_block_parts(self.ggml_type, self._blocks())


def _k_scales_mins(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's 12 bytes of 6-bit scales and minimums (..., 12) -> two (..., 8) arrays (ggml's
    get_scale_min_k4)."""
    d, m, m_d = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


@dataclass
class SuperBlockParts:
    """A K-quant tensor as its integers and factors: w = (D sc) u + (M mn) per sub-block of `group`
    features (16 or 32) within super-blocks of 256, each product exact in float32 (kernels/cpu/super_blocks.h)."""

    values: torch.Tensor  # u (N, K) uint8, below 2 ** (4 + high_bits)
    sub_scales: torch.Tensor  # sc (N, K / group) int8
    sub_mins: torch.Tensor | None  # mn (N, K / group) int8; None: mn = sc (a symmetric type)
    super_scales: torch.Tensor  # D (N, K / 256) float32
    super_mins: torch.Tensor  # M (N, K / 256) float32
    high_bits: int  # the values' bits above 4: 0, 1 or 2
    group: int

    def regrouped(self, group: int, high_bits: int, with_mins: bool) -> SuperBlockParts:
        """The same weights with smaller sub-blocks, more high bits or explicit minimums (to join a
        projection's parts of different types into one layer)."""
        repeat = self.group // group
        sc = self.sub_scales.repeat_interleave(repeat, dim=1)
        mn = self.sub_mins if self.sub_mins is not None else (self.sub_scales if with_mins else None)
        mn = None if mn is None else mn.repeat_interleave(repeat, dim=1)
        return SuperBlockParts(self.values, sc, mn, self.super_scales, self.super_mins, high_bits, group)

    @staticmethod
    def joined(parts: list[SuperBlockParts]) -> SuperBlockParts:
        """Parts concatenated by rows, in the most general form any of them needs."""
        group, high_bits = min(p.group for p in parts), max(p.high_bits for p in parts)
        with_mins = any(p.sub_mins is not None for p in parts)
        if len(parts) == 1:
            return parts[0]
        parts = [p.regrouped(group, high_bits, with_mins) for p in parts]
        return SuperBlockParts(torch.cat([p.values for p in parts]), torch.cat([p.sub_scales for p in parts]),
                               torch.cat([p.sub_mins for p in parts]) if with_mins else None,
                               torch.cat([p.super_scales for p in parts]), torch.cat([p.super_mins for p in parts]),
                               high_bits, group)

    def sub_block_form(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(u, scale, minimum (N, K / 16) float32): the int8-16 form of the same weights."""
        n = self.values.shape[0]
        repeat = self.group // 16
        per_group = 256 // self.group
        d = self.super_scales.repeat_interleave(per_group, dim=1) * self.sub_scales.float()
        mn = self.sub_scales if self.sub_mins is None else self.sub_mins
        m = self.super_mins.repeat_interleave(per_group, dim=1) * mn.float()
        return (self.values, d.repeat_interleave(repeat, dim=1).reshape(n, -1),
                m.repeat_interleave(repeat, dim=1).reshape(n, -1))


# Each K-quant's super-block form: (high bits, sub-block features, whether it stores sub-block
# minimums; the others' minimums are their scales).
SUPER_BLOCK_FORMS = {
    GGMLQuantizationType.Q2_K: (0, 16, True), GGMLQuantizationType.Q3_K: (0, 16, False),
    GGMLQuantizationType.Q4_K: (0, 32, True), GGMLQuantizationType.Q5_K: (1, 32, True),
    GGMLQuantizationType.Q6_K: (2, 16, False),
}


def super_block_target(types: list[GGMLQuantizationType]) -> tuple[int, int, bool]:
    """(high bits, sub-block size, with minimums): the super-block form that holds K-quant parts of
    these types in one layer, as SuperBlockParts.joined forms it."""
    forms = [SUPER_BLOCK_FORMS[t] for t in types]
    return max(h for h, _, _ in forms), min(g for _, g, _ in forms), any(m for _, _, m in forms)


def _super_block_parts(qtype: GGMLQuantizationType, sb: np.ndarray) -> SuperBlockParts:
    """Super-blocks (rows, n, bytes) of a K-quant -> its SuperBlockParts, the factors as the gguf
    package computes them (ggml's dequantize_row_q*_K)."""
    rows, n = sb.shape[:2]
    f16 = _float16_field
    high_bits, group, _ = SUPER_BLOCK_FORMS[qtype]
    mn = None
    if qtype in (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K):
        d, m = f16(sb, 0), -f16(sb, 2)
        sc, mn = _k_scales_mins(sb[..., 4:16])
        if qtype == GGMLQuantizationType.Q4_K:
            qs = sb[..., 16:144]
            u = ((qs.reshape(rows, n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(2, 1)) & 15).reshape(rows, n, 8, 32)
        else:
            qh, qs = sb[..., 16:48], sb[..., 48:176]
            low = ((qs.reshape(rows, n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(2, 1)) & 15).reshape(rows, n, 8, 32)
            high = (qh.reshape(rows, n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1
            u = low | (high << 4)
    elif qtype == GGMLQuantizationType.Q6_K:
        ql, qh, scales = sb[..., 0:128], sb[..., 128:192], sb[..., 192:208]
        d = f16(sb, 208)
        m = -32 * d  # w = d sc (u - 32)
        low = ((ql.reshape(rows, n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(2, 1)) & 15).reshape(rows, n, 8, 32)
        high = ((qh.reshape(rows, n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3).reshape(rows, n, 8, 32)
        u, sc = low | (high << 4), np.ascontiguousarray(scales).view(np.int8)
    elif qtype == GGMLQuantizationType.Q3_K:
        hmask, qs, packed = sb[..., 0:32], sb[..., 32:96], sb[..., 96:108]
        d = f16(sb, 108)
        m = -4 * d  # w = d sc (u - 4)
        low4 = (packed[..., 0:8].reshape(rows, n, 1, 8) >> np.array([0, 4], np.uint8).reshape(2, 1)).reshape(rows, n, 16)
        high2 = (packed[..., 8:12].reshape(rows, n, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)).reshape(rows, n, 16)
        sc = ((low4 & 15) | ((high2 & 3) << 4)).astype(np.int8) - np.int8(32)
        low = (qs.reshape(rows, n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3
        high = (hmask.reshape(rows, n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1
        u = low.reshape(rows, n, 256) | (high.reshape(rows, n, 256) << 2)
    elif qtype == GGMLQuantizationType.Q2_K:
        scales, qs = sb[..., 0:16], sb[..., 16:80]
        d, m = f16(sb, 80), -f16(sb, 82)
        u = (qs.reshape(rows, n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3
        sc, mn = scales & 15, scales >> 4
    else:
        raise ValueError(f"{qtype.name} is not a K-quant")

    def tensor(a: np.ndarray, dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=dtype).reshape(rows, -1))

    return SuperBlockParts(tensor(u, np.uint8), tensor(sc, np.int8), None if mn is None else tensor(mn, np.int8),
                           tensor(d, np.float32), tensor(m, np.float32), high_bits, group)


def as_float(tensor: GGUFTensor | torch.Tensor) -> torch.Tensor:
    """A loader's tensor as float values: GGUF tensors are dequantized here, one at a time."""
    return tensor.dequantize() if isinstance(tensor, GGUFTensor) else tensor
