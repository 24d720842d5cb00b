"""K-quant super-blocks (cpu/super_blocks.h): every form (high bits, sub-block size, minimums or
not) through the SIMD tiles and the portable loops, against the expanded form they stand for."""

from __future__ import annotations

import pytest
import torch

from leapllm.kernels import cpu_kernels
from leapllm.kernels.packing import pack_int4, pack_int8_sub_blocks, pack_super_blocks, packed_linear

pytestmark = pytest.mark.usefixtures("built_kernels")  # skips, or fails if a compiler is there (conftest.py)

# (high bits, sub-block features, explicit minimums): Q4_K, Q5_K, Q6_K / Q3_K, Q2_K, and a mixed projection's form
FORMS = [(0, 32, True), (1, 32, True), (2, 16, False), (0, 16, True), (2, 16, True)]


def random_parts(high_bits: int, group: int, mins: bool, n: int = 48, k: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 2 ** (4 + high_bits), (n, k), generator=g, dtype=torch.uint8)
    u[0] = 2 ** (4 + high_bits) - 1  # the largest values against activations of +-127
    sc = torch.randint(-128 if not mins else 0, 128 if not mins else 64, (n, k // group), generator=g, dtype=torch.int8)
    mn = torch.randint(0, 64, (n, k // group), generator=g, dtype=torch.int8) if mins else None
    d = (torch.rand(n, k // 256, generator=g) + 0.1) * 1e-3
    m = -(torch.rand(n, k // 256, generator=g) + 0.1) * (1e-3 if mins else 32e-3)
    return u, sc, mn, d.half().float(), m.half().float()


def super_block_linears(u, sc, mn, d, m, high_bits, group):
    weight, high, factors = pack_super_blocks(u, high_bits, sc, mn, d, m)
    make = cpu_kernels().PackedLinear.from_super_blocks
    return (make(weight, high, *factors, None, high_bits, group, True),
            make(weight, high, *factors, None, high_bits, group, False))


def expanded_linear(u, sc, mn, d, m, high_bits, group, simd: bool):
    """The int8 sub-block layer of the same weights (Q4_K's form: int4 with float32 scales)."""
    mn = sc if mn is None else mn
    scale = d.repeat_interleave(256 // group, dim=1) * sc.float()
    minimum = m.repeat_interleave(256 // group, dim=1) * mn.float()
    if high_bits == 0 and group == 32:
        return packed_linear(*pack_int4(u, scale, minimum, torch.float32), None, bits=4, simd=simd)
    per16 = group // 16
    return packed_linear(*pack_int8_sub_blocks(u, scale.repeat_interleave(per16, dim=1),
                                               minimum.repeat_interleave(per16, dim=1)), None, bits=8, simd=simd)


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f"high{f[0]}-group{f[1]}-{'mins' if f[2] else 'symmetric'}")
def test_super_block_tiles_give_the_expanded_forms_bits_on_simd_and_portable_loops(form):
    parts = random_parts(*form, seed=form[0] + form[1])
    simd, portable = super_block_linears(*parts, *form[:2])
    assert simd.super_blocks and (simd.high_bits, simd.group) == form[:2] and not portable.simd
    expected = expanded_linear(*parts, *form[:2], simd=True).dequantize(torch.float32)
    assert torch.equal(simd.dequantize(torch.float32), expected)
    for rows in (1, 2, 5, 8, 13):
        x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows)) * 3
        y = simd.forward(x)
        assert torch.equal(y, expanded_linear(*parts, *form[:2], simd=True).forward(x))
        assert torch.equal(portable.forward(x), expanded_linear(*parts, *form[:2], simd=False).forward(x))
        assert torch.equal(y[:1], simd.forward(x[:1]))  # each row's bits, whatever rows come with it


def test_super_blocks_take_a_bias_and_refuse_bad_shapes():
    u, sc, mn, d, m = random_parts(1, 32, True)
    weight, high, factors = pack_super_blocks(u, 1, sc, mn, d, m)
    make = cpu_kernels().PackedLinear.from_super_blocks
    bias = torch.randn(48)
    layer = make(weight, high, *factors, bias, 1, 32, True)
    x = torch.randn(3, 512)
    assert torch.equal(layer.forward(x), make(weight, high, *factors, None, 1, 32, True).forward(x) + bias)
    with pytest.raises(RuntimeError, match="high bits"):
        make(weight, None, *factors, None, 1, 32, True)
    with pytest.raises(RuntimeError, match="sub-blocks are of 16 or 32"):
        make(weight, high, *factors, None, 1, 64, True)
    with pytest.raises(RuntimeError, match="int8"):
        make(weight, high, factors[0].float(), *factors[1:], None, 1, 32, True)
