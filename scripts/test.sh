#!/usr/bin/env bash
# The test suite and the TensorRT type check (expects scripts/setup.sh to have run).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
python -m pytest -q -rs "$@"
if [ -f typecheck/run.sh ]; then bash typecheck/run.sh; fi
