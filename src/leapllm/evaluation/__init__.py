"""Quality yardsticks for loaded models: sliding-window perplexity, and agreement with a reference.

    from leapllm import LLM
    from leapllm.evaluation import agreement, load_text, perplexity

    llm = LLM()
    ids = llm.tokenizer.encode(load_text("builtin:python-docs-heldout"))
    perplexity(llm.model, ids, ctx=512).perplexity
    agreement(LLM(dtype="bfloat16").model, llm.model, ids, ctx=512).agreement

The command line is `leapllm eval perplexity` / `leapllm eval agree`.
"""

from leapllm.evaluation.agreement import AgreementResult, agreement
from leapllm.evaluation.perplexity import (
    PerplexityResult,
    Window,
    perplexity,
    sliding_windows,
)
from leapllm.evaluation.texts import BUILTIN_TEXTS, builtin_text, load_text

__all__ = ["BUILTIN_TEXTS", "AgreementResult", "PerplexityResult", "Window", "agreement", "builtin_text",
           "load_text", "perplexity", "sliding_windows"]
