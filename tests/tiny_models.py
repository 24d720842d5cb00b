"""Tiny random models written to disk in the formats leapllm reads, for loader tests.

GGUF ones carry a small vocabulary cut from the default model's real tokenizer (so
tokenization works); all have a few small layers of random weights and load in well under a second.
"""

from __future__ import annotations

import functools
import math
import re
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
        add_tensor(w, name, array, (qtypes or {}).get(name, qtype))
    return finish(w, path)


def add_tensor(w: GGUFWriter, name: str, array: np.ndarray, qtype: GGMLQuantizationType) -> None:
    """A matrix (or a stack of them) stored as `qtype`; vectors and single rows stay float32."""
    if array.ndim >= 2 and array.shape[-2] > 1 and qtype != GGMLQuantizationType.F32:
        w.add_tensor(name, quants.quantize(array, qtype), raw_dtype=qtype)
    else:
        w.add_tensor(name, array)


def finish(w: GGUFWriter, path: Path) -> Path:
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
    return save_random_model(model_cls, config, folder, hf_tokenizer, seed)


def save_random_model(model_cls, config, folder: Path, hf_tokenizer, seed: int) -> Path:
    """transformers' `model_cls(config)` with seeded random weights, saved with the tokenizer."""
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # the default init leaves norms at 1 (Gemma: 0) and biases at 0: perturb them too
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    hf_tokenizer.save_pretrained(folder)
    return folder


# Each family's distinguishing config, shrunk: the shapes and switches of the real models (Qwen3's
# head_dim * heads != hidden, Gemma's soft caps, query scalar and local/global layers, Phi-3's
# partial LongRoPE, windows of 8-16 keys so that test prompts outrun them).
FAMILY_CONFIGS = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=8, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0)),
    # Six layers: Gemma 3's five local layers, then a global one (the pattern llama.cpp assumes).
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=6, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}})),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        head_dim=16, partial_rotary_factor=0.75, sliding_window=16, original_max_position_embeddings=256,
        rope_scaling={"type": "longrope", "short_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0],
                      "long_factor": [2.0, 2.5, 3.0, 4.0, 6.0, 8.0]})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(head_dim=16, sliding_window=8)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(head_dim=16)),
    # Mixtures of experts: 8 experts, 2 per token (Qwen2-MoE with a shared expert and one dense layer).
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(head_dim=16, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=96, norm_topk_prob=False, mlp_only_layers=[1])),
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(head_dim=16, num_experts=8, num_experts_per_tok=2,
                                                     intermediate_size=32)),
}


def write_family_folder(folder: Path, hf_tokenizer, family: str, seed: int = 0, **overrides) -> Path:
    """A random 3-layer (Gemma 3: 6-layer) model of `family` (FAMILY_CONFIGS, with `overrides` of its
    config), saved by transformers itself."""
    import transformers

    config_name, model_name, extra = FAMILY_CONFIGS[family]
    extra = extra | overrides
    config = getattr(transformers, config_name)(**{
        "vocab_size": len(hf_tokenizer), "hidden_size": TINY["hidden"], "intermediate_size": TINY["intermediate"],
        "num_hidden_layers": 3, "num_attention_heads": TINY["heads"], "num_key_value_heads": TINY["kv_heads"],
        "max_position_embeddings": 1024, "bos_token_id": hf_tokenizer.bos_token_id,
        "eos_token_id": hf_tokenizer.eos_token_id, "pad_token_id": hf_tokenizer.eos_token_id, **extra,
    })
    return save_random_model(getattr(transformers, model_name), config, folder, hf_tokenizer, seed)


@functools.lru_cache(maxsize=None)
def full_vocabulary(tokenizer_gguf: Path) -> dict:
    """The default model's whole tokenizer metadata (the family folders use its 49,152 tokens)."""
    _, meta = open_gguf(tokenizer_gguf)
    return {k: v for k, v in meta.items() if k.startswith("tokenizer.")}


