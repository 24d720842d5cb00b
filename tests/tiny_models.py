"""Tiny random models written to disk in the formats leapllm reads, for loader tests.

GGUF ones carry a small vocabulary cut from the default model's real tokenizer (so
tokenization works); all have a few small layers of random weights and load in well under a second.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants

from leapllm.loading.gguf_file import open_gguf

TINY = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, context=256)
TINY_VOCAB = 512


@functools.lru_cache(maxsize=None)
def tiny_vocabulary(tokenizer_gguf: Path) -> dict:
    """A valid 512-token byte-level BPE cut from the default model's: its 17 control tokens, the
    256 byte symbols, then merged tokens in merge order while both parts are already present.
    Parsing the real 49k-token vocabulary costs seconds per file; this costs nothing."""
    _, meta = open_gguf(tokenizer_gguf)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = [t for t, kind in zip(tokens, types) if kind == 3]
    control = len(vocab)
    from tokenizers.pre_tokenizers import ByteLevel
    vocab += sorted(ByteLevel.alphabet())
    present, merges = set(vocab), []
    for merge in meta["tokenizer.ggml.merges"]:
        left, right = merge.split(" ")
        if left in present and right in present and left + right not in present:
            merges.append(merge)
            vocab.append(left + right)
            present.add(left + right)
            if len(vocab) == TINY_VOCAB:
                break
    return {
        "model": meta["tokenizer.ggml.model"], "pre": meta["tokenizer.ggml.pre"], "tokens": vocab,
        "types": [3] * control + [1] * (len(vocab) - control), "merges": merges,
        "bos": meta["tokenizer.ggml.bos_token_id"], "eos": meta["tokenizer.ggml.eos_token_id"],
        "add_bos": meta["tokenizer.ggml.add_bos_token"], "chat_template": meta["tokenizer.chat_template"],
    }


def tiny_hf_state(vocab: int, seed: int = 0, bias: bool = False) -> dict[str, np.ndarray]:
    """Random weights under Hugging Face Llama names, float32, (out, in) layout."""
    g = np.random.default_rng(seed)
    h, inter, hd = TINY["hidden"], TINY["intermediate"], TINY["hidden"] // TINY["heads"]
    q, kv = TINY["heads"] * hd, TINY["kv_heads"] * hd

    def w(*shape):
        return (g.standard_normal(shape) * 0.08).astype(np.float32)

    state = {"model.embed_tokens.weight": w(vocab, h), "model.norm.weight": 1 + w(h), "lm_head.weight": w(vocab, h)}
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        state |= {
            p + "input_layernorm.weight": 1 + w(h), p + "post_attention_layernorm.weight": 1 + w(h),
            p + "self_attn.q_proj.weight": w(q, h), p + "self_attn.k_proj.weight": w(kv, h),
            p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, q),
            p + "mlp.gate_proj.weight": w(inter, h), p + "mlp.up_proj.weight": w(inter, h),
            p + "mlp.down_proj.weight": w(h, inter),
        }
        if bias:
            state |= {p + "self_attn.q_proj.bias": w(q), p + "self_attn.k_proj.bias": w(kv),
                      p + "self_attn.v_proj.bias": w(kv)}
    return state


def permute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation (the inverse of what the loader undoes)."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{GGUF_LAYER_NAMES[rest]}"


def write_tiny_gguf(path: Path, tokenizer_gguf: Path, state: dict[str, np.ndarray], *, arch: str = "llama",
                    qtype: GGMLQuantizationType = GGMLQuantizationType.F32, drop: str | None = None,
                    reshape: str | None = None, extra_metadata: dict | None = None,
                    qtypes: dict[str, GGMLQuantizationType] | None = None) -> Path:
    """Write `state` (HF names) as a GGUF of architecture `arch`, matrices stored as `qtype`, or as
    qtypes[GGUF name] for the tensors it names.

    drop / reshape name a GGUF tensor to leave out / store with a wrong shape, to test errors.
    """
    vocab = tiny_vocabulary(tokenizer_gguf)
    w = GGUFWriter(str(path), arch)
    w.add_block_count(TINY["layers"])
    w.add_context_length(TINY["context"])
    w.add_embedding_length(TINY["hidden"])
    w.add_feed_forward_length(TINY["intermediate"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv_heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(vocab["model"])
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    w.add_add_bos_token(vocab["add_bos"])
    w.add_chat_template(vocab["chat_template"])
    for key, value in (extra_metadata or {}).items():
        w.add_string(key, value) if isinstance(value, str) else w.add_uint32(key, value)
    for hf_name, array in state.items():
        name = gguf_name(hf_name)
        if name == drop:
            continue
        if arch in ("llama", "mistral"):
            if name.endswith("attn_q.weight"):
                array = permute_qk(array, TINY["heads"])
            elif name.endswith("attn_k.weight"):
                array = permute_qk(array, TINY["kv_heads"])
        if name == reshape:
            array = array[:-1]
        stored = (qtypes or {}).get(name, qtype)
        if array.ndim == 2 and stored != GGMLQuantizationType.F32:
            w.add_tensor(name, quants.quantize(array, stored), raw_dtype=stored)
        else:
            w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_tiny_hf_folder(folder: Path, hf_tokenizer, arch: str = "llama", seed: int = 0) -> Path:
    """A random tiny model saved by transformers itself (config.json + model.safetensors + tokenizer)."""
    import transformers

    config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config}[arch]
    config = config_cls(
        vocab_size=len(hf_tokenizer), hidden_size=TINY["hidden"], intermediate_size=TINY["intermediate"],
        num_hidden_layers=TINY["layers"], num_attention_heads=TINY["heads"], num_key_value_heads=TINY["kv_heads"],
        max_position_embeddings=TINY["context"], tie_word_embeddings=False,
        bos_token_id=hf_tokenizer.bos_token_id, eos_token_id=hf_tokenizer.eos_token_id,
    )
    model_cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
                 "qwen2": transformers.Qwen2ForCausalLM}[arch]
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # the default init leaves norms at 1 and biases at 0: perturb them too
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    hf_tokenizer.save_pretrained(folder)
    return folder
