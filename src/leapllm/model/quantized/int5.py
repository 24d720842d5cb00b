"""A linear layer on GGUF Q5_0 blocks as stored: 5-bit values with a float16 scale per block of 32.

w = d (u - 16), u in [0, 31]: the low 4 bits in the int4 layout, the fifth bits in a plane of their
own (kernels/cpu/packed_linear.h, PackedLinear::five_bit): 5.5 bits a weight, the file's own size,
where int8 blocks took 8.5. The layer runs on leapllm's CPU kernels only (the loader keeps a file's
Q5_0 blocks so where they run); activations are quantized to int8 per block of 32.
"""

from __future__ import annotations

import torch
from torch import nn

from leapllm.kernels.packing import five_bit_linear, pack_super_blocks, packed_forward


class Int5BlockLinear(nn.Module):
    def __init__(self, values: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        """values u (out, in) uint8 in [0, 31], scale d (out, in / 32) float16: w = d (u - 16)."""
        super().__init__()
        self.out_features, self.in_features = values.shape
        weight, high, (scales,) = pack_super_blocks(values, 1, scale.to(torch.float16))
        self._attach(weight, high, scales, bias)

    @classmethod
    def from_packed(cls, weight: torch.Tensor, high: torch.Tensor, scales: torch.Tensor,
                    bias: torch.Tensor | None) -> Int5BlockLinear:
        """A layer on tensors already in the kernels' layout (pack_super_blocks with one high bit),
        e.g. a big output head packed a slice of rows at a time."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.out_features, layer.in_features = weight.shape[0], 2 * weight.shape[1]
        layer._attach(weight, high, scales, bias)
        return layer

    def _attach(self, weight, high, scales, bias) -> None:
        self.register_buffer("packed_weight", weight)
        self.register_buffer("packed_high", high)
        self.register_buffer("packed_scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.packed_linear = five_bit_linear(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_forward(self.packed_linear, x)

    @property
    def bytes_per_weight(self) -> float:
        """What a matmul reads per weight: 5 bits and a float16 scale per 32."""
        return 5 / 8 + 2 / 32

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, 5-bit values, a float16 scale "
                f"per block of 32 (leapllm {self.packed_linear.kernel} kernel)")
