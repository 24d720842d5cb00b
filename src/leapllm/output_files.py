"""Output files and folders (reports, models, classifiers): checked before a long run, written atomically after it."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
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


def write_folder_atomically(out: Path, write_files: Callable[[Path], None]) -> None:
    """Call write_files(temp_folder) on a fresh folder next to `out`, then rename it to `out`.
    On any failure the temp folder is removed and a previous `out` stays as it was."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as exc:
        raise InvalidRequestError(f"cannot write output folder {str(out)!r}: {exc.strerror or exc}") from None
    old = None
    try:
        write_files(staging)
        os.chmod(staging, 0o755)  # mkdtemp (and safetensors, for its file) make them private
        for file in staging.iterdir():
            os.chmod(file, 0o644)
        if out.is_dir() and any(out.iterdir()):
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)  # a non-empty folder cannot be renamed over; move it aside first
        try:
            os.rename(staging, out)  # replaces an empty folder
        except BaseException:
            if old is not None:
                os.rename(old, out)
                old = None
            raise
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise InvalidRequestError(f"cannot write output folder {str(out)!r}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
