"""The int8 sub-block tiles (GGUF's K-quants: w = d * u + m per 16 features, u the stored byte): the
SIMD tile (VNNI or AVX2) against the portable loop and against float64 sums of the same quantized
activations. u runs up to 255 (a Q8_0 part of a mixed projection is stored q + 128), where a 16-bit
pair sum of AVX2's maddubs would saturate: the tests put bytes of 255 against activations of
+-127."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from leapllm.kernels.packing import pack_int8_sub_blocks, packed_linear
from leapllm.loading.gguf_tensors import GGUFTensor
from tests.loading.test_gguf_tensors import random_blocks

pytestmark = pytest.mark.usefixtures("built_kernels")  # skips, or fails if a compiler is there (conftest.py)

ROWS = [1, 2, 3, 5, 8, 13, 33]  # one row (decode), groups of 4 and 8 with remainders, more than 32


def quantized_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernels' int8 activations, computed as quantize_row does (the same float32 operations):
    x (rows, K) -> (q (rows, K/16, 16) float64, scale and half_sum (rows, K/16) float32, per half block)."""
    blocks = x.float().reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1)
    scale = amax / 127
    inverse = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inverse[..., None]).reshape(x.shape[0], -1, 16)  # half-to-even, as nearbyint
    scale = scale.repeat_interleave(2, dim=1)
    return q.double(), scale, scale * q.sum(-1)


