#!/usr/bin/env python
"""ConceptPrune's erasure benchmarks (artist, nudity, objects, gender, coco, memorization) for any model:

    python benchmark.py artist objects --base assets/pretrained_models/sd-v1-4.ckpt \\
        --delta ablated=logs/<run>/checkpoints/delta_step_400.ckpt --artist "Van Gogh" --target_class "garbage truck"

The job, its suites and outputs: :mod:`evaluation.benchmark` (``python benchmark.py --help``).
"""
from evaluation.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
