#!/usr/bin/env bash
# Sets up the environment if needed, then runs the embedded default on CPU: the Shapes dataset
# (COCO 2014 layout) under output/demo (override with $1).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
out="${1:-output/demo}"
structmar shapes --out "$out/shapes" --num_train 2000 --num_val 256 --image_size 32 --seed 0 --overwrite
echo "structmar: Shapes written to $out/shapes (COCO 2014 layout)"
