#!/usr/bin/env bash
# Sets up the environment if needed, then runs the whole test suite on CPU (extra arguments go to pytest);
# it ends with the 15 slowest tests, to keep the suite's budget in view.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
ruff check structmar tests gpu_tests tools
exec python -m pytest -q -p no:cacheprovider --timeout 900 --durations 15 "$@"
