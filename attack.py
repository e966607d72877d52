#!/usr/bin/env python
"""Attack erased models and measure how often the concept comes back (UnlearnDiffAtk, P4D, Ring-A-Bell, concept
inversion; ``none`` is the pre-attack baseline)::

    python attack.py --attack unlearndiff --concept nudity --prompts nudity.csv --delta pruned=delta_pruned.ckpt

The job, its concept presets and outputs: :mod:`attacks.job` (``python attack.py --help``).
"""
from attacks.job import main

if __name__ == "__main__":
    raise SystemExit(main())
