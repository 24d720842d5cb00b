"""Check the tests' GGUF writer against llama.cpp's own converter, family by family.

tests/model/test_families.py writes each family's tiny random model as a GGUF with
tests/tiny_models.write_family_gguf (so CI needs no llama.cpp checkout). This script converts the
same folders with llama.cpp's `convert_hf_to_gguf.py` and shows that leapllm reads both files to the
same config and the same logits as the safetensors folder.

Usage (from the repository root; llama.cpp's source, e.g. the `vendor/llama.cpp` folder of the
llama-cpp-python sdist, with its `gguf-py`; the converter also imports sentencepiece):

    PYTHONPATH=. .venv/bin/python benchmarks/convert_family_ggufs.py LLAMA_CPP_DIR OUT_DIR

The tiny Gemma 2's query_pre_attn_scalar (24) differs from its head_dim (16), which the converter
does not write (llama.cpp derives it: head_dim, or hidden / heads for the 27B); the tests' writer
adds `gemma2.attention.scale`, so there the two files differ in attention_scale, as expected.

Gemma 2 and Phi-3's converters read a SentencePiece `tokenizer.model`; for those a small one is
trained on the prompts' text and the converter pads its vocabulary to the model's, so their logits
are compared on token ids alone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from leapllm.loading.default_model import default_model_path
from leapllm.loading.loader import load_model
from tests.model.prompts import PROMPTS
from tests.tiny_models import FAMILY_CONFIGS, write_family_folder, write_family_gguf

NEEDS_SENTENCEPIECE = ("gemma2", "phi3")
# Config fields that describe the computation (not the file's name, format or stored types).
IGNORED_FIELDS = ("name", "extra", "architecture", "context_length")


def train_sentencepiece(folder: Path) -> None:
    import sentencepiece as spm

    text = folder / "sp-train.txt"
    text.write_text("\n".join(PROMPTS.values()))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "tokenizer"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, minloglevel=2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("llama_cpp", type=Path, help="llama.cpp source folder (convert_hf_to_gguf.py, gguf-py)")
    parser.add_argument("out", type=Path, help="where the folders and GGUF files go")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    gguf_path = default_model_path()
    hf_tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    env = os.environ | {"PYTHONPATH": str(args.llama_cpp / "gguf-py")}
    print("| family | converter's GGUF vs folder, max abs logit diff | tests' writer vs converter: same config |")
    print("|---|---|---|")
    failed = 0
    for family in FAMILY_CONFIGS:
        folder = write_family_folder(args.out / family, hf_tokenizer, family)
        if family in NEEDS_SENTENCEPIECE:
            train_sentencepiece(folder)
        converted = args.out / f"{family}-converter.gguf"
        run = subprocess.run([sys.executable, str(args.llama_cpp / "convert_hf_to_gguf.py"), str(folder),
                              "--outfile", str(converted), "--outtype", "f32"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if run.returncode:
            print(f"| {family} | the converter refuses it: {run.stderr.strip().splitlines()[-1]} | - |")
            continue
        ours = write_family_gguf(folder, args.out / f"{family}-tests.gguf", gguf_path)
        reference = load_model(folder, "float32", "cpu")
        from_converter = load_model(converted, "float32", "cpu")
        from_ours = load_model(ours, "float32", "cpu")
        ids = reference.tokenizer.encode(PROMPTS["emoji"])
        if family == "mistral":  # the converter writes Mistral as "llama", without its window
            ids = ids[:reference.config.sliding_window]
        with torch.inference_mode():
            diff = (from_converter.model(torch.tensor([ids])) - reference.model(torch.tensor([ids]))).abs().max().item()

        def computation(config):
            fields = asdict(config)
            return {k: v for k, v in fields.items() if k not in IGNORED_FIELDS}

        a, b = computation(from_converter.config), computation(from_ours.config)
        differ = sorted(k for k in a if a[k] != b[k])
        failed += diff > 1e-4 or bool(differ)
        print(f"| {family} | {diff:.2e} | {'yes' if not differ else 'no: ' + ', '.join(differ)} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
