#!/usr/bin/env python
"""Evaluate ablated models: generate with every delta checkpoint of one or more training
runs and with the base model, then score CLIP score / CLIP accuracy, KID and FID (and, for
memorization, the SSCD memorization rate).

    python evaluate.py --root logs/<run> --concept_type style --caption_target "van gogh"
    python evaluate.py --root logs --concept_type object --caption_target "grumpy cat" --eval_stage

The protocol, its settings and its outputs: :mod:`evaluation.protocol` (``python evaluate.py --help``).
"""
from evaluation.protocol import main

if __name__ == "__main__":
    raise SystemExit(main())
