"""`leapllm bench --random-weights SHAPE`: a model of a named real shape with random weights, so that a
GPU can be measured on the sizes people run without downloading anything, and the decode floor.

The file is a GGUF of float16 matrices (the format every system of the bench reads: leapllm, the
transformers peers and llama.cpp) with the Llama architecture and the named model's layer shapes.
Its tokenizer, and so its vocabulary (49,152 tokens), is the default model's for every shape: the
embedding and output head of the Llama 3 shapes are smaller than the real ones (128,256 rows), which
the floor accounts for, since it counts the file's own bytes. Speed does not depend on the values.

The floor of a batch-1 decode step is the bytes it must read, every weight once and the keys and
values of every earlier token, at the device's measured streaming bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    tied: bool  # the output head is the embedding table
    rope_theta: float
    context: int = 8192

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SHAPES = {
    # HuggingFaceTB/SmolLM2-135M: the default model's shape.
    "smollm2-135m": Shape(30, 576, 1536, 9, 3, True, 100000.0),
    # meta-llama/Llama-3.2-1B.
    "llama-1b": Shape(16, 2048, 8192, 32, 8, True, 500000.0),
    # HuggingFaceTB/SmolLM2-1.7B: 24 layers of 2048, full multi-head attention.
    "1.7b": Shape(24, 2048, 8192, 32, 32, True, 130000.0),
    # meta-llama/Llama-3.1-8B.
    "llama-8b": Shape(32, 4096, 14336, 32, 8, False, 500000.0),
}


def tensor_shapes(shape: Shape, vocab: int) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> its (rows, columns) (numpy order) or (n,) for a norm."""
    h, kv = shape.hidden, shape.kv_heads * shape.head_dim
    out = {"token_embd.weight": (vocab, h), "output_norm.weight": (h,)}
    if not shape.tied:
        out["output.weight"] = (vocab, h)
    for i in range(shape.layers):
        p = f"blk.{i}."
        out |= {p + "attn_norm.weight": (h,), p + "ffn_norm.weight": (h,), p + "attn_q.weight": (h, h),
                p + "attn_k.weight": (kv, h), p + "attn_v.weight": (kv, h), p + "attn_output.weight": (h, h),
                p + "ffn_gate.weight": (shape.intermediate, h), p + "ffn_up.weight": (shape.intermediate, h),
                p + "ffn_down.weight": (h, shape.intermediate)}
    return out


def parameter_count(shape: Shape, vocab: int) -> int:
    return sum(int(np.prod(s)) for s in tensor_shapes(shape, vocab).values())


def write_random_gguf(shape: Shape, path: Path, tokenizer_gguf: Path, seed: int = 0) -> Path:
    """A Llama GGUF of `shape` with random float16 matrices (norms: float32 ones) and the tokenizer of
    `tokenizer_gguf`."""
    from gguf import GGUFWriter

    from leapllm.loading.gguf_file import open_gguf

    _, meta = open_gguf(tokenizer_gguf)
    tokens = meta["tokenizer.ggml.tokens"]
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(shape.layers)
    w.add_context_length(shape.context)
    w.add_embedding_length(shape.hidden)
    w.add_feed_forward_length(shape.intermediate)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(tokens)
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    w.add_add_bos_token(bool(meta.get("tokenizer.ggml.add_bos_token", False)))
    if "tokenizer.chat_template" in meta:
        w.add_chat_template(meta["tokenizer.chat_template"])
    rng = np.random.default_rng(seed)
    for name, dims in tensor_shapes(shape, len(tokens)).items():
        if len(dims) == 1:
            w.add_tensor(name, np.ones(dims, dtype=np.float32))
        else:  # std 0.02, as a Llama's initializer: logits stay in a sane range
            w.add_tensor(name, (rng.standard_normal(dims, dtype=np.float32) * 0.02).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


BYTES_PER_VALUE = {"float32": 4, "bfloat16": 2, "float16": 2}


def decode_floor(shape: Shape, vocab: int, dtype: str, context: float, bandwidth: float) -> dict:
    """What a batch-1 decode step of `shape` in `dtype` (weights and KV cache) must read at `context`
    earlier tokens, and the tokens/s that allows at `bandwidth` bytes/s."""
    size = BYTES_PER_VALUE[dtype]
    weights = parameter_count(shape, vocab) * size
    kv_per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * size
    step = weights + kv_per_token * context
    return {"weight_bytes": weights, "kv_bytes_per_token": kv_per_token,
            "step_bytes": step, "tokens_per_s": bandwidth / step}
