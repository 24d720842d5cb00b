"""Opening a GGUF file: its metadata as plain Python values, and memory-mapped views of its tensors.

The format (llama.cpp's gguf/README): a header, key-value metadata, tensor descriptions, then the
aligned tensor data. The type codes and block sizes come from the `gguf` package, but not its
reader: GGUFReader builds a numpy view for every element of every array, which took 2.2 s and
120 MB on the default model's 49k-token vocabulary; read here with struct, the header takes a
tenth of a second. Every count and offset is checked against the file's size, so a damaged file
is a ModelLoadError, never a crash or a huge allocation.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from leapllm.errors import ModelLoadError
from leapllm.kernels import cpu_kernels

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

_SCALARS = {  # value type -> struct format (little-endian)
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_ARRAY_DTYPES = {  # numeric array element type -> numpy dtype, read in one go
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4", GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}


@dataclass
class GGUFTensorInfo:
    """One tensor's description and its bytes, as a read-only view of the memory-mapped file."""

    name: str
    tensor_type: int  # a GGMLQuantizationType value
    shape: tuple[int, ...]  # GGUF's order: fastest-varying dimension first
    data_offset: int  # from the start of the file
    n_elements: int
    n_bytes: int
    data: np.ndarray  # F32 / F16: the values, shape reversed (PyTorch's order); else uint8 (rows, bytes per row)
    file_map: np.memmap | None = None  # the whole file, mapped read-only

    def release_pages(self) -> None:
        """Drop this tensor's pages of the map from the process's memory once it has been read: the
        file's bytes need not stay resident beside the weights built from them. A later read pages
        them in again from the page cache, so a page shared with the next tensor is safe to drop."""
        if self.file_map is None or self.n_bytes == 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = self.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
        self.file_map._mmap.madvise(mmap.MADV_DONTNEED, start, self.data_offset + self.n_bytes - start)


@dataclass
class GGUFContents:
    tensors: list[GGUFTensorInfo]


_U64 = struct.Struct("<Q")


