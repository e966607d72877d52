#!/usr/bin/env python
"""Concept ablation training (Kumari et al., ICCV 2023) on Stable Diffusion v1.

    python train.py -t --gpus 0,1 --concept_type style --caption_target "van gogh" \\
        --prompts assets/finetune_prompts/painting.txt --name vangogh_painting --train_size 200

Steps, top to bottom: check every input (cheap, before any model is built); generate the anchor
images with the base model (resumable; memorization also scores paraphrases with SSCD); build the
model and pick the trained weights; train with Lightning; write delta checkpoints
``{logdir}/{timestamp}_{name}/checkpoints/delta_step_{N}.ckpt`` beside the run's merged config.
Extra ``key.sub=value`` arguments override the merged config (e.g. ``training.max_steps=50``).

The job itself is ``ablation.train`` (``TrainSettings``, ``run``); this file is its command line.
"""
from ablation.train import main

if __name__ == "__main__":
    raise SystemExit(main())
