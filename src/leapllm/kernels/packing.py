"""Weights into the layout of the C++ kernels (cpu/), and the PackedLinear objects that run them.

Output rows go in tiles of 16 and input features in blocks of 32; within a (tile, block), each
64-byte vector holds 4 consecutive input features ("a quad") of all 16 rows, row-major by row
(byte 4 * row + j is feature 4 * quad + j). A VNNI instruction then adds each row's 4 products to its
own int32 lane (see cpu/common.h).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc

import torch

from leapllm.kernels import cpu_kernels

TILE, BLOCK = 16, 32


def tile_quads(x: torch.Tensor) -> torch.Tensor:
    """(N, K) -> (N/16, K/32, 8, 64): per (tile, block), per quad, the 16 rows' 4 values."""
    n, k = x.shape
    return x.reshape(n // TILE, TILE, k // BLOCK, 8, 4).permute(0, 2, 3, 1, 4).reshape(n // TILE, k // BLOCK, 8, 64)


def untile_quads(x: torch.Tensor) -> torch.Tensor:
    """The inverse of tile_quads: (N/16, K/32, 8, 64) -> (N, K)."""
    tiles, blocks = x.shape[:2]
    return x.reshape(tiles, blocks, 8, TILE, 4).permute(0, 3, 1, 2, 4).reshape(tiles * TILE, blocks * BLOCK)


def per_row_blocks(values: torch.Tensor) -> torch.Tensor:
    """(N, K/32) per-block values -> the same values ordered (tile, block, row) as the kernels read them."""
    n, blocks = values.shape
    return values.reshape(n // TILE, TILE, blocks).transpose(1, 2).reshape(n, blocks)


def per_row_blocks_inverse(values: torch.Tensor) -> torch.Tensor:
    n, blocks = values.shape
    return values.reshape(n // TILE, blocks, TILE).transpose(1, 2).reshape(n, blocks)


def blocks_of_32(per_group: torch.Tensor, in_features: int) -> torch.Tensor:
    """(N, K/group) per-group values -> (N, K/32), each repeated over the 32-blocks of its group."""
    return per_group.repeat_interleave(in_features // BLOCK // per_group.shape[1], dim=1)


def pack_int4(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, scale_dtype: torch.dtype = torch.float16
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (N, K) uint8 in [0, 15], scale and minimum (N, K/group), w = q * scale + minimum
    -> (weight (N, K/2) uint8, scales (N, K/32), minimums (N, K/32)), in the kernels' order; scales
    and minimums in float16, or float32 where float16 cannot hold them (GGUF's Q4_K)."""
    n, k = q.shape
    quads = tile_quads(q.to(torch.uint8))  # (tiles, blocks, 8, 64)
    weight = (quads[:, :, :4] | (quads[:, :, 4:] << 4)).reshape(n, k // 2)  # quad c low, quad c + 4 high
    scales = per_row_blocks(blocks_of_32(scale.float(), k)).to(scale_dtype)
    mins = per_row_blocks(blocks_of_32(minimum.float(), k)).to(scale_dtype)
    return weight.contiguous(), scales.contiguous(), mins.contiguous()


def unpack_int4(weight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """The float32 weight (N, K) that pack_int4's output stands for."""
    n, k = weight.shape[0], weight.shape[1] * 2
    packed = weight.reshape(n // TILE, k // BLOCK, 4, 64)
    q = untile_quads(torch.cat([packed & 15, packed >> 4], dim=2)).float()
    d = per_row_blocks_inverse(scales.float()).repeat_interleave(BLOCK, dim=1)
    m = per_row_blocks_inverse(mins.float()).repeat_interleave(BLOCK, dim=1)
    return q * d + m


def pack_int8(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (N, K) int8 and scale (N,), w = q * scale -> (weight (N, K) uint8 = q + 128 in the kernels' order,
    scales (N,) float32)."""
    n, k = q.shape
    tiled = tile_quads(q.to(torch.int8).view(torch.uint8)).reshape(n, k).contiguous()  # a copy: ours to change
    tiled ^= 128  # flipping the sign bit adds 128 to two's complement
    return tiled, scale.float().contiguous()


def pack_int8_blocks(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (N, K) int8 and scale (N, K/32) float16, w = q * scale per block of 32 (GGUF's Q8_0)
    -> (weight (N, K) uint8 = q + 128, scales (N, K/32) float16), in the kernels' order."""
    n, k = q.shape
    weight, _ = pack_int8(q, torch.ones(n))
    return weight, per_row_blocks(scale.to(torch.float16)).contiguous()


def pack_int8_sub_blocks(values: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """values (N, K) uint8, scale and minimum (N, K/16) float32, w = values * scale + minimum per 16
    features (GGUF's K-quants) -> (weight (N, K) uint8, scales, minimums (N, K/16) float32), in the
    kernels' order: (tile, half block, row)."""
    return (tile_quads(values.to(torch.uint8)).reshape(values.shape).contiguous(),
            per_row_blocks(scale.float()).contiguous(), per_row_blocks(minimum.float()).contiguous())


def pack_super_blocks(values: torch.Tensor, high_bits: int, *factors: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor | None]]:
    """K-quant values u (N, K) uint8 below 2 ** (4 + high_bits) and their per-row factors (sub-block
    scales and minimums, super-block scales and minimums: (N, columns) each, or None) -> (low nibbles
    (N, K/2) in the int4 layout, high bits (N, K * high_bits / 8) or None, the factors as (tile,
    column, row)): the layout of cpu/super_blocks.h."""
    n, k = values.shape
    quads = tile_quads(values.to(torch.uint8))  # (tiles, blocks, 8, 64)
    low = quads & 15
    weight = (low[:, :, :4] | (low[:, :, 4:] << 4)).reshape(n, k // 2).contiguous()
    top = quads >> 4
    high = None
    if high_bits == 1:  # bit c of byte i: quad c's fifth bit
        high = sum(top[:, :, c] << c for c in range(8)).reshape(n, k // 8).contiguous()
    elif high_bits == 2:  # vector p, bits 2j, 2j + 1 of byte i: quad 4p + j's two high bits
        high = torch.stack([sum(top[:, :, 4 * p + j] << (2 * j) for j in range(4)) for p in range(2)], dim=2)
        high = high.reshape(n, k // 4).contiguous()
    return weight, high, [None if f is None else per_row_blocks(f).contiguous() for f in factors]


# The packed forms cpu/gguf_blocks.h builds straight from a GGUF file's block rows.
STORED_ROW_FORMS = ("int4", "int8", "int5", "super-blocks")


def packed_outputs(form: str, n: int, k: int, group: int = 32, high_bits: int = 0, with_mins: bool = True,
                   block=None) -> list[torch.Tensor | None]:
    """Empty tensors for an (n, k) weight in one of STORED_ROW_FORMS: (weight, high bits, scales,
    minimums, super-block scales, super-block minimums), None where the form has no such part;
    shapes and dtypes of pack_int4 / pack_int8_blocks / pack_super_blocks's outputs. In `block` (a
    HugePageBlock, packed_weights_block's) where they fit, else in the heap."""
    def e(cols: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        nbytes = n * cols * dtype.itemsize
        if block is not None and block.used + block.aligned(nbytes) <= block.capacity:
            return block.empty((n, cols), dtype)
        return torch.empty(n, cols, dtype=dtype)
    if form == "int4":
        return [e(k // 2), None, e(k // BLOCK, torch.float16), e(k // BLOCK, torch.float16), None, None]
    if form == "int8":
        return [e(k), None, e(k // BLOCK, torch.float16), None, None, None]
    if form == "int5":
        return [e(k // 2), e(k // 8), e(k // BLOCK, torch.float16), None, None, None]
    if form == "super-blocks":
        sub = torch.int8
        return [e(k // 2), e(k * high_bits // 8) if high_bits else None, e(k // group, sub),
                e(k // group, sub) if with_mins else None, e(k // 256, torch.float32), e(k // 256, torch.float32)]
    raise ValueError(f"no packed form {form!r} is built from stored rows")


# The most a stored-row form takes over its file's bytes: Q2_K (2.625 bits a weight) in the
# super-block form of a projection fused with Q6_K parts (4 + 2 bits, int8 factors per 16 and
# float32 ones per 256: 7.25 bits).
MAX_PACKED_EXPANSION = 3


def packed_weights_block(stored_bytes: int, tensors: int):
    """A HugePageBlock for a load to pack its weights into, in the order a decode step reads them,
    so that the first step has nothing to move (move_to_huge_pages): room for `tensors` stored
    tensors of stored_bytes in all, in any stored-row form. Only address space until written;
    release_unused() gives back what the load did not use. None where the reservation is refused
    (a system that commits address space strictly): the weights then go to the heap, as elsewhere."""
    ext = cpu_kernels()
    alignment = ext.HugePageBlock.aligned(1)  # the most a tensor's start is rounded up by
    try:
        return ext.HugePageBlock(MAX_PACKED_EXPANSION * stored_bytes + tensors * len(PACKED_BUFFERS) * alignment)
    except RuntimeError:  # out of memory: mmap and the aligned allocation both refused
        return None


def pack_stored_rows(outputs: list[torch.Tensor | None], data, rows: torch.Tensor, row0: int, ggml_type: int,
                     form: str, group: int = 32, high_bits: int = 0) -> None:
    """Packs stored GGUF block rows data[rows] (data: (rows, bytes) uint8, e.g. a memory-mapped view)
    into rows row0 .. row0 + len(rows) of packed_outputs' tensors, in C++ (cpu/gguf_blocks.h)."""
    k = outputs[0].shape[1] * (1 if form == "int8" else 2)
    cpu_kernels().pack_gguf_rows(data, rows, row0, int(ggml_type), k, form, outputs, group, high_bits)


def kernels_can_run(in_features: int, out_features: int, device: torch.device | str) -> bool:
    """Whether a linear layer of this shape on this device can use the packed kernels."""
    return (torch.device(device).type == "cpu" and in_features % BLOCK == 0 and out_features % TILE == 0
            and cpu_kernels() is not None)


def packed_linear(weight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, bias: torch.Tensor | None,
                  bits: int, simd: bool = True):
    """The C++ PackedLinear over packed tensors (which it keeps references to); mins only for int4."""
    return cpu_kernels().PackedLinear(weight, scales, mins, None if bias is None else bias.float(), bits, simd)


PACKED_BUFFERS = ("packed_weight", "packed_high", "packed_scales", "packed_mins", "packed_super_scales",
                  "packed_super_mins")


def five_bit_linear(layer, simd: bool = True):
    """The C++ PackedLinear over an Int5BlockLinear's packed buffers (which it keeps references to)."""
    return cpu_kernels().PackedLinear.from_five_bit_blocks(layer.packed_weight, layer.packed_high, layer.packed_scales,
                                                           layer.bias, simd)


def super_block_linear(layer, simd: bool = True):
    """The C++ PackedLinear over a SuperBlockLinear's packed buffers (which it keeps references to)."""
    return cpu_kernels().PackedLinear.from_super_blocks(
        layer.packed_weight, layer.packed_high, layer.packed_scales, layer.packed_mins, layer.packed_super_scales,
        layer.packed_super_mins, layer.bias, layer.high_bits, layer.group, simd)


def attach_packed(layer, weight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                  bias: torch.Tensor | None, bits: int) -> None:
    """Give a quantized nn.Module its packed buffers (PACKED_BUFFERS and a float32 bias) and the
    PackedLinear that runs on them."""
    layer.register_buffer("packed_weight", weight)
    layer.register_buffer("packed_scales", scales)
    layer.register_buffer("packed_mins", mins)
    layer.register_buffer("bias", None if bias is None else bias.detach().float())
    layer.packed_linear = packed_linear(weight, scales, mins, layer.bias, bits=bits)


def move_to_huge_pages(layers: list) -> None:
    """Move the packed weights of these layers (Int4Linear / Int8Linear / Int5BlockLinear / SuperBlockLinear on the
    kernels) into one block of memory on 2 MiB pages, in the order given, and rebuild their PackedLinear.

    A batch-1 decode step streams every weight once; on 4 KiB pages each stream needs a page walk
    every 4 KiB (HugePageBlock in cpu/huge_pages.h). Give the layers in the order a step reads them.
    Layer by layer, the copies replace the modules' buffers and the old memory goes back to the OS,
    so the move never holds two copies of the model. Layers already in a block (packed there at
    load, or moved before) stay where they are.
    """
    ext = cpu_kernels()
    buffers = [(layer, [n for n in PACKED_BUFFERS if getattr(layer, n, None) is not None]) for layer in layers]
    buffers = [(layer, ns) for layer, ns in buffers if not all(ext.HugePageBlock.holds(getattr(layer, n)) for n in ns)]
    if not buffers:
        return
    aligned = ext.HugePageBlock.aligned
    block = ext.HugePageBlock(sum(aligned(getattr(layer, n).nbytes) for layer, ns in buffers for n in ns))
    moved = 0  # bytes whose old copies are freed but may still sit in the heap
    for layer, ns in buffers:
        size = sum(getattr(layer, n).nbytes for n in ns)
        if moved and moved + size > RELEASE_EVERY_BYTES:
            # Give back what waits before a layer that would push it past the budget (an output head is
            # tens of MiB): the peak is then at most the budget or one layer's copy above the model.
            release_freed_heap(collect=False)
            moved = 0
        for n in ns:
            setattr(layer, n, block.copy(getattr(layer, n)))
            moved += getattr(layer, n).nbytes
        old = layer.packed_linear
        mins = getattr(layer, "packed_mins", None)
        if old.super_blocks:
            layer.packed_linear = super_block_linear(layer, old.simd)
        elif old.five_bit:
            layer.packed_linear = five_bit_linear(layer, old.simd)
        else:
            layer.packed_linear = packed_linear(layer.packed_weight, layer.packed_scales, mins, layer.bias,
                                                bits=old.bits, simd=old.simd)
        del old  # (reference counting frees the old copies; no cycles to look for)
    release_freed_heap(collect=False)


RELEASE_EVERY_BYTES = 16 << 20  # how much moved weight may wait in the heap before it is handed back


# glibc's mallopt parameter, and the values it is set to around a load (see separate_large_blocks).
M_MMAP_THRESHOLD = -3
LOAD_MMAP_THRESHOLD, RUN_MMAP_THRESHOLD = 1 << 20, 32 << 20


@contextlib.contextmanager
def separate_large_blocks():
    """Within: every allocation of 1 MiB or more is its own memory map, given back to the OS when freed.

    A load decodes and packs tensor after tensor: the packed results it keeps and the temporaries it
    frees (each a few MiB) would otherwise share glibc's heap, where freed blocks between kept ones
    cannot go back to the OS, and the peak would hold hundreds of MiB of them. After, large blocks
    come from the heap up to 32 MiB (glibc's own ceiling for its adaptive threshold), so that a
    decode step's buffers are reused rather than mapped and faulted in at every step."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        yield
        return
    mallopt(M_MMAP_THRESHOLD, LOAD_MMAP_THRESHOLD)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, RUN_MMAP_THRESHOLD)


def release_freed_heap(collect: bool = True) -> None:
    """Hand freed heap memory back to the OS: glibc keeps freed blocks below its mmap threshold (up
    to 32 MiB) for reuse, so freed weights and repacking temporaries would stay resident. collect:
    first free what only reference cycles hold (a full garbage collection)."""
    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# On CPUs with AMX, whose tile unit multiplies bfloat16 matrices several times faster than the int8
# vector instructions, a GEMM on weights dequantized for the call beats the int8 dot-product tiles
# beyond this many activation rows (decode steps of up to 32 sequences stay on the tiles).
DOT_KERNEL_MAX_ROWS = 32
# Elsewhere the tiles of several rows win at every row count for every packed form, AVX-512 BF16
# without AMX included (benchmarks/README.md, "Many rows"), so a prefill gets exactly the bits of
# one-token steps.


@functools.cache
def gemm_dtype() -> torch.dtype:
    """The dtype of a GEMM on dequantized weights: bfloat16 where the CPU multiplies it natively
    (AVX-512 BF16, AMX: twice the float32 rate and half the bytes), float32 elsewhere, where oneDNN
    emulates bfloat16 several times slower than float32."""
    return torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else torch.float32


@functools.cache
def gemm_beats_tiles() -> bool:
    """Whether many activation rows run faster on that GEMM than on the int8 tiles: on AMX CPUs."""
    return gemm_dtype() == torch.bfloat16 and torch.cpu._is_amx_tile_supported()


def tile_row_limit(linear) -> int | None:
    """The most activation rows a PackedLinear runs on the int8 tiles (None: any number); beyond, a
    GEMM on its weights dequantized for the call."""
    if gemm_beats_tiles() or linear.kernel == "portable":  # (scalar loops lose to any GEMM)
        return DOT_KERNEL_MAX_ROWS
    return None


def many_rows_kernel() -> str:
    """What a matmul of many activation rows (a prefill) runs on, for `leapllm info` and the profiler."""
    if gemm_beats_tiles() or cpu_kernels() is None or not (
            cpu_kernels().avx2_compiled() or cpu_kernels().vnni_compiled()):
        return (f"the int8-activation tiles up to {DOT_KERNEL_MAX_ROWS} rows; beyond, a bfloat16 GEMM on weights "
                "dequantized for the call")
    return "the int8-activation tiles at every row count (the bits of one-token steps)"


def packed_forward(linear, x: torch.Tensor) -> torch.Tensor:
    """y = x W^T (+ bias) for a C++ PackedLinear, choosing the kernel by the number of rows."""
    rows = x.numel() // x.shape[-1]
    limit = tile_row_limit(linear)
    if limit is None or rows <= limit:
        return linear.forward(x.float()).to(x.dtype)
    dtype = gemm_dtype()
    y = torch.nn.functional.linear(x.to(dtype), linear.dequantize(dtype))
    if linear.bias is not None:
        y = y.float() + linear.bias
    return y.to(x.dtype)
