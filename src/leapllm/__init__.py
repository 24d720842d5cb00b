"""leapllm: a fast, readable LLM inference engine in PyTorch."""

from leapllm.engine.sampling import SamplingParams
from leapllm.errors import InvalidRequestError, LeapLLMError, ModelLoadError, TokenizerError
from leapllm.llm import LLM, GenerationOutput

__version__ = "0.1.0"
__all__ = [
    "LLM", "SamplingParams", "GenerationOutput",
    "LeapLLMError", "ModelLoadError", "TokenizerError", "InvalidRequestError",
]
