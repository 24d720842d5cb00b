"""Loading an encoder-decoder (T5, mT5, BART, mBART, MarianMT) from a Hugging Face folder.

A folder holds config.json (model_type t5, mt5, bart, mbart or marian), *.safetensors, and its
tokenizer: tokenizer.json (T5, BART and mBART folders ship one; read with the `tokenizers`
library) or, for Marian, source.spm + target.spm + vocab.json (read with the `sentencepiece`
library, mapped through vocab.json exactly as transformers' MarianTokenizer does).

Generation defaults come from generation_config.json; a folder without one falls back on the
generation keys of config.json, as older transformers did. T5's `task_specific_params` (the
"translate English to German: " prefixes and their beam settings) are kept for the task helpers.

Tied weights: the token embeddings are shared by encoder and decoder unless the checkpoint
stores both (Marian with separate vocabularies), and the LM head is the decoder's embedding
unless the checkpoint stores lm_head.weight (Flan-T5, T5 v1.1), as transformers decides.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer as BackendTokenizer

from leapllm.errors import ModelLoadError, TokenizerError
from leapllm.loading.loader import check_state_tensors, folder_config, resolve_device, resolve_dtype
from leapllm.model.quantized.int8 import Int8Linear, quantize_linears_int8
from leapllm.model.seq2seq import ACTIVATIONS, Seq2SeqConfig, Seq2SeqModel, sinusoidal_table

SEQ2SEQ_MODEL_TYPES = {"t5": "t5", "mt5": "t5", "bart": "bart", "mbart": "mbart", "marian": "marian"}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def is_seq2seq_folder(path: str | Path) -> bool:
    """Whether a path is a folder whose config.json names an encoder-decoder model_type."""
    raw = folder_config(path)
    return raw is not None and (raw.get("model_type") in SEQ2SEQ_MODEL_TYPES or bool(raw.get("is_encoder_decoder")))


def seq2seq_config(raw: dict, where: Path) -> Seq2SeqConfig:
    model_type = raw.get("model_type")
    if model_type not in SEQ2SEQ_MODEL_TYPES:
        raise ModelLoadError(f"{where}: model_type {model_type!r} is not a supported encoder-decoder "
                             f"({', '.join(SEQ2SEQ_MODEL_TYPES)})")
    family = SEQ2SEQ_MODEL_TYPES[model_type]
    try:
        if family == "t5":
            proj = str(raw.get("feed_forward_proj", "relu"))
            parts = proj.split("-")
            if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
                raise ModelLoadError(f"{where}: feed_forward_proj {proj!r} is not supported")
            activation = "gelu_new" if proj == "gated-gelu" else parts[-1]
            layers = int(raw.get("num_layers", 6))
            tied = raw.get("tie_word_embeddings", True) is not False
            config = Seq2SeqConfig(
                family="t5", vocab_size=int(raw["vocab_size"]), d_model=int(raw["d_model"]),
                num_heads=int(raw["num_heads"]), head_dim=int(raw["d_kv"]),
                encoder_layers=layers, decoder_layers=int(raw.get("num_decoder_layers") or layers),
                encoder_ffn_dim=int(raw["d_ff"]), decoder_ffn_dim=int(raw["d_ff"]),
                activation=activation, gated_ffn=len(parts) == 2,
                norm_eps=float(raw.get("layer_norm_epsilon", 1e-6)),
                relative_buckets=int(raw.get("relative_attention_num_buckets", 32)),
                relative_max_distance=int(raw.get("relative_attention_max_distance", 128)),
                scale_decoder_output=bool(raw.get("scale_decoder_outputs", tied)),
                pad_token_id=int(raw.get("pad_token_id") or 0))
        else:
            d_model = int(raw["d_model"])
            heads = int(raw["encoder_attention_heads"])
            if int(raw.get("decoder_attention_heads", heads)) != heads:
                raise ModelLoadError(f"{where}: different encoder and decoder head counts are not supported")
            shared = raw.get("share_encoder_decoder_embeddings", True) is not False
            config = Seq2SeqConfig(
                family=family, vocab_size=int(raw["vocab_size"]), d_model=d_model,
                num_heads=heads, head_dim=d_model // heads,
                encoder_layers=int(raw["encoder_layers"]), decoder_layers=int(raw["decoder_layers"]),
                encoder_ffn_dim=int(raw["encoder_ffn_dim"]), decoder_ffn_dim=int(raw["decoder_ffn_dim"]),
                activation=str(raw.get("activation_function", "gelu")), norm_eps=1e-5,
                max_positions=int(raw.get("max_position_embeddings", 1024)),
                scale_embedding=bool(raw.get("scale_embedding", False)),
                decoder_vocab_size=0 if shared else int(raw.get("decoder_vocab_size") or raw["vocab_size"]),
                pad_token_id=int(raw.get("pad_token_id") or 0))
            if d_model % heads:
                raise ModelLoadError(f"{where}: d_model {d_model} is not a multiple of {heads} heads")
    except ModelLoadError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{where}: config.json lacks or mangles {exc}") from None
    if config.activation not in ACTIVATIONS:
        raise ModelLoadError(f"{where}: activation {config.activation!r} is not supported")
    sizes = (config.vocab_size, config.d_model, config.num_heads, config.head_dim, config.encoder_layers,
             config.decoder_layers, config.encoder_ffn_dim, config.decoder_ffn_dim)
    if min(sizes) < 1 or (family != "t5" and config.max_positions < 1):
        raise ModelLoadError(f"{where}: config.json holds a size below 1")
    return config


# --- tensor names -----------------------------------------------------------------------------

_T5_LAYER = re.compile(r"^(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)\.(.+)$")
_T5_FFN = {"wi": "up_proj", "wi_0": "gate_proj", "wi_1": "up_proj", "wo": "down_proj"}
_BART_LAYER = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(.+)$")
_BART_MODULES = {"self_attn_layer_norm": "self_attn_norm", "encoder_attn_layer_norm": "cross_attn_norm",
                 "final_layer_norm": "ffn_norm", "fc1": "ffn.up_proj", "fc2": "ffn.down_proj",
                 "self_attn.out_proj": "self_attn.o_proj", "encoder_attn.out_proj": "cross_attn.o_proj",
                 "encoder_attn.q_proj": "cross_attn.q_proj"}
# Projections stored apart that leapllm runs as one matmul: (ours, part) by their name.
_FUSED_PARTS = {"self_attn.q_proj": ("self_attn.qkv_proj", 0), "self_attn.k_proj": ("self_attn.qkv_proj", 1),
                "self_attn.v_proj": ("self_attn.qkv_proj", 2), "encoder_attn.k_proj": ("cross_attn.kv_proj", 0),
                "encoder_attn.v_proj": ("cross_attn.kv_proj", 1)}


def _t5_name(name: str) -> str | None:
    """Our name for a T5 tensor; a "fuse:" name for a part of a fused projection."""
    if name in ("encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"):
        return name.split(".")[0] + ".final_norm.weight"
    m = _T5_LAYER.match(name)
    if m is None:
        return None
    stack, i, sub, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    prefix = f"{stack}.layers.{i}."
    is_ffn = sub == (2 if stack == "decoder" else 1)
    if rest.endswith("relative_attention_bias.weight"):
        # Only layer 0 has one (shared by every layer); a cross-attention copy is unused.
        return f"{stack}.relative_bias.embedding.weight" if i == 0 and sub == 0 else None
    if rest == "layer_norm.weight":
        norm = "ffn_norm" if is_ffn else ("self_attn_norm" if sub == 0 else "cross_attn_norm")
        return prefix + norm + ".weight"
    if is_ffn and rest.startswith("DenseReluDense."):
        proj = rest.split(".")[1]
        return prefix + f"ffn.{_T5_FFN[proj]}.weight" if proj in _T5_FFN else None
    attn = rest.split(".")[0]
    proj = rest.split(".")[1] if rest.count(".") == 2 else ""
    if attn == "SelfAttention" and sub == 0:
        if proj == "o":
            return prefix + "self_attn.o_proj.weight"
        if proj in ("q", "k", "v"):
            return f"fuse:{prefix}self_attn.qkv_proj.weight:{'qkv'.index(proj)}"
    if attn == "EncDecAttention" and sub == 1 and stack == "decoder":
        if proj == "o":
            return prefix + "cross_attn.o_proj.weight"
        if proj == "q":
            return prefix + "cross_attn.q_proj.weight"
        if proj in ("k", "v"):
            return f"fuse:{prefix}cross_attn.kv_proj.weight:{'kv'.index(proj)}"
    return None


def _bart_name(name: str) -> str | None:
    """Our name for a BART / mBART / Marian tensor; a "fuse:" name for a part of a fused projection."""
    for stack in ("encoder", "decoder"):
        if name in (f"{stack}.layernorm_embedding.weight", f"{stack}.layernorm_embedding.bias"):
            return f"{stack}.embed.norm." + name.rsplit(".", 1)[1]
        if name in (f"{stack}.layer_norm.weight", f"{stack}.layer_norm.bias"):
            return f"{stack}.final_norm." + name.rsplit(".", 1)[1]
        if name == f"{stack}.embed_positions.weight":
            return f"{stack}.embed.positions.weight"
    m = _BART_LAYER.match(name)
    if m is None:
        return None
    stack, i, rest = m.groups()
    module, leaf = rest.rsplit(".", 1)
    prefix = f"{stack}.layers.{i}."
    if module in _BART_MODULES:
        return prefix + _BART_MODULES[module] + "." + leaf
    if module in _FUSED_PARTS:
        ours, part = _FUSED_PARTS[module]
        return f"fuse:{prefix}{ours}.{leaf}:{part}"
    return None


def read_seq2seq_weights(folder: Path, family: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under our names; the parts of fused projections concatenated; the
    embeddings under "shared", "encoder_embed", "decoder_embed" and the head under "lm_head"."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors file (pickled weights are never loaded)")
    tensors: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    rename = _t5_name if family == "t5" else _bart_name
    specials = {"shared.weight": "shared", "encoder.embed_tokens.weight": "encoder_embed",
                "decoder.embed_tokens.weight": "decoder_embed", "lm_head.weight": "lm_head",
                "final_logits_bias": "final_logits_bias"}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    name = key.removeprefix("model.") if family != "t5" else key
                    ours = specials.get(name) or rename(name)
                    if ours is None:
                        continue
                    if ours.startswith("fuse:"):
                        _, target, part = ours.split(":")
                        parts.setdefault(target, {})[int(part)] = f.get_tensor(key)
                    else:
                        tensors[ours] = f.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{file}: not a readable safetensors file ({exc})") from None
    for target, pieces in parts.items():
        count = 3 if "qkv" in target else 2
        if sorted(pieces) != list(range(count)):
            raise ModelLoadError(f"{folder}: tensor {target} lacks a query/key/value part")
        tensors[target] = torch.cat([pieces[i] for i in range(count)], dim=0)
    return tensors


def build_seq2seq(config: Seq2SeqConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                  device: torch.device, where: Path) -> Seq2SeqModel:
    shared = tensors.pop("shared", None)
    encoder_embed = tensors.pop("encoder_embed", None)
    decoder_embed = tensors.pop("decoder_embed", None)
    separate = config.decoder_vocab_size != config.vocab_size or shared is None
    encoder_embed = encoder_embed if separate or shared is None else shared
    decoder_embed = decoder_embed if separate or shared is None else shared
    if encoder_embed is None or decoder_embed is None:
        raise ModelLoadError(f"{where}: missing tensor shared.weight (the token embeddings)")
    tensors["encoder.embed.tokens.weight"] = encoder_embed
    tensors["decoder.embed.tokens.weight"] = decoder_embed
    head = tensors.pop("lm_head", None)
    tensors["lm_head.weight"] = head if head is not None else decoder_embed
    logits_bias = tensors.pop("final_logits_bias", None)
    if config.logits_bias:  # optional in the checkpoint (transformers zero-fills a missing one)
        tensors["final_logits_bias"] = (torch.zeros(config.decoder_vocab_size) if logits_bias is None
                                        else logits_bias.reshape(-1))

    with torch.device("meta"):
        model = Seq2SeqModel(config)
    expected = dict(model.state_dict())
    check_state_tensors(expected, tensors, where)
    converted: dict[int, torch.Tensor] = {}  # tied tensors stay one tensor after the dtype change
    state = {}
    for key in expected:
        t = tensors[key]
        if id(t) not in converted:
            converted[id(t)] = t.to(device=device, dtype=dtype)
        state[key] = converted[id(t)]
    model.load_state_dict(state, assign=True)
    for stack in (model.encoder, model.decoder):  # buffers computed, not stored
        if hasattr(stack.embed, "sinusoids"):
            stack.embed.sinusoids = sinusoidal_table(config.max_positions, config.d_model).to(device)
    for name, t in model.named_parameters():
        if ("norm" in name or "embed" in name or name == "lm_head.weight") and not bool(torch.isfinite(t).all()):
            raise ModelLoadError(f"{where}: tensor {name} holds NaN or infinite values (a damaged file?)")
    return model.eval()


# --- generation defaults --------------------------------------------------------------------------

GENERATION_KEYS = ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id", "forced_bos_token_id",
                   "forced_eos_token_id", "num_beams", "max_length", "max_new_tokens", "min_length",
                   "length_penalty", "early_stopping", "no_repeat_ngram_size", "bad_words_ids", "renormalize_logits")


@dataclass
class GenerationDefaults:
    """What a folder says about generating, with transformers' meanings: max_length and
    min_length count the decoder start token; eos_token_ids may hold several ids."""

    decoder_start_token_id: int
    eos_token_ids: list[int]
    pad_token_id: int
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    num_beams: int = 1
    max_length: int | None = None
    max_new_tokens: int | None = None
    min_length: int = 0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    no_repeat_ngram_size: int = 0
    bad_words_ids: list[list[int]] = field(default_factory=list)
    renormalize_logits: bool = False
    task_specific_params: dict[str, dict[str, Any]] = field(default_factory=dict)


def generation_defaults(config_raw: dict, folder: Path) -> GenerationDefaults:
    settings = {k: config_raw[k] for k in GENERATION_KEYS if config_raw.get(k) is not None}
    if (folder / "generation_config.json").is_file():
        generation = _read_json(folder / "generation_config.json")
        # The generation file replaces the config's generation keys, special token ids excepted.
        settings = {k: v for k, v in settings.items() if k.endswith("token_id")}
        settings.update({k: generation[k] for k in GENERATION_KEYS if generation.get(k) is not None})
    try:
        eos = settings.get("eos_token_id")
        eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]
        start = settings.get("decoder_start_token_id", settings.get("bos_token_id"))
        if start is None:
            raise ModelLoadError(f"{folder}: neither decoder_start_token_id nor bos_token_id is set")
        pad = settings.get("pad_token_id", eos_ids[0] if eos_ids else 0)
        forced_eos = settings.get("forced_eos_token_id")
        if isinstance(forced_eos, list):
            forced_eos = forced_eos[0] if forced_eos else None
        defaults = GenerationDefaults(
            decoder_start_token_id=int(start), eos_token_ids=eos_ids, pad_token_id=int(pad),
            forced_bos_token_id=None if settings.get("forced_bos_token_id") is None
            else int(settings["forced_bos_token_id"]),
            forced_eos_token_id=None if forced_eos is None else int(forced_eos),
            num_beams=int(settings.get("num_beams", 1)),
            max_length=None if settings.get("max_length") is None else int(settings["max_length"]),
            max_new_tokens=None if settings.get("max_new_tokens") is None else int(settings["max_new_tokens"]),
            min_length=int(settings.get("min_length", 0)),
            length_penalty=float(settings.get("length_penalty", 1.0)),
            early_stopping=settings.get("early_stopping", False),
            no_repeat_ngram_size=int(settings.get("no_repeat_ngram_size", 0)),
            bad_words_ids=[[int(t) for t in seq] for seq in settings.get("bad_words_ids", [])],
            renormalize_logits=bool(settings.get("renormalize_logits", False)))
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{folder}: generation settings are malformed ({exc})") from None
    if defaults.early_stopping not in (True, False, "never"):
        raise ModelLoadError(f"{folder}: early_stopping must be true, false or \"never\"")
    tasks = config_raw.get("task_specific_params")
    if isinstance(tasks, dict):
        defaults.task_specific_params = {k: v for k, v in tasks.items() if isinstance(v, dict)}
    return defaults


# --- tokenizers -----------------------------------------------------------------------------------

class Seq2SeqTokenizer:
    """Source text -> ids (with the model's special tokens) and generated ids -> text (special
    tokens skipped), over a tokenizer.json."""

    def __init__(self, backend: BackendTokenizer, clean_up_spaces: bool = False):
        self.backend = backend
        self.backend.no_padding()
        self.backend.no_truncation()
        # transformers skips this cleanup for BPE models, where it would eat real spaces
        self.clean_up_spaces = clean_up_spaces and type(backend.model).__name__ != "BPE"

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        text = self.backend.decode(ids, skip_special_tokens=True)
        if self.clean_up_spaces:
            for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                                  (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(before, after)
        return text

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def set_source_language(self, code: str) -> None:
        """mBART: put this language code where the tokenizer's template has the source's."""
        raise TokenizerError("this tokenizer has no source language to set")


class MBartTokenizer(Seq2SeqTokenizer):
    """mBART's tokenizer.json appends "</s> en_XX" (mBART-25) or prepends the code and appends
    "</s>" (mBART-50); the language code of the source is a setting."""

    def __init__(self, backend: BackendTokenizer, clean_up_spaces: bool, language_codes: list[str]):
        super().__init__(backend, clean_up_spaces)
        self.language_codes = language_codes
        probe = self.backend.encode("").tokens
        self.code_first = bool(probe) and probe[0] in language_codes

    def set_source_language(self, code: str) -> None:
        from tokenizers.processors import TemplateProcessing

        code_id = self.token_to_id(code)
        if code not in self.language_codes or code_id is None:
            raise TokenizerError(f"unknown language code {code!r}; this model knows {', '.join(self.language_codes)}")
        eos_id = self.token_to_id("</s>")
        single = f"{code} $A </s>" if self.code_first else f"$A </s> {code}"
        pair = f"{code} $A $B </s>" if self.code_first else f"$A $B </s> {code}"
        self.backend.post_processor = TemplateProcessing(single=single, pair=pair,
                                                         special_tokens=[(code, code_id), ("</s>", eos_id)])


class MarianTokenizer:
    """MarianMT's two SentencePiece models (source.spm to split the source, target.spm) and the
    vocab.json that numbers their pieces for the model, as transformers' MarianTokenizer: pieces
    outside vocab.json are <unk>, the source ends with </s>, a leading ">>xx<<" language code stays
    one token, and decoding joins the pieces with the source model unless the vocabularies are
    separate (target_vocab.json)."""

    def __init__(self, folder: Path):
        try:
            import sentencepiece
        except ImportError:
            raise ModelLoadError("reading a Marian folder (source.spm) needs the sentencepiece package: "
                                 "pip install sentencepiece") from None
        self.vocab = {str(k): int(v) for k, v in _read_json(folder / "vocab.json").items()}
        target_vocab = folder / "target_vocab.json"
        self.separate_vocabs = target_vocab.is_file()
        target = {str(k): int(v) for k, v in _read_json(target_vocab).items()} if self.separate_vocabs else self.vocab
        self.id_to_piece = {v: k for k, v in target.items()}
        config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        self.unk, self.eos, self.pad = (str(config.get(k) or d) for k, d in
                                        (("unk_token", "<unk>"), ("eos_token", "</s>"), ("pad_token", "<pad>")))
        for token in (self.unk, self.eos):
            if token not in self.vocab:
                raise ModelLoadError(f"{folder / 'vocab.json'}: no {token} token")
        self.special = {self.unk, self.eos, self.pad}
        self.special_ids = {target[t] for t in self.special if t in target}
        models = []
        for name in ("source.spm", "target.spm"):
            sp = sentencepiece.SentencePieceProcessor()
            try:
                sp.Load(str(folder / name))
            except (OSError, RuntimeError) as exc:
                raise ModelLoadError(f"{folder / name}: not a readable SentencePiece model ({exc})") from None
            models.append(sp)
        self.source_spm, self.target_spm = models

    def encode(self, text: str) -> list[int]:
        pieces = []
        if text.startswith(">>") and (end := text.find("<<")) != -1:  # a target-language code
            pieces.append(text[:end + 2])
            text = text[end + 2:]
        pieces += self.source_spm.encode(text, out_type=str)
        unk = self.vocab[self.unk]
        return [self.vocab.get(p, unk) for p in pieces] + [self.vocab[self.eos]]

    def decode(self, ids: list[int]) -> str:
        spm = self.target_spm if self.separate_vocabs else self.source_spm
        pieces = []
        for i in ids:
            if i in self.special_ids:
                continue
            piece = self.id_to_piece.get(i) or spm.IdToPiece(i) or self.unk
            if piece not in self.special:
                pieces.append(piece)
        return spm.decode_pieces(pieces).replace("\u2581", " ").strip()

    def token_to_id(self, token: str) -> int | None:
        return self.vocab.get(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.id_to_piece.get(token_id)

    def set_source_language(self, code: str) -> None:
        raise TokenizerError("a Marian model's source language is fixed; a multilingual target takes a "
                             "'>>xx<<' code at the start of the text")


def load_seq2seq_tokenizer(folder: Path, family: str):
    config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    if (folder / "tokenizer.json").is_file():
        try:
            backend = BackendTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ModelLoadError(f"{folder / 'tokenizer.json'}: not a valid tokenizer ({exc})") from None
        clean = bool(config.get("clean_up_tokenization_spaces", False))
        if family == "mbart":
            codes = [t for t in backend.get_vocab(with_added_tokens=True)
                     if re.fullmatch(r"[a-z]{2}_[A-Z]{2}", t)]
            return MBartTokenizer(backend, clean, sorted(codes))
        return Seq2SeqTokenizer(backend, clean)
    if family == "marian" and (folder / "source.spm").is_file():
        for name in ("target.spm", "vocab.json"):
            if not (folder / name).is_file():
                raise ModelLoadError(f"{folder}: a Marian folder needs source.spm, target.spm and vocab.json; "
                                     f"{name} is missing")
        return MarianTokenizer(folder)
    raise ModelLoadError(f"{folder}: no tokenizer.json" + (" (nor source.spm)" if family == "marian" else ""))


# --- the whole folder ------------------------------------------------------------------------------

@dataclass
class LoadedSeq2Seq:
    model: Seq2SeqModel
    tokenizer: Any  # Seq2SeqTokenizer or MarianTokenizer: encode(text) -> ids, decode(ids) -> text
    generation: GenerationDefaults
    path: Path
    model_type: str  # config.json's
    load_seconds: float = 0.0
    config_raw: dict = field(default_factory=dict, repr=False)


def load_seq2seq(path: str | Path, *, dtype: str | torch.dtype = "float32",
                 device: str | torch.device = "cpu", quantize: str | None = None) -> LoadedSeq2Seq:
    """quantize="int8": the decoder's linear layers and the output head get int8 weights (per
    output channel) on leapllm's CPU kernels (model/quantized/int8.py). The decoder reads every
    weight once per generated token, so its speed is the bytes it reads; the encoder runs once
    over many rows, where the kernels would dequantize to floats anyway, and stays as stored."""
    start = time.perf_counter()
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: an encoder-decoder model is a folder with config.json, *.safetensors "
                             "and a tokenizer")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder}: no config.json")
    raw = _read_json(folder / "config.json")
    config = seq2seq_config(raw, folder)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    model = build_seq2seq(config, read_seq2seq_weights(folder, config.family), torch_dtype, dev, folder)
    if quantize is not None:
        if quantize != "int8":
            raise ModelLoadError(f"unknown quantization {quantize!r}; encoder-decoders support int8")
        if dev.type != "cpu":
            raise ModelLoadError("int8 encoder-decoders run on leapllm's CPU kernels; use --device cpu")
        quantize_linears_int8(model.decoder)
        model.lm_head = Int8Linear.from_linear(model.lm_head)
    tokenizer = load_seq2seq_tokenizer(folder, config.family)
    generation = generation_defaults(raw, folder)
    for name in ("decoder_start_token_id", "pad_token_id", "forced_bos_token_id", "forced_eos_token_id"):
        value = getattr(generation, name)
        if value is not None and not 0 <= value < config.decoder_vocab_size:
            raise ModelLoadError(f"{folder}: {name} {value} is outside the vocabulary ({config.decoder_vocab_size})")
    return LoadedSeq2Seq(model, tokenizer, generation, folder, str(raw["model_type"]),
                         time.perf_counter() - start, raw)
