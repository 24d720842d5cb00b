"""llama.cpp's perplexity on the text and windows of `leapllm bench compression`, for the quality-matched table.

    .venv/bin/python benchmarks/llamacpp_perplexity.py [MODEL.gguf] [--eval-tokens 6000] [--threads 2]

The same token ids (leapllm's tokenizer on `builtin:python-docs-heldout`, the first 6,000 tokens),
the same sliding windows (512 tokens, stride 256) and the same scoring code
(leapllm.evaluation.perplexity) as every leapllm row of that table; only the logits come from
llama.cpp (llama-cpp-python, `logits_all=True`), computing on the file's own quantized blocks.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from leapllm.benchmarking.compression_table import EVAL_TEXT
from leapllm.evaluation.perplexity import perplexity
from leapllm.evaluation.texts import load_text
from leapllm.loading.default_model import default_model_path
from leapllm.tokenization import Tokenizer


class LlamaCppLogits:
    """llama.cpp as a causal LM callable: tokens (batch, seq) -> float32 logits (batch, seq, vocab)."""

    device = torch.device("cpu")

    def __init__(self, path: str, threads: int, ctx: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_ctx=ctx, n_batch=ctx, n_threads=threads, logits_all=True, verbose=False)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = []
        for row in tokens.tolist():
            self.llm.reset()
            self.llm.eval(row)
            rows.append(torch.from_numpy(np.array(self.llm.scores[:len(row)], dtype=np.float32)))
        return torch.stack(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default=None, help="a GGUF file (default: the default model)")
    p.add_argument("--eval-tokens", type=int, default=6000)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    path = str(args.model or default_model_path())
    from leapllm.loading.gguf_file import open_gguf

    _, metadata = open_gguf(path)
    ids = Tokenizer.from_gguf_metadata(metadata).encode(load_text(EVAL_TEXT))[:args.eval_tokens]
    result = perplexity(LlamaCppLogits(path, args.threads, 512), ids, ctx=512, stride=256, batch_size=1)
    print(json.dumps({"model": path.rsplit("/", 1)[-1], "eval_text": EVAL_TEXT, "eval_tokens": len(ids),
                      **result.summary()}))


if __name__ == "__main__":
    main()
