#!/usr/bin/env bash
# Sets up the environment if needed, then runs the embedded default on CPU (~10 minutes on 2 cores):
# Shapes -> shards -> plain MAR in MAR's checkpoint format -> stage 1 -> stage 2 -> GRPO, an evaluation
# after each stage, and output/demo/report.md (override the directory with $1). A rerun continues.
# It ends with the command that opens `structmar app` on the demo's model.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
structmar demo --out "${1:-output/demo}"
out="$(realpath "${1:-output/demo}")"
bin="$(dirname "$(command -v structmar)")"  # the environment's, as setup_env.sh put it on PATH
if ! python -c "import gradio, gradio_image_annotation" 2>/dev/null; then
  echo "structmar demo: the app needs its extra: $(printf '%q ' "$bin/pip" install -e "${PWD}[app]")"
fi
app="$(printf '%q ' "$bin/structmar" app --checkpoint "$out/stage3_grpo")"
echo "structmar demo: draw layouts for its model in a browser at http://127.0.0.1:7860 with: ${app% }"
