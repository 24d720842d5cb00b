"""Quality yardsticks for loaded models: sliding-window perplexity, and agreement with a reference.

    from leapllm import LLM
    from leapllm.evaluation import load_text
    from leapllm.evaluation.agreement import agreement
    from leapllm.evaluation.perplexity import perplexity

    llm = LLM()
    ids = llm.tokenizer.encode(load_text("builtin:python-docs-heldout"))
    perplexity(llm.model, ids, ctx=512).perplexity
    agreement(LLM(dtype="bfloat16").model, llm.model, ids, ctx=512).agreement

The command line is `leapllm eval perplexity` / `leapllm eval agree`. The package itself holds only
the texts, so that the command line builds its parser without importing PyTorch.
"""

from leapllm.evaluation.texts import BUILTIN_TEXTS, builtin_text, load_text

__all__ = ["BUILTIN_TEXTS", "builtin_text", "load_text"]
