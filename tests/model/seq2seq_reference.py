"""Tiny random-weight encoder-decoders built from the real configs, saved the way the Hub ships them.

Each family's config.json and generation_config.json values are those of a real checkpoint
(t5-small, flan-t5-small, bart-base, mbart-large-cc25, opus-mt-en-de), with only the sizes shrunk
(2 layers, tiny widths and vocabulary) so that every architectural switch stays and the tests run
in seconds. The transformers model is saved with save_pretrained(safe_serialization=True) next to
a small tokenizer.json, then read back from the folder: the reference sees what leapllm loads.
"""

from __future__ import annotations

import copy
import functools
import json
import tempfile
from pathlib import Path

import torch

VOCAB = 96
EOS_BOOST = {"t5": 3.0, "bart": 2.0, "mbart": 1.5, "marian": 1.5}
WORDS = ("the house is wonderful and small cat dog runs fast today we go home translate English to German "
         "summarize : . , a big red green blue tree sun moon it was very good bad".split())

# The real configs (values as their Hub repositories hold them), then the shrinking.
REAL = {
    "t5-small": {
        "config": {
            "architectures": ["T5ForConditionalGeneration"], "d_ff": 2048, "d_kv": 64, "d_model": 512,
            "decoder_start_token_id": 0, "dropout_rate": 0.1, "eos_token_id": 1, "initializer_factor": 1.0,
            "is_encoder_decoder": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 512,
            "num_heads": 8, "num_layers": 6, "output_past": True, "pad_token_id": 0,
            "relative_attention_num_buckets": 32, "vocab_size": 32128,
            "task_specific_params": {
                "summarization": {"early_stopping": True, "length_penalty": 2.0, "max_length": 200, "min_length": 30,
                                  "no_repeat_ngram_size": 3, "num_beams": 4, "prefix": "summarize: "},
                "translation_en_to_de": {"early_stopping": True, "max_length": 300, "num_beams": 4,
                                         "prefix": "translate English to German: "},
                "translation_en_to_fr": {"early_stopping": True, "max_length": 300, "num_beams": 4,
                                         "prefix": "translate English to French: "},
                "translation_en_to_ro": {"early_stopping": True, "max_length": 300, "num_beams": 4,
                                         "prefix": "translate English to Romanian: "},
            },
        },
        "generation": {"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0},
        "tiny": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_heads": 4, "num_layers": 2, "vocab_size": VOCAB,
                 "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16},
    },
    "flan-t5-small": {
        "config": {
            "architectures": ["T5ForConditionalGeneration"], "d_ff": 1024, "d_kv": 64, "d_model": 512,
            "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1,
            "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_encoder_decoder": True,
            "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 512,
            "num_decoder_layers": 8, "num_heads": 6, "num_layers": 8, "output_past": True, "pad_token_id": 0,
            "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
            "tie_word_embeddings": False, "use_cache": True, "vocab_size": 32128,
        },
        "generation": {"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0},
        # heads * d_kv (24) differs from d_model (32), as flan-t5-small's 6 * 64 from 512
        "tiny": {"d_model": 32, "d_kv": 8, "d_ff": 48, "num_heads": 3, "num_layers": 2, "num_decoder_layers": 2,
                 "vocab_size": VOCAB, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16},
    },
    "bart-base": {
        "config": {
            "activation_dropout": 0.1, "activation_function": "gelu", "add_bias_logits": False,
            "add_final_layer_norm": False, "architectures": ["BartModel"], "attention_dropout": 0.1,
            "bos_token_id": 0, "classif_dropout": 0.1, "classifier_dropout": 0.0, "d_model": 768,
            "decoder_attention_heads": 12, "decoder_ffn_dim": 3072, "decoder_layerdrop": 0.0, "decoder_layers": 6,
            "decoder_start_token_id": 2, "dropout": 0.1, "early_stopping": True, "encoder_attention_heads": 12,
            "encoder_ffn_dim": 3072, "encoder_layerdrop": 0.0, "encoder_layers": 6, "eos_token_id": 2,
            "forced_bos_token_id": 0, "forced_eos_token_id": 2, "gradient_checkpointing": False, "init_std": 0.02,
            "is_encoder_decoder": True, "max_position_embeddings": 1024, "model_type": "bart",
            "no_repeat_ngram_size": 3, "normalize_before": False, "normalize_embedding": True, "num_beams": 4,
            "num_hidden_layers": 6, "pad_token_id": 1, "scale_embedding": False, "use_cache": True,
            "vocab_size": 50265,
        },
        "generation": {"bos_token_id": 0, "decoder_start_token_id": 2, "early_stopping": True, "eos_token_id": 2,
                       "forced_bos_token_id": 0, "forced_eos_token_id": 2, "no_repeat_ngram_size": 3, "num_beams": 4,
                       "pad_token_id": 1},
        "tiny": {"d_model": 32, "decoder_attention_heads": 4, "encoder_attention_heads": 4, "decoder_ffn_dim": 64,
                 "encoder_ffn_dim": 64, "decoder_layers": 2, "encoder_layers": 2, "num_hidden_layers": 2,
                 "vocab_size": VOCAB, "max_position_embeddings": 64},
    },
    "mbart-large-cc25": {
        "config": {
            "activation_dropout": 0.0, "activation_function": "gelu", "add_bias_logits": False,
            "add_final_layer_norm": True, "architectures": ["MBartForConditionalGeneration"],
            "attention_dropout": 0.1, "bos_token_id": 0, "classif_dropout": 0.0, "d_model": 1024,
            "decoder_attention_heads": 16, "decoder_ffn_dim": 4096, "decoder_layerdrop": 0.0, "decoder_layers": 12,
            "dropout": 0.1, "encoder_attention_heads": 16, "encoder_ffn_dim": 4096, "encoder_layerdrop": 0.0,
            "encoder_layers": 12, "eos_token_id": 2, "init_std": 0.02, "is_encoder_decoder": True,
            "max_length": 1024, "max_position_embeddings": 1024, "model_type": "mbart", "normalize_before": True,
            "normalize_embedding": True, "num_beams": 5, "num_hidden_layers": 12, "output_past": True,
            "pad_token_id": 1, "scale_embedding": True, "static_position_embeddings": False,
            "task_specific_params": {"translation_en_to_ro": {"decoder_start_token_id": 250020}},
            "vocab_size": 250027,
        },
        "generation": None,  # the repository has none: transformers derives one from the config
        "tiny": {"d_model": 32, "decoder_attention_heads": 4, "encoder_attention_heads": 4, "decoder_ffn_dim": 64,
                 "encoder_ffn_dim": 64, "decoder_layers": 2, "encoder_layers": 2, "num_hidden_layers": 2,
                 "vocab_size": VOCAB, "max_position_embeddings": 64,
                 "task_specific_params": {"translation_en_to_ro": {"decoder_start_token_id": VOCAB - 1}}},
    },
    "opus-mt-en-de": {
        "config": {
            "activation_dropout": 0.0, "activation_function": "swish", "add_bias_logits": False,
            "add_final_layer_norm": False, "architectures": ["MarianMTModel"], "attention_dropout": 0.0,
            "bad_words_ids": [[58100]], "bos_token_id": 0, "classif_dropout": 0.0, "classifier_dropout": 0.0,
            "d_model": 512, "decoder_attention_heads": 8, "decoder_ffn_dim": 2048, "decoder_layerdrop": 0.0,
            "decoder_layers": 6, "decoder_start_token_id": 58100, "decoder_vocab_size": 58101, "dropout": 0.1,
            "encoder_attention_heads": 8, "encoder_ffn_dim": 2048, "encoder_layerdrop": 0.0, "encoder_layers": 6,
            "eos_token_id": 0, "forced_eos_token_id": 0, "init_std": 0.02, "is_encoder_decoder": True,
            "max_length": 512, "max_position_embeddings": 512, "model_type": "marian", "normalize_before": False,
            "normalize_embedding": False, "num_beams": 4, "num_hidden_layers": 6, "pad_token_id": 58100,
            "scale_embedding": True, "share_encoder_decoder_embeddings": True, "static_position_embeddings": True,
            "use_cache": True, "vocab_size": 58101,
        },
        "generation": {"bad_words_ids": [[58100]], "bos_token_id": 0, "decoder_start_token_id": 58100,
                       "eos_token_id": 0, "forced_eos_token_id": 0, "max_length": 512, "num_beams": 4,
                       "pad_token_id": 58100, "renormalize_logits": True},
        # the pad token (decoder start, a bad word) is the last id, as 58100 of 58101
        "tiny": {"d_model": 32, "decoder_attention_heads": 4, "encoder_attention_heads": 4, "decoder_ffn_dim": 64,
                 "encoder_ffn_dim": 64, "decoder_layers": 2, "encoder_layers": 2, "num_hidden_layers": 2,
                 "vocab_size": VOCAB, "decoder_vocab_size": VOCAB, "max_position_embeddings": 64,
                 "bad_words_ids": [[VOCAB - 1]], "decoder_start_token_id": VOCAB - 1, "pad_token_id": VOCAB - 1},
    },
}
FAMILY_SPECIALS = {  # (token, id) of each family's special tokens in the tiny vocabulary
    "t5": [("<pad>", 0), ("</s>", 1), ("<unk>", 2)],
    "bart": [("<s>", 0), ("<pad>", 1), ("</s>", 2), ("<unk>", 3)],
    "mbart": [("<s>", 0), ("<pad>", 1), ("</s>", 2), ("<unk>", 3), ("en_XX", VOCAB - 2), ("ro_RO", VOCAB - 1)],
    "marian": [("</s>", 0), ("<unk>", 1), ("<pad>", VOCAB - 1)],
}


def tiny_config(name: str) -> tuple[dict, dict | None]:
    """The real config.json and generation_config.json of `name`, shrunk."""
    real = REAL[name]
    config = copy.deepcopy(real["config"]) | copy.deepcopy(real["tiny"])
    generation = copy.deepcopy(real["generation"])
    if generation is not None:
        for key in ("bad_words_ids", "decoder_start_token_id", "pad_token_id"):
            if key in generation and key in real["tiny"]:
                generation[key] = copy.deepcopy(real["tiny"][key])
    return config, generation


def tiny_tokenizer(family: str):
    """A Unigram tokenizer.json over WORDS and single letters, with the family's special tokens
    and template (T5: "$A </s>", BART: "<s> $A </s>", mBART: "$A </s> en_XX", Marian: "$A </s>")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    specials = FAMILY_SPECIALS[family]
    by_id = dict((i, t) for t, i in specials)
    pieces = ["\u2581" + w for w in WORDS] + list("abcdefghijklmnopqrstuvwxyz") + ["\u2581"]
    vocab, next_piece = [], iter(pieces)
    for i in range(VOCAB):
        token = by_id.get(i) or next(next_piece, f"<extra_{i}>")
        vocab.append((token, 0.0 if i in by_id else -1.0 - (len(token) == 1) * 5.0))
    unk = dict(specials)["<unk>"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=unk, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens([t for t, _ in specials])
    ids = dict(specials)
    template = {"t5": "$A </s>", "marian": "$A </s>", "bart": "<s> $A </s>", "mbart": "$A </s> en_XX"}[family]
    used = [t for t in ("<s>", "</s>", "en_XX") if t in template.split()]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(t, ids[t]) for t in used])
    return tok


def perturb_(model) -> None:
    """Move every norm weight and bias and the logits bias away from their 1/0 initial values, so
    that a norm or bias wired to the wrong place cannot go unnoticed (and widen BART's weights)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if "norm" in name or name.endswith(".bias") or "final_logits_bias" in name:
                t.add_(0.2 * torch.randn(t.shape, generator=gen))
            elif t.dim() == 2 and model.config.model_type != "t5":
                # BART's 0.02 initial scale gives near-uniform next-token distributions, where beam
                # search would turn on float noise; wider weights give decided ones.
                t.normal_(0.0, 0.5 if "embed_positions" in name else 0.2, generator=gen)
        # Make EOS a close contender: beams then finish at varied lengths, which early stopping
        # and the length penalty decide between.
        eos = model.config.eos_token_id
        if getattr(model, "final_logits_bias", None) is not None:
            model.final_logits_bias[0, eos] += EOS_BOOST[model.config.model_type]
        else:
            model.get_output_embeddings().weight[eos] *= EOS_BOOST["t5"]


def build_reference(name: str, folder: Path):
    """Save a random-weight transformers model of `name` (its tokenizer.json and real generation
    config beside) into folder and return it read back from there, in eval mode with eager attention."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, GenerationConfig

    config, generation = tiny_config(name)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(folder))
    perturb_(model)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "config.json").write_text(json.dumps(config))  # the real keys, not transformers' rewrite
    if generation is not None:
        (folder / "generation_config.json").unlink(missing_ok=True)
        GenerationConfig(**generation).save_pretrained(folder)
    if config.get("tie_word_embeddings") is False:  # Flan-T5: its own LM head, stored apart
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "model.safetensors")
        tensors["lm_head.weight"] = torch.randn(VOCAB, config["d_model"], generator=torch.Generator().manual_seed(2))
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    tiny_tokenizer(config["model_type"]).save(str(folder / "tokenizer.json"))
    reference = AutoModelForSeq2SeqLM.from_pretrained(folder, attn_implementation="eager").eval()
    return reference


def source_batch(tokenizer_or_folder, texts: list[str], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> (input_ids, attention_mask) padded on the right with pad_id, through tokenizer.json."""
    from tokenizers import Tokenizer

    tok = tokenizer_or_folder
    if isinstance(tok, (str, Path)):
        tok = Tokenizer.from_file(str(Path(tok) / "tokenizer.json"))
    rows = [tok.encode(t).ids for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


_FOLDERS = tempfile.TemporaryDirectory(prefix="leapllm-seq2seq-")  # removed when the test process ends


@functools.cache
def reference(name: str):
    """(transformers model, folder) of `name`, built once per test process and shared by the test modules."""
    folder = Path(_FOLDERS.name) / name
    return build_reference(name, folder), folder
