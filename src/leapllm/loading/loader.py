"""One entry point to load a model and its tokenizer from any supported path."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from leapllm.errors import ModelLoadError
from leapllm.kernels import cpu_kernels
from leapllm.kernels.packing import release_freed_heap, separate_large_blocks
from leapllm.loading.default_model import default_model_path
from leapllm.loading.gguf_loader import load_gguf
from leapllm.loading.gguf_tensors import GGUFTensor
from leapllm.loading.model_folder import is_model_folder, load_model_folder
from leapllm.loading.safetensors_loader import load_safetensors_folder
from leapllm.loading.weights import build_model
from leapllm.model.config import ModelConfig
from leapllm.model.llama import Transformer
from leapllm.model.quantized.embedding import BlockQuantizedEmbedding
from leapllm.tokenization import Tokenizer

log = logging.getLogger("leapllm.loading")
FLOAT_GGUF_TYPES = ("F32", "F16", "BF16", "F64")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device cuda was asked for, but no CUDA GPU is available")
    if dev.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    return dev


def folder_config(path: str | Path) -> dict | None:
    """A model folder's config.json as a dict, or None where there is no readable one: for the
    checks that pick a loader (is_encoder_folder, is_seq2seq_folder) before anything loads."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return raw if isinstance(raw, dict) else None


def check_state_tensors(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], where,
                        what: str = "tensor") -> None:
    """Every entry of a module's state dict (`expected`) is in `tensors`, with its shape; else one
    ModelLoadError naming the first that is not (the encoders' and encoder-decoders' loaders)."""
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise ModelLoadError(f"{where}: missing {what} {missing[0]} ({len(missing)} missing)")
    for key, value in expected.items():
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise ModelLoadError(f"{where}: {what} {key} has shape {tuple(tensors[key].shape)}, "
                                 f"expected {tuple(value.shape)}")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ModelLoadError(f"unsupported dtype {dtype}; use one of {', '.join(DTYPES)}")
        return dtype
    if dtype in (None, "auto"):
        # float32 is the fast path on CPU; GPUs have bfloat16 tensor cores.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    path: Path
    load_seconds: float
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def release_freed_memory() -> None:
    """Hand the heap that loading freed (per-tensor repacking temporaries) back to the OS: glibc keeps
    freed blocks for reuse, which would leave the process ~50 MB above what the model holds."""
    release_freed_heap()


def dequantization_notice(path: Path, tensors: dict[str, GGUFTensor], dtype: str | torch.dtype | None,
                          compute: torch.dtype, device: torch.device) -> str | None:
    """The one line a user gets when a quantized GGUF loads with dtype "auto" somewhere its blocks do
    not run as stored (a GPU: leapllm's kernels for quantized blocks are CPU kernels): every weight
    becomes `compute`, four times the file's bytes for 4-bit blocks. None otherwise."""
    if dtype not in (None, "auto") or keeps_file_quantization(dtype, device):
        return None
    kinds = sorted({t.type_name for t in tensors.values() if t.type_name not in FLOAT_GGUF_TYPES})
    if not kinds:
        return None
    return (f"{path.name}: its {', '.join(kinds)} weights are dequantized to {str(compute).removeprefix('torch.')} "
            f"on {device} (leapllm runs quantized blocks as stored on CPUs)")


def keeps_file_quantization(dtype: str | torch.dtype | None, device: torch.device) -> bool:
    """Whether a quantized GGUF's weights run as stored: with dtype "auto" on a CPU where leapllm's
    kernels build. An explicit dtype asks for every weight dequantized to it (the float reference)."""
    return dtype in (None, "auto") and device.type == "cpu" and cpu_kernels() is not None


# Tensors whose every value is checked at load: norms, embeddings and the output head in floats, and
# the scales and minimums of quantized weights (a small share of the bytes; a NaN in any of them
# silences the model, as a damaged file showed).
CHECKED_TENSORS = ("norm", "embed_tokens.weight", "lm_head.weight", "packed_scales", "packed_mins", "weight_scale",
                   "scales_and_zeros", "column_scales")


