#!/usr/bin/env python
"""Concept ablation training (Kumari et al., ICCV 2023) on Stable Diffusion v1, the paper's command:

    python train.py -t --gpus 0,1 --concept_type style --caption_target "van gogh" \\
        --prompts assets/finetune_prompts/painting.txt --name vangogh_painting --train_size 200

The job, its steps and outputs: :mod:`ablation.train` (``python train.py --help``).
"""
from ablation.train import main

if __name__ == "__main__":
    raise SystemExit(main())