def write_family_gguf(folder: Path, path: Path, tokenizer_gguf: Path,
                      qtype: GGMLQuantizationType = GGMLQuantizationType.F32) -> Path:
    """A family folder (write_family_folder's) as llama.cpp's converter writes it: its tensor names
    (gguf's own name map), Gemma's norms stored as 1 + w, Llama/Mistral's Q/K rows permuted, Phi-3's
    fused matrices and LongRoPE factor tensors, and the metadata keys llama.cpp reads. Mistral is
    written as "llama" with no window, as the converter does. Matrices are stored as `qtype`."""
    import json

    import gguf
    from safetensors.numpy import load_file

    from leapllm.loading.families import HF_MODEL_TYPES

    cfg = json.loads((folder / "config.json").read_text())
    family = HF_MODEL_TYPES[cfg["model_type"]]
    arch = "llama" if family in ("mistral", "mixtral") else family
    layers, heads, kv_heads = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or {}
    w = GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if family == "gemma3":
        w.add_rope_freq_base(rope["full_attention"]["rope_theta"])
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["full_attention"]["factor"])
        w.add_float32("gemma3.rope.freq_base_swa", rope["sliding_attention"]["rope_theta"])
    else:
        w.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    if rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if family in ("gemma2", "gemma3"):
        w.add_sliding_window(cfg["sliding_window"])
        if cfg["query_pre_attn_scalar"] != head_dim:  # llama.cpp derives it; leapllm reads this key first
            w.add_float32(f"{arch}.attention.scale", cfg["query_pre_attn_scalar"] ** -0.5)
        if cfg.get("attn_logit_softcapping") is not None:
            w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
            w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 0
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        if cfg.get("moe_intermediate_size"):
            w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if cfg.get("shared_expert_intermediate_size"):
            w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    rope_dims = int(rope.get("partial_rotary_factor", 1.0) * cfg["hidden_size"]) // heads
    extra_tensors = {}
    if family == "phi3":
        w.add_rope_dimension_count(rope_dims)
        w.add_sliding_window(cfg.get("sliding_window") or 0)
        original = rope["original_max_position_embeddings"]
        w.add_rope_scaling_orig_ctx_len(original)
        scale = cfg["max_position_embeddings"] / original
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
        extra_tensors = {"rope_factors_long.weight": np.array(rope["long_factor"], dtype=np.float32),
                         "rope_factors_short.weight": np.array(rope["short_factor"], dtype=np.float32)}
    for key, value in full_vocabulary(tokenizer_gguf).items():
        if isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        else:
            w.add_uint32(key, value)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], layers)
    state = load_file(folder / "model.safetensors")
    # The converter stacks each layer's experts into (experts, out, in) tensors.
    expert_re = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight")
    stacked: dict[str, list] = {}
    for hf_name in sorted(state, key=lambda n: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", n)]):
        m = expert_re.fullmatch(hf_name)
        if m:
            part = {"w1": "gate", "w3": "up", "w2": "down"}.get(m.group(3), m.group(3).removesuffix("_proj"))
            stacked.setdefault(f"blk.{m.group(1)}.ffn_{part}_exps.weight", []).append(state.pop(hf_name))
    # (Qwen2-MoE's dense layers are not in llama.cpp's qwen2moe list: Llama's names, which leapllm reads.)
    llama_names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    tensors = {(names.get_name(n, try_suffixes=(".weight", ".bias"))
                or llama_names.get_name(n, try_suffixes=(".weight", ".bias"))): a for n, a in state.items()}
    tensors |= {n: np.stack(arrays) for n, arrays in stacked.items()}
    for name, array in tensors.items():
        if family in ("gemma2", "gemma3") and name.endswith("norm.weight"):
            array = array + 1
        if arch == "llama" and name.endswith("attn_q.weight"):
            array = permute_qk(array, heads)
        elif arch == "llama" and name.endswith("attn_k.weight"):
            array = permute_qk(array, kv_heads)
        add_tensor(w, name, array, qtype)
    for name, array in extra_tensors.items():
        w.add_tensor(name, array)
    return finish(w, path)
