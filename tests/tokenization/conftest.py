"""Fixtures for the tokenization tests: the default model's tokenizer, its Hugging Face reference,
and a tiny SentencePiece-style GGUF written on the fly. Each is built once per session."""

from __future__ import annotations

import numpy as np
import pytest

from leapllm.loading.gguf_file import open_gguf
from leapllm.tokenization import Tokenizer


@pytest.fixture(scope="session")
def default_gguf_metadata(default_gguf_path):
    _, metadata = open_gguf(default_gguf_path)
    return metadata


@pytest.fixture(scope="session")
def default_tokenizer(default_gguf_metadata):
    return Tokenizer.from_gguf_metadata(default_gguf_metadata)


# A SentencePiece BPE vocabulary small enough to read: 3 specials, 256 byte-fallback tokens,
# pieces with descending scores (the merge order), and one user-defined token.
SPM_PIECES = [
    "▁t", "he", "▁the", "▁a", "in", "▁w", "or", "ld", "▁wor", "▁world", "▁h", "ll", "▁he", "llo",
    "▁hello", "er", "▁b", "▁be", "▁", "t", "h", "e", "a", "i", "n", "w", "o", "r", "l", "d", "b", "H", "!",
]


@pytest.fixture(scope="session")
def tiny_spm_gguf_path(tmp_path_factory):
    """A GGUF file with a 'llama' (SentencePiece) tokenizer and one dummy tensor."""
    gguf = pytest.importorskip("gguf")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
    token_types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    for rank, piece in enumerate(SPM_PIECES):
        tokens.append(piece)
        token_types.append(1)
        scores.append(-float(rank))
    tokens.append("<think>")
    token_types.append(4)
    scores.append(0.0)

    path = tmp_path_factory.mktemp("tiny_spm") / "tiny-spm.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(1)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_scores(scores)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_spm_tokenizer(tiny_spm_gguf_path):
    _, metadata = open_gguf(tiny_spm_gguf_path)
    return Tokenizer.from_gguf_metadata(metadata)
