#!/usr/bin/env python
"""Sample images from Stable Diffusion v1, optionally with an ablation (or pruning) delta on top.

    python sample.py --ckpt assets/pretrained_models/sd-v1-4.ckpt \\
        --delta_ckpt logs/<run>/checkpoints/delta_step_100.ckpt --prompt "a painting in the style of van gogh"

The job itself (flags, defaults, checks, outputs) is :mod:`runtime.sample`; ``python sample.py --help``.
"""
from runtime.sample import main

if __name__ == "__main__":
    raise SystemExit(main())