def float64_reference(u, d, m, x, bias=None) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x W^T (+ bias) in float64 on the quantized activations, and each output's sum of absolute
    terms (what float32 rounding errors scale with): (rows, N) each."""
    q, scale, half_sum = quantized_activations(x)
    n = u.shape[0]
    sums = torch.einsum("rhj,nhj->rnh", q, u.double().reshape(n, -1, 16))  # exact integers
    terms = torch.cat([sums * d.double() * scale.double()[:, None], m.double() * half_sum.double()[:, None]], -1)
    y, magnitude = terms.sum(-1), terms.abs().sum(-1)
    if bias is not None:
        y, magnitude = y + bias.double(), magnitude + bias.double().abs()
    return y, magnitude


def simd_and_portable(u, d, m, bias=None):
    packed = pack_int8_sub_blocks(u, d, m)
    simd, portable = packed_linear(*packed, bias, bits=8), packed_linear(*packed, bias, bits=8, simd=False)
    assert simd.sub_blocks and not portable.simd
    return simd, portable


def exact_case(weights: str, rows: int, with_bias: bool):
    """Weights and activations for which every float step of either tile is exact: powers of two for
    the weight and activation scales, so a product is an integer times 2^-16 and every sum stays
    below 2^8 (asserted), within float32's 24 bits."""
    g = torch.Generator().manual_seed(rows)
    n, k = 48, 64
    if weights == "bytes 0..255":
        u = torch.randint(0, 256, (n, k), generator=g)
    elif weights == "bytes 0..63":  # Q6_K's range and below: the AVX2 tile's cheaper exact path
        u = torch.randint(0, 64, (n, k), generator=g)
    else:  # each tile's extremes, on either side of 64 and both paths in one tile
        u = torch.full((n, k), 255)
        u[16:32] = 63
        u[16:32, 32:] = 255
        u[32:, :32], u[32:, 32:] = 64, 127
    d = 2.0 ** -torch.randint(8, 10, (n, k // 16), generator=g)
    m = -torch.randint(0, 64, (n, k // 16), generator=g) * 2.0 ** -9
    ints = torch.randint(-127, 128, (rows, k), generator=g)
    ints[0::3], ints[1::3] = 127, -127  # every pair sum at its largest with bytes of 255
    ints[:, ::32] = 127  # each block's largest value: its activation scale is exactly 2^-7 (2^-6)
    x = ints * torch.tensor([2.0 ** -7] * 32 + [2.0 ** -6] * 32)
    bias = torch.randint(-2 ** 12, 2 ** 12, (n,), generator=g) * 2.0 ** -8 if with_bias else None
    return u.to(torch.uint8), d.float(), m.float(), x.float(), bias


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("weights", ["bytes 0..255", "bytes 0..63", "extremes"])
@pytest.mark.parametrize("rows", ROWS)
def test_sub_block_tiles_sum_exactly_where_float32_can(rows, weights, with_bias):
    u, d, m, x, bias = exact_case(weights, rows, with_bias)
    ref, magnitude = float64_reference(u, d, m, x, bias)
    assert float(magnitude.max()) < 2 ** 8  # with 2^-16 steps: every partial sum is a float32
    simd, portable = simd_and_portable(u, d, m, bias)
    expected = ref.float()
    assert torch.equal(expected.double(), ref)
    assert torch.equal(simd.forward(x), expected)
    assert torch.equal(portable.forward(x), expected)


@pytest.mark.parametrize("weights", ["bytes 0..255", "bytes 0..63"])
@pytest.mark.parametrize("rows", [1, 4, 13, 33])
def test_sub_block_tiles_match_float64_sums_within_float32_rounding(rows, weights):
    """Random scales and activations over 16 blocks (past the tiles' prefetch distance): each tile
    within float32 rounding of the float64 sums, a bound far below any integer sum gone wrong."""
    g = torch.Generator().manual_seed(rows)
    n, k = 64, 512
    u = torch.randint(0, 256 if weights == "bytes 0..255" else 64, (n, k), dtype=torch.uint8, generator=g)
    d, m = torch.rand(n, k // 16, generator=g) * 0.01, -torch.rand(n, k // 16, generator=g) * 0.3
    x, bias = torch.randn(rows, k, generator=g), torch.randn(n, generator=g)
    ref, magnitude = float64_reference(u, d, m, x, bias)
    # per output 4 terms a block, each product and partial sum rounded once or twice
    tolerance = (8 * (k // 32) + 4) * 2.0 ** -24 * magnitude
    simd, portable = simd_and_portable(u, d, m, bias)
    for layer in (simd, portable):
        assert ((layer.forward(x).double() - ref).abs() <= tolerance).all(), layer.kernel


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a * b + c rounded once to float32, as an FMA instruction. The product of two float32s is exact
    in float64; the sum's float64 rounding r changes the float32 result only where r lands on a
    float32 midpoint, and there the sign of the exact error (Knuth's TwoSum) picks the side."""
    product, c64 = a.double() * b.double(), c.double()
    r = product + c64
    t = r - product
    error = (product - (r - t)) + (c64 - t)  # product + c == r + error exactly
    f = r.float()  # to nearest, ties to even
    other = torch.nextafter(f, torch.where(r > f.double(), torch.inf, -torch.inf).float())  # r's other side
    at_midpoint = r == (f.double() + other.double()) / 2
    return torch.where(at_midpoint & ((other.double() - r) * error > 0), other, f)


@pytest.mark.parametrize("rows", [1, 5])
def test_the_simd_tile_rounds_as_the_vnni_tiles_float_steps(rows):
    """The AVX2 and VNNI tiles give the same bits: exact int32 half-block sums s0, s1, then per block
    acc = fma(s0, d0 * xs, acc), fma(s1, d1 * xs, acc), fma(m0, h0, acc), fma(m1, h1, acc) in float32,
    replayed here step by step."""
    g = torch.Generator().manual_seed(rows)
    n, k = 32, 512
    u = torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=g)
    u[:16] //= 4  # the first tile on the AVX2 tile's path for bytes below 64
    d, m = torch.rand(n, k // 16, generator=g) * 0.01, -torch.rand(n, k // 16, generator=g) * 0.3
    x, bias = torch.randn(rows, k, generator=g), torch.randn(n, generator=g)
    simd, _ = simd_and_portable(u, d, m, bias)
    if simd.kernel == "portable":
        pytest.skip("this build has no SIMD tiles")
    q, scale, half_sum = quantized_activations(x)
    sums = torch.einsum("rhj,nhj->rnh", q, u.double().reshape(n, -1, 16)).float()  # exact: |s| < 2^24
    acc = torch.zeros(rows, n)
    for first in range(0, k // 16, 2):  # a block's two halves
        for half in (first, first + 1):
            acc = fma32(sums[..., half], d[:, half] * scale[:, half, None], acc)
        for half in (first, first + 1):
            acc = fma32(m[:, half].expand(rows, n), half_sum[:, half, None].expand(rows, n), acc)
    assert torch.equal(simd.forward(x), acc + bias)


def test_the_sub_block_form_names_the_simd_tile_this_build_has():
    from leapllm.kernels import cpu_kernels

    ext = cpu_kernels()
    u, d, m, *_ = exact_case("bytes 0..255", 1, False)
    simd, portable = simd_and_portable(u, d, m)
    assert portable.kernel == "portable"
    assert simd.kernel == ("VNNI" if ext.vnni_compiled() else "AVX2" if ext.avx2_compiled() else "portable")


@torch.inference_mode()
def test_a_mixed_k_quant_projection_runs_on_the_simd_tile_as_on_the_portable_one():
    """Q4_K_M's mix fused into one int8 sub-block projection: Q4_K and Q6_K (bytes below 64) and a
    Q8_0 part (q + 128, up to 255)."""
    from leapllm.loading.weights import _quantized_projection

    parts = [GGUFTensor(name, qtype, (32, 256), random_blocks(qtype, 32, 256, seed=i), "synthetic.gguf")
             for i, (name, qtype) in enumerate([("q", Q.Q4_K), ("k", Q.Q6_K), ("v", Q.Q8_0)])]
    u, d, m = (torch.cat(p) for p in zip(*(t.sub_block_parts() for t in parts), strict=True))
    assert int(u[64:].max()) > 127 and int(u[:64].max()) < 64
    module = _quantized_projection(parts, "int8-16", None, torch.device("cpu"))
    simd, portable = simd_and_portable(u, d, m)
    assert module.packed_linear.kernel == simd.kernel
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(0))
    ref, magnitude = float64_reference(u, d, m, x)
    tolerance = (8 * (256 // 32) + 4) * 2.0 ** -24 * magnitude
    y = simd.forward(x)
    assert ((y.double() - ref).abs() <= tolerance).all()
    assert ((portable.forward(x).double() - ref).abs() <= tolerance).all()
    assert torch.equal(module(x), y)  # the loaded layer is this tile
    assert torch.equal(module(x[:1]), y[:1])  # and a decode step's one-row tile gives a row's same bits


@pytest.mark.parametrize("weights", ["bytes 0..255", "bytes 0..63", "extremes"])
def test_a_sub_block_layer_gives_each_row_the_bits_it_gets_alone(weights):
    """Several rows run the tile of many rows (direct bytes where the whole layer is below 64, else
    nibbles); one row runs the decode tile; a row's bits are the same either way."""
    u, d, m, x, bias = exact_case(weights, 33, True)
    simd, _ = simd_and_portable(u, d, m, bias)
    assert simd.small_bytes == (weights == "bytes 0..63")
    x = x * torch.rand(x.shape, generator=torch.Generator().manual_seed(0))  # scales no longer powers of two
    assert torch.equal(simd.forward(x), torch.cat([simd.forward(x[i:i + 1]) for i in range(33)]))
