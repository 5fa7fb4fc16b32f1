#!/usr/bin/env bash
# Creates the virtual environment (.venv, or $STRUCTMAR_VENV) if absent and installs structmar into it.
# Sourced by tools/demo.sh and tools/test.sh; reinstalls only when setup.py changes.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${STRUCTMAR_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "structmar: creating virtual environment $venv" >&2
  "$python" -m venv "$venv"
fi
stamp="$venv/.structmar-installed"
want="$(sha256sum "$repo/setup.py" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "structmar: installing structmar and its dependencies into $venv (first run: several minutes)" >&2
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -e "$repo[dev]"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
cd "$repo"
