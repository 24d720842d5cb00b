"""A linear layer on GGUF K-quant super-blocks, kept near the file's size (kernels/cpu/super_blocks.h).

w = (D sc) u + (M mn): values u of 2 to 6 bits (low nibbles plus 0-2 high bits), int8 sub-block
scales sc and minimums mn per 16 or 32 features, float32 super-block factors D and M per 256. The
layer runs on leapllm's CPU kernels only (the loader keeps a file's K-quants so where they run);
activations are quantized to int8 per block of 32, as on every packed layer.
"""

from __future__ import annotations

import torch
from torch import nn

from leapllm.kernels.packing import pack_super_blocks, packed_forward, super_block_linear


class SuperBlockLinear(nn.Module):
    def __init__(self, values: torch.Tensor, sub_scales: torch.Tensor, sub_mins: torch.Tensor | None,
                 super_scales: torch.Tensor, super_mins: torch.Tensor, high_bits: int, group: int,
                 bias: torch.Tensor | None = None):
        """values u (out, in) uint8; sub_scales, sub_mins (out, in / group) int8 (sub_mins None: the
        minimums are the scales); super_scales D, super_mins M (out, in / 256) float32."""
        super().__init__()
        self.out_features, self.in_features = values.shape
        self.high_bits, self.group = high_bits, group
        weight, high, (sc, mn, d, m) = pack_super_blocks(values, high_bits, sub_scales.to(torch.int8),
                                                         None if sub_mins is None else sub_mins.to(torch.int8),
                                                         super_scales.float(), super_mins.float())
        self._attach(weight, high, sc, mn, d, m, bias)

    @classmethod
    def from_packed(cls, packed: tuple, high_bits: int, group: int, bias: torch.Tensor | None) -> SuperBlockLinear:
        """A layer on tensors already in the kernels' layout (pack_super_blocks's output, flattened:
        low nibbles, high bits, sc, mn, D, M), e.g. a big output head packed a slice of rows at a time."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        weight = packed[0]
        layer.out_features, layer.in_features = weight.shape[0], 2 * weight.shape[1]
        layer.high_bits, layer.group = high_bits, group
        layer._attach(*packed, bias)
        return layer

    def _attach(self, weight, high, sc, mn, d, m, bias) -> None:
        for name, tensor in (("packed_weight", weight), ("packed_high", high), ("packed_scales", sc),
                             ("packed_mins", mn), ("packed_super_scales", d), ("packed_super_mins", m)):
            self.register_buffer(name, tensor)
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.packed_linear = super_block_linear(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_forward(self.packed_linear, x)

    @property
    def bytes_per_weight(self) -> float:
        """What a matmul reads per weight: the value bits, the int8 sub-block factors, the float32
        super-block ones."""
        sub = 1 if self.packed_mins is None else 2
        return (4 + self.high_bits) / 8 + sub / self.group + 8 / 256

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{4 + self.high_bits}-bit values in super-blocks of 256, sub-blocks of {self.group} "
                f"(leapllm {self.packed_linear.kernel} kernel)")
