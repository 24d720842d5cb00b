"""Driving transformers' reference models the way the engine decodes."""

from __future__ import annotations

import torch


def hf_greedy(hf_model, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy decoding with transformers' own KV cache (sliding-window layers included), never
    stopping at EOS."""
    out = hf_model(torch.tensor([prompt_ids]), use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    for _ in range(n - 1):
        out = hf_model(torch.tensor([[tokens[-1]]]), cache=out.past_key_values, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens
