"""Calibration text as model input: what AWQ scaling and Wanda/heads/FFN pruning run through the model."""

from __future__ import annotations

import torch

from leapllm.errors import InvalidRequestError


def calibration_rows(calibration_ids, seq_len: int, vocab_size: int | None = None) -> torch.Tensor:
    """Token ids (n,) cut into rows (n // seq_len, seq_len) (one shorter row when n < seq_len)."""
    ids = torch.as_tensor(calibration_ids, dtype=torch.long).flatten()
    if ids.numel() < 2:
        raise InvalidRequestError(f"calibration needs at least 2 tokens, got {ids.numel()}")
    if vocab_size is not None and int(ids.max()) >= vocab_size:
        raise InvalidRequestError(f"calibration token ids must be below the vocabulary size {vocab_size}")
    if ids.numel() < seq_len:
        return ids[None]
    rows = ids.numel() // seq_len
    return ids[:rows * seq_len].view(rows, seq_len)
