"""benchmarks/convert_keras_bert.py: a Keras (TF) BERT checkpoint becomes a safetensors folder with the
same weights, labels and tokenization (the route of the real classifier in benchmarks/README.md)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "convert_keras_bert.py"
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "##s", "dog", "ran"]


def load_script():
    spec = importlib.util.spec_from_file_location("convert_keras_bert", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_keras_checkpoint(model, folder: Path) -> None:
    """The model's weights laid out as transformers' TFBertForSequenceClassification saves them."""
    h5py = pytest.importorskip("h5py")
    folder.mkdir()
    model.config.to_json_file(folder / "config.json")
    with h5py.File(folder / "tf_model.h5", "w") as f:
        for name, tensor in model.state_dict().items():
            if name.endswith("position_ids"):
                continue
            array = tensor.numpy()
            tf = name.replace(".", "/")
            tf = tf.replace("layer/", "layer_._")
            if tf.endswith("LayerNorm/weight"):
                tf = tf[: -len("weight")] + "gamma"
            elif tf.endswith("LayerNorm/bias"):
                tf = tf[: -len("bias")] + "beta"
            elif tf.endswith(("position_embeddings/weight", "token_type_embeddings/weight")):
                tf = tf[: -len("weight")] + "embeddings"
            elif tf.endswith("weight") and "word_embeddings" not in tf:
                tf, array = tf[: -len("weight")] + "kernel", array.T
            group = tf.split("/", 1)[0]
            f.create_dataset(f"{group}/tf_bert_for_sequence_classification/{tf}:0", data=array)


def test_a_keras_bert_classifier_converts_to_the_same_weights_labels_and_tokens(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    write_keras_checkpoint(model, tmp_path / "keras")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    labels = tmp_path / "labels.csv"
    labels.write_text("\ufeffcat\nanimals\nfurniture\nsport\n", encoding="utf-8")

    script = load_script()
    out = script.convert(tmp_path / "keras", tmp_path / "out", vocab, lowercase=True,
                         labels=script.read_labels(labels, header=True))

    converted = transformers.BertForSequenceClassification.from_pretrained(out).eval()
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    got = converted.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "animals", "1": "furniture", "2": "sport"}
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    assert tokenizer("The cats sat")["input_ids"] == [2, 5, 6, 10, 7, 3]


def test_tf_names_map_to_pytorch_names():
    script = load_script()
    assert script.pytorch_name("bert/tf_bert_for_sequence_classification/bert/encoder/layer_._1/attention/self/"
                               "query/kernel:0") == ("bert.encoder.layer.1.attention.self.query.weight", True)
    assert script.pytorch_name("bert/tf_bert_for_sequence_classification/bert/embeddings/LayerNorm/gamma:0") == \
        ("bert.embeddings.LayerNorm.weight", False)
    assert script.pytorch_name("classifier/tf_bert_for_sequence_classification/classifier/bias:0") == \
        ("classifier.bias", False)
