"""The layering contract of docs/architecture.md, as pyproject.toml's [tool.importlinter] states it:
cli -> serving -> llm -> engine -> loading -> model -> kernels, offline tools (compression,
profiling, benchmarking, evaluation) above the runtime and never imported by it, and no import
cycle between sibling modules or packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lint_imports() -> str:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is not installed (pip install -e '.[test]' installs import-linter)")
    return exe


def test_import_contracts_hold():
    result = subprocess.run([lint_imports(), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_contracts_cover_every_runtime_and_tool_package():
    """A new top-level package must be placed in a layer (or named a tool) to be checked at all."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    named = set()
    for contract in contracts:
        for layer in contract.get("layers", []):
            named |= {m.strip() for m in layer.split("|")}
        named |= set(contract.get("forbidden_modules", []))
    packages = {f"leapllm.{p.name}" for p in (ROOT / "src" / "leapllm").iterdir()
                if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= named, f"not in any contract: {sorted(packages - named)}"
