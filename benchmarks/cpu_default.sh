#!/usr/bin/env bash
# CPU benchmark of the fusion engine on the embedded ShapesWorld model with its defaults (20 steps, CFG 2).
#   bash benchmarks/cpu_default.sh [extra bench flags]
set -euo pipefail
cd "$(dirname "$0")/.."
python -m dfusion_core bench --repeats 9 --prompt "the red circle above the blue square" --json "$@"
