#!/usr/bin/env bash
# The GPU path's checks in one run, on a machine with a CUDA GPU, PyTorch, Triton and transformers,
# and leapllm's other imports (an image without them needs at least gguf and llguidance, as wheels);
# run from the repository root:
#
#   bash benchmarks/gpu_checks.sh OUT_DIR [SHAPE ...]      (shapes: smollm2-135m 1.7b llama-1b llama-8b)
#
# 1. the CUDA-marked tests: the Triton paged-attention kernel against the PyTorch path, replayed
#    decode graphs against --enforce-eager (float32 tokens identical), the model against transformers;
# 2. per shape, `leapllm bench --device cuda --random-weights SHAPE`: leapllm (CUDA graphs, attention
#    in place) against transformers eager and transformers with a static cache + torch.compile, decode
#    b1 and b32, prefill, serve b32, with the decode floor at the measured HBM bandwidth.
# Everything lands in OUT_DIR (logs, bench JSON and markdown named after the GPU and the shape).
set -uo pipefail
out=${1:?usage: gpu_checks.sh OUT_DIR [SHAPE ...]}
shift
shapes=("${@:-smollm2-135m 1.7b}")
mkdir -p "$out"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'EOF' | tee "$out/gpu.txt"
import torch, triton, transformers
print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__,
      "transformers", transformers.__version__)
EOF
gpu=$(head -1 "$out/gpu.txt" | sed -E 's/ torch .*//; s/NVIDIA //; s/[^A-Za-z0-9]+/-/g' | tr 'A-Z' 'a-z')

python3 -m pytest -q -p no:cacheprovider -m cuda tests/kernels/test_paged_attention.py \
    tests/engine/test_decode_graphs.py tests/model/test_reference.py 2>&1 | tee "$out/cuda-tests.log"

for shape in ${shapes[@]}; do
    python3 -m leapllm bench --device cuda --random-weights "$shape" \
        --systems leapllm-bfloat16,hf-bfloat16,hfcompile-bfloat16 \
        --prompt-lens 128,512 --decode-tokens 128 --decode-prompt-len 128 --chat-decode-tokens 0 \
        --batches 32 --batch-decode-tokens 32 --serve-batches 32 --serve-output-tokens 128 --repeats 3 \
        --json "$out/bench-random-$shape-$gpu.json" --markdown "$out/bench-random-$shape-$gpu.md" \
        2>&1 | tee "$out/bench-$shape.log"
done
