"""A GGUF with a real model's shapes and random weights, for speed figures of a family no PyPI package
ships a model of (speed does not depend on the weights' values; routing aside, for experts).

    PYTHONPATH=. .venv/bin/python benchmarks/random_family_gguf.py qwen3-0.6b OUT.gguf [--qtype Q8_0]

The shapes are the real model's, but for the vocabulary: it is the default model's 49,152 tokens (its
tokenizer is the one written into the file), so the output head is smaller than the real one.
The folder is written by transformers and converted as tests/tiny_models.write_family_gguf does.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from gguf import GGMLQuantizationType

from leapllm.loading.default_model import default_model_path
from tests.tiny_models import write_family_folder, write_family_gguf

SHAPES = {
    # Qwen/Qwen3-0.6B's config.json
    "qwen3-0.6b": ("qwen3", dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                 tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                            "rope_theta": 1000000.0})),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out", type=Path)
    parser.add_argument("--qtype", default="Q8_0", help="a GGML type the gguf package quantizes (default Q8_0)")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    gguf_path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    family, shape = SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as folder:
        write_family_folder(Path(folder), tokenizer, family, **shape)
        write_family_gguf(Path(folder), args.out, gguf_path, GGMLQuantizationType[args.qtype])
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
