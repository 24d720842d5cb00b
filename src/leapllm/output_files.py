"""Output files of reports (profile, bench): checked before a long run, written atomically after it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from leapllm.errors import InvalidRequestError


def check_writable(path: str | Path, what: str = "output") -> Path:
    """Fail now, not after the profile, when `path` cannot be written (raises InvalidRequestError)."""
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise InvalidRequestError(f"{what} path {str(path)!r} is a folder")
    if not folder.is_dir():
        raise InvalidRequestError(f"cannot write {what} {str(path)!r}: folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InvalidRequestError(f"cannot write {what} {str(path)!r}: permission denied")
    return path


def atomic_write(path: str | Path, content: str | bytes) -> None:
    """Write to a temporary file in the same folder, then rename it over `path`: readers never see a
    half-written file. OS errors become InvalidRequestError."""
    path = Path(path)
    data = content.encode("utf-8") if isinstance(content, str) else content
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise InvalidRequestError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
