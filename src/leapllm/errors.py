"""Errors a user can cause and fix: bad paths, corrupt files, bad sampling settings.

Everything user-facing raises a subclass of `LeapLLMError`; the CLI prints its message on one
line and exits with code 2, and the server turns it into an OpenAI-style 4xx. Anything else that
escapes is a bug in leapllm.
"""


class LeapLLMError(Exception):
    """Base class of all errors caused by input the user can correct."""


class ModelLoadError(LeapLLMError):
    """The model path, file format, architecture or weights are not usable."""


class TokenizerError(LeapLLMError):
    """The tokenizer description is missing or malformed, or a chat template failed."""


class InvalidRequestError(LeapLLMError):
    """A generation request is malformed: bad sampling values, prompt too long, ..."""
