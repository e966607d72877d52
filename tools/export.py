#!/usr/bin/env python
"""Merge a base checkpoint and an ablation delta into one full checkpoint (optionally a diffusers folder).

    python tools/export.py --ckpt assets/pretrained_models/sd-v1-4.ckpt \\
        --delta_ckpt logs/<run>/checkpoints/delta.ckpt --out ablated.safetensors \\
        [--config CFG] [--half] [--diffusers OUT_DIR] [--scheduler ddim|pndm]

The job itself (flags, defaults, checks, outputs) is :mod:`runtime.export`; ``python tools/export.py --help``.
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as tools/export.py: the repository's packages
    sys.path.insert(0, str(REPO))

from runtime.export import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