def check_finite_weights(model: torch.nn.Module, path) -> None:
    """Refuse a model whose norms, embeddings, head or quantization scales hold NaN or Inf."""
    checked = [(name, t) for name, t in [*model.named_parameters(), *model.named_buffers()] if t is not None
               and t.is_floating_point() and any(part in name for part in CHECKED_TENSORS)]
    tensors = [t for _, t in checked]
    ext = cpu_kernels()
    if ext is not None and all(t.device.type == "cpu" for t in tensors):
        bad = ext.first_nonfinite(tensors)  # one call for a few hundred small tensors
    else:
        bad = next((i for i, t in enumerate(tensors) if not bool(torch.isfinite(t).all())), -1)
    if bad >= 0:
        raise ModelLoadError(f"{path}: tensor {checked[bad][0]} holds NaN or infinite values (a damaged file?)")
    for name, module in model.named_modules():  # tables kept in a GGUF block type: their scales
        if isinstance(module, BlockQuantizedEmbedding) and not module.all_finite():
            raise ModelLoadError(f"{path}: tensor {name}.rows holds NaN or infinite scales (a damaged file?)")


def load_model(path: str | Path | None = None, dtype: str | torch.dtype | None = "auto",
               device: str | torch.device | None = "auto") -> LoadedModel:
    """Load a GGUF file or a Hugging Face safetensors folder (default: SmolLM2-135M-Instruct).

    A GGUF's quantized weights (the block types of gguf_tensors.KERNEL_FORMATS) stay as stored and
    run on leapllm's CPU kernels with dtype="auto" on CPU (keeps_file_quantization); other types, and
    every weight with an explicit dtype, are dequantized to the compute dtype."""
    start = time.perf_counter()
    path = Path(path).expanduser() if path is not None else default_model_path()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    keep_quantized = False
    metadata: dict[str, Any] = {}
    if is_model_folder(path):  # written by `leapllm quantize`, `prune` or `distill`
        model, meta = load_model_folder(path, torch_dtype, dev)
        check_finite_weights(model, path)
        if dev.type == "cuda" and any(step.get("method") == "2:4" for step in meta.get("history", [])):
            from leapllm.model.sparse import use_semi_structured_kernels

            use_semi_structured_kernels(model)  # 2:4 weights on NVIDIA's sparse tensor cores
        tokenizer = Tokenizer.from_pretrained_dir(path)
        return LoadedModel(model, tokenizer, path, time.perf_counter() - start, meta)
    if path.is_dir():
        config, tensors = load_safetensors_folder(path)
        tokenizer = Tokenizer.from_pretrained_dir(path)
    elif path.is_file():
        config, tensors, metadata = load_gguf(path)
        tokenizer = Tokenizer.from_gguf_metadata(metadata)
        keep_quantized = keeps_file_quantization(dtype, dev)
        if dev.type != "cpu" and (notice := dequantization_notice(path, tensors, dtype, torch_dtype, dev)):
            log.warning(notice)
    else:
        raise ModelLoadError(f"{path}: no such file or folder")
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelLoadError(
            f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}"
        )
    with separate_large_blocks():
        model = build_model(config, tensors, torch_dtype, dev, str(path), keep_quantized)
    check_finite_weights(model, path)
    # Large metadata arrays (the vocabulary) are already inside the tokenizer.
    metadata = {k: v for k, v in metadata.items() if not isinstance(v, list) or len(v) < 64}
    del tensors  # the file's memory map with them
    # The heap's freed blocks back to the OS; no garbage collection: a full one took a fifth of the
    # default model's load, and the load leaves no reference cycles holding memory.
    release_freed_heap(collect=False)
    return LoadedModel(model, tokenizer, path, time.perf_counter() - start, metadata)
