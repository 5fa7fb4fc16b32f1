#!/usr/bin/env bash
# Gathers, into .whl/ (ignored by git), the wheels a GPU machine needs that its image lacks: DeepSpeed (built
# here from its sdist: no ops compiled, they build on first use there), its hjson and pydantic, WebDataset,
# pycocotools and pytorch-fid, at the versions of this environment, for CPython 3.12 on x86-64. Copy .whl to
# the GPU machine with the checkout (it is ignored, so name it among the paths copied); tools/gpu_check.sh
# installs it there. Run it where the package registry can be reached.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
kit=.whl
mkdir -p "$kit"
version() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
pins=()
for name in hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions webdataset braceexpand \
            pycocotools pytorch-fid; do
  pins+=("$name==$(version "$name")")
done
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$kit" "${pins[@]}"
ds=$(version deepspeed)
if [ ! -f "$kit/deepspeed-$ds-py3-none-any.whl" ]; then
  tmp=$(mktemp -d)
  python -m pip download -q --no-deps --no-binary=:all: -d "$tmp" "deepspeed==$ds"
  DS_BUILD_OPS=0 python -m pip wheel -q --no-deps --no-build-isolation -w "$kit" "$tmp"/deepspeed-*.tar.gz
  rm -rf "$tmp"
fi
du -sh "$kit" && ls "$kit"