class _Cursor:
    """Reads little-endian values from a buffer, refusing to run past its end."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ModelLoadError(f"{self.path}: truncated or corrupt GGUF file (a field runs past the end at byte {self.pos})")

    def scalar(self, fmt: str):
        n = struct.calcsize(fmt)
        self.need(n)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        self.need(n)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelLoadError(f"{self.path}: corrupt GGUF file (a string that is not UTF-8 at byte {self.pos - n})") from None

    def strings(self, count: int) -> list[str]:
        """count strings in a row (a vocabulary's tokens or merges): read in C++ where leapllm's
        kernels build (most of a header's time in Python), else string() unrolled."""
        ext = cpu_kernels()
        if ext is None:
            return self._strings_in_python(count)
        try:
            out, self.pos = ext.read_gguf_strings(self.buf, self.pos, count)
        except ValueError as e:  # the extension's message says what and where
            raise ModelLoadError(f"{self.path}: {e}") from None
        return out

    def _strings_in_python(self, count: int) -> list[str]:
        buf, pos, size = self.buf, self.pos, self.size
        length = _U64.unpack_from
        out = []
        try:
            for _ in range(count):
                if pos + 8 > size:
                    break
                (n,) = length(buf, pos)
                if pos + 8 + n > size:
                    break
                out.append(buf[pos + 8:pos + 8 + n].decode("utf-8"))
                pos += 8 + n
        except UnicodeDecodeError:
            raise ModelLoadError(
                f"{self.path}: corrupt GGUF file (a string that is not UTF-8 at byte {pos + 8})") from None
        self.pos = pos
        if len(out) < count:
            self.string()  # the string that runs past the end: string() says where
        return out

    def value(self, vtype: int, depth: int = 0) -> Any:
        try:
            vtype = GGUFValueType(vtype)
        except ValueError:
            raise ModelLoadError(f"{self.path}: corrupt GGUF file (unknown value type {vtype})") from None
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype != GGUFValueType.ARRAY:
            return self.scalar(_SCALARS[vtype])
        if depth > 2:
            raise ModelLoadError(f"{self.path}: corrupt GGUF file (arrays nested too deep)")
        etype, count = self.scalar("<I"), self.scalar("<Q")
        if etype in _ARRAY_DTYPES:
            dtype = np.dtype(_ARRAY_DTYPES[etype])
            self.need(count * dtype.itemsize)
            values = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
            self.pos += count * dtype.itemsize
            return values
        self.need(count * 8)  # every remaining element takes at least 8 bytes (a string's length)
        if etype == GGUFValueType.STRING:
            return self.strings(count)
        return [self.value(etype, depth + 1) for _ in range(count)]


def _tensor_view(file_map: np.ndarray, info: tuple, start: int, path: Path) -> GGUFTensorInfo:
    name, dims, ttype, offset = info
    try:
        qtype = GGMLQuantizationType(ttype)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise ModelLoadError(f"{path}: tensor {name!r} has an unknown type {ttype}") from None
    n_elements = math.prod(dims)  # Python integers: a damaged dimension must not wrap around
    if any(d <= 0 for d in dims) or dims[0] % block:
        raise ModelLoadError(f"{path}: corrupt GGUF file (tensor {name!r} has shape {dims})")
    n_bytes = n_elements // block * type_size
    begin = start + offset
    if begin + n_bytes > file_map.shape[0]:
        raise ModelLoadError(f"{path}: truncated file: tensor {name!r} runs past the end of the file")
    raw = file_map[begin:begin + n_bytes]
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        data = raw.view(np.float32 if qtype == GGMLQuantizationType.F32 else np.float16).reshape(tuple(reversed(dims)))
    else:
        rows = n_elements // dims[0]
        data = raw.reshape(rows, n_bytes // rows)
    return GGUFTensorInfo(name, int(qtype), tuple(dims), begin, n_elements, n_bytes, data, file_map)


def open_gguf(path: str | Path) -> tuple[GGUFContents, dict[str, Any]]:
    """Memory-map a GGUF file; return its tensors (views into the map) and its metadata as
    {key: str|int|float|bool|list}."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ModelLoadError(f"{path}: not a GGUF file (bad magic {magic!r})")
        header = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        cur = _Cursor(header, path)
        cur.pos = 4
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise ModelLoadError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        cur.need(min(n_kv, 2**40) * 12)  # a key-value pair takes at least 12 bytes
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.scalar("<I"))
        cur.need(min(n_tensors, 2**40) * 24)  # a tensor description takes at least 24 bytes
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            if n_dims > 4:
                raise ModelLoadError(f"{path}: corrupt GGUF file (tensor {name!r} has {n_dims} dimensions)")
            dims = [cur.scalar("<Q") for _ in range(n_dims)]
            infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ModelLoadError(f"{path}: corrupt GGUF file (alignment {alignment!r})")
        start = -(-cur.pos // alignment) * alignment
    finally:
        header.close()
    file_map = np.memmap(path, dtype=np.uint8, mode="r") if n_tensors else np.zeros(0, np.uint8)
    tensors = [_tensor_view(file_map, info, start, path) for info in infos]
    check_tensor_layout(tensors, alignment, start, path)
    return GGUFContents(tensors), metadata


def check_tensor_layout(tensors: list[GGUFTensorInfo], alignment: int, start: int, path: Path) -> None:
    """Each tensor at an aligned offset of the data section, none overlapping another: a damaged
    offset would otherwise read another tensor's bytes as weights."""
    end, previous = start, None
    for t in sorted(tensors, key=lambda t: t.data_offset):
        if (t.data_offset - start) % alignment:
            raise ModelLoadError(f"{path}: corrupt GGUF file (tensor {t.name!r} at an unaligned offset)")
        if t.data_offset < end:
            raise ModelLoadError(f"{path}: corrupt GGUF file (tensors {previous!r} and {t.name!r} overlap)")
        end, previous = t.data_offset + t.n_bytes, t.name
