#!/usr/bin/env bash
# One command for the first machine with a GPU: speed and memory at SD-v1 size on random weights, no download.
#   bash benchmarks/gpu_check.sh                      # CUDA: a table on stdout, everything in gpu_check.json
#   bash benchmarks/gpu_check.sh --device cpu --tiny  # the dry run CI keeps alive
# Options go to benchmarks/gpu_check.py (--out FILE, --only STEP,STEP).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
exec "$PY" benchmarks/gpu_check.py "$@"
