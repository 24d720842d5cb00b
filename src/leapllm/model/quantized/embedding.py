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
from gguf.quants import dequantize
from torch import nn


class PackedRowsEmbedding(nn.Module):
    """Embedding lookup on the rows of a quantized linear layer running on leapllm's kernels."""

    def __init__(self, table: nn.Module):
        super().__init__()
        self.table = table  # an Int4Linear / Int8Linear with packed_linear; shared with lm_head when tied
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (...) int64 -> (..., embedding_dim) float32."""
        return self.table.packed_linear.dequantize_rows(tokens.long())

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

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.ggml_type.name} rows"
