"""Convert a Hugging Face TensorFlow BERT checkpoint (config.json + tf_model.h5) to a safetensors folder.

    python benchmarks/convert_keras_bert.py SRC_FOLDER OUT_FOLDER --vocab vocab.txt [--lowercase] [--labels FILE]

Some models on PyPI ship only Keras weights: the `categorium` package's topic classifiers are
`TFBertForSequenceClassification` checkpoints with a WordPiece vocabulary and a label list beside them.
This reads the HDF5 file as data (h5py; no Keras, no code from the package), renames each weight to
its PyTorch name (`layer_._0` -> `layer.0`, `kernel` -> `weight` transposed to (out, in), `gamma` /
`beta` -> `weight` / `bias`, `embeddings` -> `weight`), and writes model.safetensors, config.json
(with the labels' names, when given: one per line, an optional header line naming no label) and a
tokenizer.json built from the vocabulary by the `tokenizers` library (BERT's WordPiece).

The categorium example, as benchmarks/README.md runs it:

    pip download --no-deps categorium==0.2.2 -d downloads && tar xzf downloads/categorium-0.2.2.tar.gz -C downloads
    M=downloads/categorium-0.2.2/categorium/modelos/en
    python benchmarks/convert_keras_bert.py $M/en_hultig_model categorium-en \\
        --vocab $M/hultig-bert-token-uncased_en-vocab.txt --lowercase --labels $M/en_categorias.csv --labels-header
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def pytorch_name(tf_name: str) -> tuple[str, bool]:
    """A TF weight's path in the h5 file -> (its PyTorch name, whether to transpose it).

    'bert/tf_bert_for_sequence_classification/bert/encoder/layer_._0/attention/self/query/kernel:0'
    -> ('bert.encoder.layer.0.attention.self.query.weight', True)
    """
    name = tf_name.rsplit(":", 1)[0]
    # The first levels are Keras' layer group and the model's scope ("tf_bert_for_..."); drop them.
    name = re.sub(r"^(?:[^/]+/)?tf_[a-z_]+/", "", name)
    name = re.sub(r"layer_\._(\d+)", r"layer.\1", name).replace("/", ".")
    if name.endswith(".kernel"):
        return name[: -len("kernel")] + "weight", True
    for tf_suffix, torch_suffix in ((".gamma", ".weight"), (".beta", ".bias"), (".embeddings", ".weight")):
        if name.endswith(tf_suffix):
            return name[: -len(tf_suffix)] + torch_suffix, False
    return name, False


def read_keras_weights(h5_path: Path) -> dict[str, torch.Tensor]:
    import h5py

    tensors: dict[str, torch.Tensor] = {}

    def visit(name: str, obj) -> None:
        if isinstance(obj, h5py.Dataset):
            torch_name, transpose = pytorch_name(name)
            array = np.asarray(obj)
            tensors[torch_name] = torch.from_numpy(np.ascontiguousarray(array.T if transpose else array))

    with h5py.File(h5_path, "r") as f:
        f.visititems(visit)
    return tensors


def bert_tokenizer_json(vocab: Path, lowercase: bool) -> str:
    from tokenizers import BertWordPieceTokenizer

    return BertWordPieceTokenizer(str(vocab), lowercase=lowercase).to_str()


def read_labels(path: Path, header: bool) -> list[str]:
    lines = [line.strip().lstrip("\ufeff") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[1:] if header else lines


def convert(src: Path, out: Path, vocab: Path, lowercase: bool, labels: list[str] | None = None) -> Path:
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    if labels is not None:
        if len(labels) != len(config.get("id2label", {})):
            raise SystemExit(f"{len(labels)} labels for a model with {len(config.get('id2label', {}))} outputs")
        config["id2label"] = {str(i): label for i, label in enumerate(labels)}
        config["label2id"] = {label: i for i, label in enumerate(labels)}
    tensors = read_keras_weights(src / "tf_model.h5")
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "tokenizer.json").write_text(bert_tokenizer_json(vocab, lowercase), encoding="utf-8")
    shutil.copy(vocab, out / "vocab.txt")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": lowercase, "model_max_length":
         config.get("max_position_embeddings", 512)}, indent=2), encoding="utf-8")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="folder with config.json and tf_model.h5")
    p.add_argument("out", type=Path, help="folder to write")
    p.add_argument("--vocab", type=Path, required=True, help="the WordPiece vocabulary (vocab.txt)")
    p.add_argument("--lowercase", action="store_true", help="an uncased vocabulary")
    p.add_argument("--labels", type=Path, help="the labels' names, one per line, in output order")
    p.add_argument("--labels-header", action="store_true", help="the labels file starts with a header line")
    args = p.parse_args()
    labels = read_labels(args.labels, args.labels_header) if args.labels else None
    out = convert(args.src, args.out, args.vocab, args.lowercase, labels)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
