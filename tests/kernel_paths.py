"""Code with a C++ path on leapllm's kernels and a Python one where they do not build: run either."""

from __future__ import annotations

import pytest

PATHS = ["C++", "Python"]


def take_path(path: str, module, monkeypatch) -> str:
    """Make `module` (which calls cpu_kernels()) take `path`: "C++" (skipped where the kernels do not
    build) or "Python" (the kernels hidden from it)."""
    from leapllm.kernels import cpu_kernels

    if path == "C++" and cpu_kernels() is None:
        pytest.skip("leapllm's CPU kernels do not build here")
    if path == "Python":
        monkeypatch.setattr(module, "cpu_kernels", lambda: None)
    return path
