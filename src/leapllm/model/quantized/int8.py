"""Int8 weights run as int8 x int8 -> int32 GEMMs, with one or two int8 "digits" of activation.

Weights are quantized once, symmetric per output channel. Activations are quantized on the fly,
symmetric per row (per token), so an outlier token does not flatten every other token's range.
`torch._int_mm` runs the GEMM (VNNI on x86 CPUs, tensor cores on CUDA), then the int32 result is
rescaled by (row scale x channel scale).

One int8 digit of activation (W8A8) is what the encoders use: fast, and their cosine similarity
stays above 0.99. A decoder's perplexity suffers from it (+3.8% on the default model), because
activation outliers make the per-token step coarse. So the decoder's int8 splits each activation
into two digits, x ~ s * (hi + lo / 254) with hi, lo int8: the rounding error drops from s / 2 to
s / 508 (about 16 bits), which is weight-only int8 accuracy. Both digits go through one GEMM as
extra rows, so the weights are still read once: at batch 1 the cost is the same as one digit.

On a CPU where leapllm's own kernels build (leapllm/kernels), the layer runs on them instead:
activations quantized to int8 per block of 32 values (a scale per block, as llama.cpp's Q8 blocks),
fine enough that one digit keeps weight-only accuracy, and weights read at the memory's speed
(`torch._int_mm` pads a single row to 17 here and does not reach it).
"""

from __future__ import annotations

import torch
from torch import nn

from leapllm.kernels.packing import (
    TILE,
    attach_packed,
    kernels_can_run,
    pack_int8,
    pack_int8_blocks,
    pack_int8_sub_blocks,
    packed_forward,
    packed_linear,
)

LO_DIGIT = 254  # the low digit's step is the high digit's / 254, so |lo| <= 127


def quantize_per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, in) float -> (int8 weight (out, in), float32 scale (out,)); weight ~ q * scale."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 activation_digits: int = 1, minimum: torch.Tensor | None = None):
        """q (out, in) int8 and scale (out,): weight ~ q * scale[:, None]; or scale (out, in / 32)
        float16, one per block of 32 (GGUF's Q8_0); or q uint8 values with scale and minimum
        (out, in / 16) float32, w = q * scale + minimum per 16 (GGUF's K-quants). The block forms run
        on leapllm's kernels only. activation_digits: 1 (W8A8) or 2 (activation precision of ~16
        bits, see the module docstring)."""
        super().__init__()
        if activation_digits not in (1, 2):
            raise ValueError(f"activation_digits must be 1 or 2, got {activation_digits}")
        self.out_features, self.in_features = q.shape
        self.activation_digits = activation_digits
        self.packed_linear = None  # the C++ PackedLinear, when leapllm's kernels run this layer
        block_scales = scale.dim() == 2
        self.padded_rows = 0
        pad = -self.out_features % TILE
        if pad and not block_scales and minimum is None and kernels_can_run(self.in_features,
                                                                            self.out_features + pad, q.device):
            # An output count the kernels' tiles do not divide (a 58,101-token vocabulary): zero rows
            # fill the last tile, and forward drops their outputs.
            q = torch.cat([q, q.new_zeros(pad, self.in_features)])
            scale = torch.cat([scale.float(), scale.new_ones(pad, dtype=torch.float32)])
            if bias is not None:
                bias = torch.cat([bias.detach().float(), bias.new_zeros(pad, dtype=torch.float32)])
            self.padded_rows = pad
        if block_scales and not kernels_can_run(self.in_features, self.out_features, q.device):
            raise ValueError("int8 weights with a scale per block run only on leapllm's CPU kernels")
        if kernels_can_run(self.in_features, self.out_features + self.padded_rows, q.device):
            mins = None
            if minimum is not None:
                weight, scales, mins = pack_int8_sub_blocks(q, scale, minimum)
            else:
                weight, scales = pack_int8_blocks(q, scale) if block_scales else pack_int8(q, scale)
            self.register_buffer("packed_weight", weight)
            self.register_buffer("packed_scales", scales)
            self.register_buffer("packed_mins", mins)
            self.register_buffer("bias", None if bias is None else bias.detach().float())
            self.packed_linear = packed_linear(weight, scales, mins, self.bias, bits=8)
            return
        self.register_buffer("weight_t", q.t().contiguous().t())  # (out, in) int8, so .t() is (in, out) contiguous
        self.register_buffer("weight_scale", scale.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    @classmethod
    def from_packed(cls, weight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                    bias: torch.Tensor | None) -> Int8Linear:
        """A layer on weights already in the kernels' layout (pack_int8, pack_int8_blocks or
        pack_int8_sub_blocks output), e.g. a big output head packed a slice of rows at a time."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.out_features, layer.in_features = weight.shape
        layer.activation_digits, layer.padded_rows = 1, 0
        attach_packed(layer, weight, scales, mins, bias, bits=8)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation_digits: int = 1) -> Int8Linear:
        q, scale = quantize_per_channel_int8(linear.weight)
        return cls(q, scale, linear.bias, activation_digits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_linear is not None:
            out = packed_forward(self.packed_linear, x)
            return out[..., :self.out_features] if self.padded_rows else out
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, self.in_features).float()  # (rows, in)
        rows = x2.shape[0]
        x_scale = (x2.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)  # (rows, 1)
        hi = torch.round(x2 / x_scale)
        xq = hi
        if self.activation_digits == 2:
            lo = torch.round((x2 - hi * x_scale) * (LO_DIGIT / x_scale))  # the rounding error, in steps of s / 254
            xq = torch.cat([hi, lo])  # (2 * rows, in): one GEMM, weights read once
        xq = xq.to(torch.int8)
        if xq.shape[0] <= 16:  # _int_mm wants more than 16 rows on CUDA; padding is cheap at this size
            xq = torch.cat([xq, xq.new_zeros(17 - xq.shape[0], self.in_features)])
        acc = torch._int_mm(xq, self.weight_t.t()).float()  # (rows or 2 * rows, out), exact int32 sums
        out = acc[:rows]
        if self.activation_digits == 2:
            out = out + acc[rows:2 * rows] / LO_DIGIT
        out = out * x_scale * self.weight_scale
        if self.bias is not None:
            out = out + self.bias
        return out.to(dtype).reshape(*shape[:-1], self.out_features)

    @property
    def bytes_per_weight(self) -> float:
        """One byte per weight plus a float32 scale per output row or a float16 one per block of 32
        (activation scales are not weights)."""
        if self.packed_linear is not None and self.packed_linear.sub_blocks:
            return 1 + 8 / 16
        if self.packed_linear is not None and self.packed_linear.block_scales:
            return 1 + 2 / 32
        return 1 + 4 / self.in_features

    def extra_repr(self) -> str:
        if self.packed_linear is not None:
            kernel = f"leapllm {self.packed_linear.kernel} kernel"
            weights = ("int8 weights, a scale and minimum per 16" if self.packed_linear.sub_blocks
                       else "int8 weights, a scale per block of 32" if self.packed_linear.block_scales
                       else "int8 per-channel weights")
            return (f"in_features={self.in_features}, out_features={self.out_features}, {weights}, "
                    f"int8 activations per block of 32 ({kernel})")
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel weights, "
                f"{self.activation_digits} int8 digit(s) of activation")


def quantize_linears_int8(module: nn.Module, activation_digits: int = 1) -> nn.Module:
    """Replace every nn.Linear inside module by an Int8Linear, in place; returns module."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear.from_linear(child, activation_digits))
        else:
            quantize_linears_int8(child, activation_digits)
    return module
