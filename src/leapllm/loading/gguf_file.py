"""Opening a GGUF file and turning its metadata into plain Python values.

The `gguf` package (llama.cpp's own reader) does the parsing and memory-maps the tensor data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gguf import GGUFReader

from leapllm.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"


def open_gguf(path: str | Path) -> tuple[GGUFReader, dict[str, Any]]:
    """Memory-map a GGUF file; return the reader and its metadata as {key: str|int|float|bool|list}."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path}: not a GGUF file (bad magic {magic!r})")
    try:
        reader = GGUFReader(path, "r")
    except Exception as exc:  # the gguf package raises ValueError/IndexError/struct errors on damage
        raise ModelLoadError(f"{path}: truncated or corrupt GGUF file ({type(exc).__name__}: {exc})") from None
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            metadata[key] = field.contents()
        except Exception as exc:
            raise ModelLoadError(f"{path}: corrupt metadata field {key!r} ({exc})") from None
    return reader, metadata
