#!/usr/bin/env bash
# Build the draft model of the speculative-decoding benchmark with leapllm's own tools:
#   1. the target (the default model) answers 30 chat prompts (greedy; none of them is one of the
#      benchmark's chat prompts), which becomes the distillation text;
#   2. `leapllm distill` trains a shallow student (LAYERS of the target's 30 blocks, evenly spread)
#      to match the target's distributions on that text;
#   3. `leapllm quantize` makes it int4 (head included: a draft's precision matters less than its speed).
# Usage: benchmarks/speculative/make_draft.sh OUT_DIR [LAYERS] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:?usage: make_draft.sh OUT_DIR [LAYERS] [STEPS]}"
LAYERS="${2:-4}"
STEPS="${3:-30}"
LEAPLLM=.venv/bin/leapllm
mkdir -p "$OUT"
TEXT="$OUT/teacher-answers.txt"
.venv/bin/python benchmarks/speculative/teacher_answers.py benchmarks/speculative/draft-training-prompts.txt "$TEXT"
"$LEAPLLM" distill --student "config:layers=$LAYERS" --text "$TEXT" --steps "$STEPS" --seq-len 256 \
    --batch-size 2 -o "$OUT/draft-l$LAYERS"
"$LEAPLLM" quantize --model "$OUT/draft-l$LAYERS" --method int4 -o "$OUT/draft-l$LAYERS-int4"
echo "draft: $OUT/draft-l$LAYERS-int4"
