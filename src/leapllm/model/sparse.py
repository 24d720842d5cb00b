"""2:4 sparse weights at run time: the pattern check, and moving 2:4 projections onto NVIDIA's
sparse tensor cores (`leapllm prune --method 2:4` writes them; the loader calls this on CUDA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# (block part, attribute) of the four projections of every decoder block
PROJECTIONS = (("attn", "qkv_proj"), ("attn", "o_proj"), ("mlp", "gate_up_proj"), ("mlp", "down_proj"))


def is_2_of_4(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive inputs of every row has at most 2 nonzeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def use_semi_structured_kernels(model) -> int:
    """On CUDA, turn every block projection whose weight has the 2:4 pattern into a
    `torch.sparse.SparseSemiStructuredTensor`, so its matmuls run on the sparse tensor cores.
    Returns how many were converted. A weight the kernels refuse (shape or dtype unsupported by
    the GPU's cuSPARSELt/CUTLASS) stays dense. Nothing happens off CUDA.
    Not exercised by the CPU test suite (this project's CI machines have no GPU)."""
    if model.device.type != "cuda":
        return 0
    from torch.sparse import to_sparse_semi_structured

    converted = 0
    for layer in model.layers:
        for part, attr in PROJECTIONS:
            linear = getattr(getattr(layer, part), attr)
            if not isinstance(linear, nn.Linear) or not is_2_of_4(linear.weight):
                continue
            dense = linear.weight.detach()
            probe = torch.randn(1, 3, linear.in_features, device=dense.device, dtype=dense.dtype)
            try:
                sparse = to_sparse_semi_structured(dense)
                # Keep it only if it computes what the dense weight does on a small input.
                if not torch.allclose(F.linear(probe, sparse), F.linear(probe, dense), rtol=2e-2, atol=2e-2):
                    continue
            except (RuntimeError, ValueError, TypeError, NotImplementedError):
                continue
            linear.weight = nn.Parameter(sparse, requires_grad=False)
            converted += 1
    return converted
