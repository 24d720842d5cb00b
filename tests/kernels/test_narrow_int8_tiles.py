"""int8 blocks whose stored bytes lie in [112, 175] (GGUF's Q5_0 as int8, small Q8_0 blocks): the
AVX2 tiles multiply u - 112 directly and add 112 x sum(x) back, instead of splitting every byte into
nibbles. Either way the integer sums are exact, so with power-of-two scales every float step is
exact too, and each tile must give the float64 result bit for bit."""

from __future__ import annotations

import pytest
import torch

from leapllm.kernels.packing import pack_int8_blocks, packed_linear

pytestmark = pytest.mark.usefixtures("built_kernels")  # skips, or fails if a compiler is there (conftest.py)


def exact_case(values: str, rows: int):
    g = torch.Generator().manual_seed(rows)
    n, k = 48, 96
    q = torch.randint(-16, 16, (n, k), generator=g)  # Q5_0's range: narrow
    if values == "edges":  # the narrow range's ends, and one block of each tile past them
        q[:, 0::2], q[:, 1::2] = -16, 47
        q[::16, 64:] = 48
    elif values == "full":
        q = torch.randint(-128, 128, (n, k), generator=g)
    d = (2.0 ** -torch.randint(8, 10, (n, k // 32), generator=g)).half()
    ints = torch.randint(-127, 128, (rows, k), generator=g)
    ints[:, ::32] = 127  # each block's largest value: its activation scale is exactly 2^-7
    x = (ints * 2.0 ** -7).float()
    reference = torch.einsum("rbj,nbj,nb->rn", ints.double().reshape(rows, -1, 32),
                             q.double().reshape(n, -1, 32), d.double()) * 2.0 ** -7
    return q.to(torch.int8), d, x, reference


@pytest.mark.parametrize("rows", [1, 3, 5, 8, 33])
@pytest.mark.parametrize("values", ["narrow", "edges", "full"])
def test_int8_block_tiles_give_the_exact_result_on_narrow_and_full_byte_blocks(values, rows):
    q, d, x, reference = exact_case(values, rows)
    packed = pack_int8_blocks(q, d)
    simd, portable = packed_linear(*packed, None, None, bits=8), packed_linear(*packed, None, None, bits=8, simd=False)
    assert simd.block_scales
    assert torch.equal(simd.forward(x).double(), reference)
    assert torch.equal(portable.forward(x).double(), reference)


def test_a_narrow_layer_gives_each_row_the_bits_it_gets_alone():
    q, d, x, _ = exact_case("narrow", 33)
    layer = packed_linear(*pack_int8_blocks(q, d), None, None, bits=8)
    assert layer.narrow_bytes and not layer.small_bytes
    x = x * torch.rand(x.shape, generator=torch.Generator().manual_seed(0))  # scales no longer powers of two
    assert torch.equal(layer.forward(x), torch.cat([layer.forward(x[i:i + 1]) for i in range(33)]))
