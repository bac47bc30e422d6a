#!/usr/bin/env bash
# GPU benchmark of the fusion engine on an SD 1.5-shaped pipeline with random weights (no download):
# fp16, 512x512, 20 DDIM steps, CFG 5. Prints one JSON object: plain / fused pair / cached re-fusion
# seconds, their ratios to a plain image, and peak GPU memory of each phase.
#   bash benchmarks/gpu_sd15.sh [extra bench flags]
set -euo pipefail
cd "$(dirname "$0")/.."
python -m dfusion_core bench --model tiny:sd15-full --device cuda --dtype fp16 --height 512 --width 512 \
    --steps 20 --cfg 5 --repeats 5 --prompt "a dog driving a car" --json "$@"
