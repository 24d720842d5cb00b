"""benchmarks/convert_onnx_bert.py: a BERT token classifier exported to ONNX and block-quantized by
onnxruntime's tools becomes a safetensors folder with the same (dequantized) weights (the route of
the real NER model in benchmarks/README.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "convert_onnx_bert.py"
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "john", "smith", "lives", "in", "paris", "##s", "."]


def load_script():
    spec = importlib.util.spec_from_file_location("convert_onnx_bert", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def matmul_nbits(weight: torch.Tensor, rng: np.random.Generator, zero_points: bool):
    """Random 4-bit blocks of 32 along the input features standing in for `weight` (N, K): the packed
    bytes (low nibble first), float scales, packed zero points or None (then 8), and the exact floats."""
    n, k = weight.shape
    q = rng.integers(0, 16, (n, k // 32, 32), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.02, (n, k // 32)).astype(np.float32)
    zero = rng.integers(0, 16, (n, k // 32), dtype=np.uint8) if zero_points else np.full((n, k // 32), 8, np.uint8)
    values = ((q.astype(np.float32) - zero[..., None]) * scales[..., None]).reshape(n, k)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    zp = None
    if zero_points:
        padded = np.concatenate([zero, np.zeros((n, (k // 32) % 2), np.uint8)], axis=1)
        zp = (padded[:, 0::2] | (padded[:, 1::2] << 4)).reshape(-1)
    return packed, scales.reshape(-1), zp, torch.from_numpy(values)


def write_quantized_onnx(model, path: Path) -> None:
    """The model as onnxruntime's quantizer leaves a transformers export: MatMulNBits for the encoder's
    linear layers (named by their module path), a float MatMul for the classifier, uint8 embedding
    tables with a scale and zero point, biases and LayerNorms as float initializers under their names.
    The model's weights are set to the values the file stands for."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes = [], []
    state = model.state_dict()
    for name, tensor in state.items():
        if name.endswith("position_ids"):
            continue
        module = name.rsplit(".", 1)[0]
        if "embeddings" in name and name.endswith(".weight") and "LayerNorm" not in name:
            q = rng.integers(0, 256, tensor.shape, dtype=np.uint8)
            scale, zero = np.float32(0.01), np.uint8(128)
            inits += [numpy_helper.from_array(q, name + "_quantized"),
                      numpy_helper.from_array(np.array(scale), name + "_scale"),
                      numpy_helper.from_array(np.array(zero), name + "_zero_point")]
            gathered = f"/{module.replace('.', '/')}/Gather_output_0"
            nodes.append(helper.make_node("DequantizeLinear", [gathered + "_quantized", name + "_scale",
                                                               name + "_zero_point"], [gathered]))
            tensor.copy_(torch.from_numpy((q.astype(np.float32) - 128) * scale))
        elif name.endswith(".weight") and tensor.dim() == 2 and module == "classifier":
            w = tensor.T.numpy().copy()  # (in, out): MatMul's second input
            inits.append(numpy_helper.from_array(w, "onnx::MatMul_99"))
            nodes.append(helper.make_node("MatMul", ["x", "onnx::MatMul_99"], ["logits"], name="/classifier/MatMul"))
        elif name.endswith(".weight") and tensor.dim() == 2:
            n, k = tensor.shape
            index = len(nodes)
            packed, scales, zp, values = matmul_nbits(tensor, rng, zero_points=index % 2 == 1)
            inputs = ["x", f"onnx::MatMul_{index}_Q4", f"onnx::MatMul_{index}_scales"]
            inits += [numpy_helper.from_array(packed, inputs[1]), numpy_helper.from_array(scales, inputs[2])]
            if zp is not None:
                inputs.append(f"onnx::MatMul_{index}_zp")
                inits.append(numpy_helper.from_array(zp, inputs[3]))
            nodes.append(helper.make_node("MatMulNBits", inputs, [f"y{index}"], name="/" + module.replace(".", "/")
                                          + "/MatMul_Q4", domain="com.microsoft", K=k, N=n, bits=4, block_size=32))
            tensor.copy_(values)
        else:
            inits.append(numpy_helper.from_array(tensor.numpy().copy(), name))
    graph = helper.make_graph(nodes, "bert", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, 3])], inits)
    onnx.save(helper.make_model(graph), str(path))


def test_a_quantized_onnx_bert_token_classifier_converts_to_the_weights_it_stands_for(tmp_path):
    pytest.importorskip("onnx")
    transformers = pytest.importorskip("transformers")
    labels = {0: "O", 1: "B-PER", 2: "I-PER"}
    config = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=32, num_labels=3,
                                     id2label=labels, label2id={v: k for k, v in labels.items()})
    torch.manual_seed(0)
    model = transformers.BertForTokenClassification(config).eval()
    source = tmp_path / "package"
    (source / "onnx").mkdir(parents=True)
    with torch.no_grad():
        write_quantized_onnx(model, source / "onnx" / "model_q4.onnx")
    config.architectures = ["BertForTokenClassification"]
    config.to_json_file(source / "config.json")
    (source / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    from tokenizers import BertWordPieceTokenizer
    BertWordPieceTokenizer(str(source / "vocab.txt"), lowercase=True).save(str(source / "tokenizer.json"))

    out = load_script().convert(source / "onnx" / "model_q4.onnx", tmp_path / "out")

    converted = transformers.BertForTokenClassification.from_pretrained(out).eval()
    got = converted.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(got[name], tensor), name
    for name in ("vocab.txt", "tokenizer.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()

    from leapllm.encoders.task_heads import load_task

    ner = load_task(out, "token-classification")
    job = ner.prepare(["john smith lives in paris ."], aggregation_strategy="simple")
    ids = torch.tensor([job.features[0].ids])
    with torch.inference_mode():
        expected = converted(input_ids=ids).logits[0].numpy()
    assert np.abs(ner.forward(job.features)[0] - expected).max() < 1e-4


def test_onnx_node_paths_name_the_pytorch_weights():
    script = load_script()
    assert script.weight_name("/bert/encoder/layer.3/attention/self/query/MatMul_Q4") == \
        "bert.encoder.layer.3.attention.self.query.weight"
    assert script.weight_name("/classifier/MatMul") == "classifier.weight"


def test_matmul_nbits_blocks_dequantize_with_their_default_and_packed_zero_points():
    script = load_script()
    packed = np.array([[[0x21] + [0] * 15]], dtype=np.uint8)  # values 1, 2, then zeros
    scales = np.array([0.5], dtype=np.float32)
    w = script.dequantize_matmul_nbits(packed, scales, None, n=1, k=32, bits=4, block_size=32)
    assert w[0, :3].tolist() == [(1 - 8) * 0.5, (2 - 8) * 0.5, -4.0]
    w = script.dequantize_matmul_nbits(packed, scales, np.array([0x03], np.uint8), n=1, k=32, bits=4, block_size=32)
    assert w[0, :3].tolist() == [-1.0, -0.5, -1.5]
