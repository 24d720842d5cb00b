"""Int4 weights, group-wise asymmetric, run by PyTorch's packed int4 matmul kernels.

Each group of `group_size` consecutive input weights of an output row gets its own scale and
offset: w ~ q * scale + min, q in [0, 15]. PyTorch's kernels take the offset as
`zero = min + 8 * scale` (they compute (q - 8) * scale + zero), in a (K / group, N, 2) tensor of
(scale, zero) pairs, and the 4-bit values packed in a device-specific layout. So the portable form
that is saved to disk is the unpacked q (uint8, one value per byte) plus scales and minimums, and
packing happens when a model is loaded onto its device.

At batch 1 a decode step reads every weight once, so 4-bit weights (plus one scale and zero per
group) cut the bytes read by ~7x against float32.

On a CPU where leapllm's own kernels build (leapllm/kernels), the layer runs on them instead: the
weights packed as in kernels/packing.py, activations quantized to int8 per block of 32 on the fly,
and 16-row tiles of VNNI dot products, faster than PyTorch's int4 kernel at batch 1
(benchmarks/README.md). They also let a decode step run fused (model/fused_decode.py).
"""

from __future__ import annotations

import torch
from torch import nn

from leapllm.errors import InvalidRequestError
from leapllm.kernels.packing import (
    attach_packed,
    kernels_can_run,
    pack_int4,
    packed_forward,
    packed_linear,
)

GROUP_SIZES = (32, 64, 128)


def check_group_size(in_features: int, group_size: int, name: str = "weight") -> None:
    if group_size not in GROUP_SIZES:
        raise InvalidRequestError(f"group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    if in_features % group_size:
        raise InvalidRequestError(f"group size {group_size} does not divide {name}'s {in_features} input features")


def quantize_int4_groupwise(weight: torch.Tensor, group_size: int, clip: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight (N, K) float -> (q (N, K) uint8 in [0, 15], scale (N, K/group), minimum (N, K/group)), round to nearest.

    clip (N, K/group), optional: shrink each group's [min, max] range by this ratio (<= 1) first,
    trading a few clipped outliers for finer steps (see awq.py)."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    if clip is not None:
        lo, hi = lo * clip, hi * clip
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return q.reshape(n, k), scale, lo


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 values in [0, 15] -> (N, K/2) uint8, two per byte (even column in the high half): the file format."""
    return (q[:, ::2] << 4) | q[:, 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4_groupwise(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    groups = scale.shape[1]
    w = q.reshape(n, groups, k // groups).float() * scale[..., None] + minimum[..., None]
    return w.reshape(n, k)


class Int4Linear(nn.Module):
    """y = x @ dequant(W).T (+ bias), computed by leapllm's CPU kernels where they run, otherwise by
    _weight_int4pack_mm(_for_cpu) on PyTorch's packed weights. Built on its device; not moved later."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bias: torch.Tensor | None,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = self.in_features // scale.shape[1]
        device = torch.device(device)
        self.on_cpu = device.type == "cpu"
        self.packed_linear = None  # the C++ PackedLinear, when leapllm's kernels run this layer
        if kernels_can_run(self.in_features, self.out_features, device):
            weight, scales, mins = pack_int4(q.cpu(), scale.cpu(), minimum.cpu())
            self.register_buffer("packed_weight", weight)
            self.register_buffer("packed_scales", scales)
            self.register_buffer("packed_mins", mins)
            self.register_buffer("bias", None if bias is None else bias.detach().float().cpu())
            self.packed_linear = packed_linear(weight, scales, mins, self.bias, bits=4)
            return
        q32 = q.to(torch.int32).to(device)
        if self.on_cpu:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q32, 2)
        else:  # CUDA packs two values per byte first, then tiles
            packed = torch.ops.aten._convert_weight_to_int4pack((q32[:, ::2] << 4 | q32[:, 1::2]).to(torch.uint8), 8)
        zero = minimum.float() + 8 * scale.float()
        # (K / group, N, 2): the kernels' layout, in bfloat16: both kernels' fast path takes bfloat16
        # activations (their float32 path is an order of magnitude slower; benchmarks/README.md).
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", torch.stack([scale.float(), zero], dim=-1).transpose(0, 1)
                             .contiguous().to(device=device, dtype=torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().to(device))

    @classmethod
    def from_packed(cls, weight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                    bias: torch.Tensor | None) -> Int4Linear:
        """A layer on weights already in the kernels' layout (pack_int4's output), e.g. a big
        output head packed a slice of rows at a time."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.out_features, layer.in_features = weight.shape[0], 2 * weight.shape[1]
        layer.group_size, layer.on_cpu = 32, True  # the kernels' scales are per block of 32
        attach_packed(layer, weight, scales, mins, bias, bits=4)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        check_group_size(linear.in_features, group_size)
        q, scale, minimum = quantize_int4_groupwise(linear.weight, group_size)
        return cls(q, scale, minimum, linear.bias, linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_linear is not None:
            return packed_forward(self.packed_linear, x)
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, self.in_features)
        xb = x2.to(torch.bfloat16)
        if self.on_cpu:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, self.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm(xb, self.packed, self.group_size, self.scales_and_zeros)
        y = y.to(dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    @property
    def bytes_per_weight(self) -> float:
        """What a matmul reads per weight: half a byte, plus a 16-bit scale and minimum per group (per block
        of 32 in leapllm's kernels)."""
        if self.packed_linear is not None:
            return 0.5 + (8 if self.packed_linear.float_scales else 4) / 32
        return 0.5 + 4 / self.group_size

    def extra_repr(self) -> str:
        kernel = (f"leapllm {self.packed_linear.kernel} kernel" if self.packed_linear is not None
                  else "PyTorch int4pack kernel")
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group_size}, "
                f"{kernel}")
