#!/usr/bin/env python
"""ConceptPrune on Stable Diffusion v1 in three steps (discover skilled ff.net.2 weights, check, prune):

    python conceptprune.py discover --concept "Van Gogh" --ckpt assets/pretrained_models/sd-v1-4.ckpt \\
        --outdir logs/prune/van_gogh [--skill_ratio 0.01]
    python conceptprune.py prune --masks logs/prune/van_gogh/masks_sr0.01.safetensors --ckpt ... \\
        --out logs/prune/van_gogh/checkpoints/delta_pruned.ckpt

The jobs, their outputs and file formats: :mod:`prune.jobs` (``python conceptprune.py --help``).
"""
from prune.jobs import main

if __name__ == "__main__":
    raise SystemExit(main())
