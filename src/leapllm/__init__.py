"""leapllm: a fast, readable LLM inference engine in PyTorch.

`LLM`, `SamplingParams` and `GenerationOutput` are imported when first used, so that the command
line parses its flags (and refuses bad ones) before PyTorch is imported."""

import importlib as _importlib
from typing import TYPE_CHECKING

from leapllm.errors import InvalidRequestError, LeapLLMError, ModelLoadError, TokenizerError

if TYPE_CHECKING:  # what type checkers see; at run time, __getattr__ below imports them
    from leapllm.engine.sampling import SamplingParams
    from leapllm.llm import LLM, GenerationOutput

__version__ = "0.1.0"
__all__ = [
    "LLM", "SamplingParams", "GenerationOutput",
    "LeapLLMError", "ModelLoadError", "TokenizerError", "InvalidRequestError",
]
_LAZY = {"LLM": "leapllm.llm", "GenerationOutput": "leapllm.llm", "SamplingParams": "leapllm.engine.sampling"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'leapllm' has no attribute {name!r}")
    value = getattr(_importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*(n for n in globals() if not n.startswith("_")), *_LAZY, "__version__"})
