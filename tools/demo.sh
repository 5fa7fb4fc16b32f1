#!/usr/bin/env bash
# Sets up the environment if needed, then runs the embedded default on CPU (~10 minutes on 2 cores):
# Shapes -> shards -> plain MAR in MAR's checkpoint format -> stage 1 -> stage 2 -> GRPO, an evaluation
# after each stage, and output/demo/report.md (override the directory with $1). A rerun continues.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
structmar demo --out "${1:-output/demo}"
