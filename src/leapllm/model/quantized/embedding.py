"""Token embeddings that stay quantized: a step dequantizes only the rows it looks up.

A vocabulary table is a large share of a small model (a third of the default model's weights), and
float32 would make it 4 to 8 times its stored size. Two forms:
- PackedRowsEmbedding: the rows of a packed Int4Linear / Int8Linear on leapllm's kernels -- the
  output head itself when the model ties them, so the table is held once for both uses.
- BlockQuantizedEmbedding: the rows as a GGUF file stores them in any block type, dequantized by the
  `gguf` package's reference code (every type it implements, K-quants included).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize
from torch import nn

T = GGMLQuantizationType
# Where each block type keeps its float16 scales (and minimums), in bytes from the block's start: the
# only bytes of a block that can be NaN or Inf; the rest are integers.
F16_SCALE_OFFSETS = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
                     T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}
CHECK_ROWS = 4096  # rows dequantized at a time to check a type whose layout is not listed above


class PackedRowsEmbedding(nn.Module):
    """Embedding lookup on the rows of a quantized linear layer running on leapllm's kernels."""

    def __init__(self, table: nn.Module, column_scales: torch.Tensor | None = None):
        super().__init__()
        self.table = table  # an Int4Linear / Int8Linear with packed_linear; shared with lm_head when tied
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        # (embedding_dim,) float32: undoes the factors activation-aware scaling put on a tied head's columns
        self.register_buffer("column_scales", None if column_scales is None else column_scales.float())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (...) int64 -> (..., embedding_dim) float32."""
        rows = self.table.packed_linear.dequantize_rows(tokens.long())
        return rows if self.column_scales is None else rows * self.column_scales

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of the packed {type(self.table).__name__}"


class BlockQuantizedEmbedding(nn.Module):
    """Embedding lookup on a table kept in a GGUF block type (its bytes as the file stores them)."""

    def __init__(self, rows: torch.Tensor, ggml_type: GGMLQuantizationType, embedding_dim: int):
        super().__init__()
        self.register_buffer("rows", rows)  # (num_embeddings, bytes per row) uint8
        self.ggml_type = GGMLQuantizationType(ggml_type)
        self.num_embeddings, self.embedding_dim = rows.shape[0], embedding_dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (...) int64 -> (..., embedding_dim) float32."""
        picked = self.rows[tokens.reshape(-1).long()].numpy()  # (n, bytes per row): whole blocks
        values = np.asarray(dequantize(picked, self.ggml_type), dtype=np.float32)
        return torch.from_numpy(values.reshape(*tokens.shape, self.embedding_dim))

    def all_finite(self) -> bool:
        """Whether every row dequantizes to finite values: the blocks' float16 scales read in place
        (no NaN or Inf exponent), or, for another block type, the rows dequantized a chunk at a time."""
        offsets = F16_SCALE_OFFSETS.get(self.ggml_type)
        if offsets is None:
            for r in range(0, self.num_embeddings, CHECK_ROWS):
                picked = self.rows[r:r + CHECK_ROWS].numpy()
                if not np.isfinite(dequantize(picked, self.ggml_type)).all():
                    return False
            return True
        blocks = self.rows.reshape(-1, GGML_QUANT_SIZES[self.ggml_type][1])  # (blocks, bytes per block)
        for off in offsets:
            half = blocks[:, off:off + 2].contiguous().view(torch.int16)
            if bool(((half & 0x7C00) == 0x7C00).any()):  # exponent all ones: Inf or NaN
                return False
        return True

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.ggml_type.name} rows"
