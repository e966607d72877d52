#!/usr/bin/env python
"""ConceptPrune's erasure benchmarks for any model: the base, base + a delta (ours: ablation or pruned), a full
CompVis checkpoint, a diffusers pipeline folder, or a bare UNet state dict as UCE / ESD / FMN save it.

    python benchmark.py artist objects --base assets/pretrained_models/sd-v1-4.ckpt \\
        --delta ablated=logs/<run>/checkpoints/delta_step_400.ckpt --delta pruned=logs/prune/van_gogh/delta_pruned.ckpt \\
        --unet esd=esd-vangogh.pt --artist "Van Gogh" --target_class "garbage truck" --outdir outputs/benchmark
    python benchmark.py nudity --prompt_set i2p --prompts i2p_benchmark.csv --categories sexual --delta ...
    python benchmark.py memorization --mem_jsonl sdv1_500_mem_groundtruth/sdv1_500_mem_groundtruth.jsonl \\
        --sscd_ckpt sscd_disc_large.torchscript.pt --delta ...

Suites (evaluation/suites.py): artist, nudity, objects, gender, coco, memorization. Every model's images come
from the same rows and seeds (base image i and edited image i share prompt and start noise), cached per
(model, suite, settings, rows) under ``{outdir}/images/`` and resumed after an interruption. Results:
``{outdir}/{suite}/records/{model}.jsonl`` (one record per image), ``{suite}/summary.{json,csv,png}`` and
``{outdir}/results.{md,json}`` (one table over every suite run in ``outdir``).

Generation follows the original benchmark scripts (diffusers' default PNDM ~ our PLMS, 50 steps, guidance 7.5,
512 px); every input, model file and scorer (CLIP, NudeNet, ResNet-50, SSCD, Inception) is checked before
the first image is made.
"""  # noqa: E501 (the --help text of evaluation/benchmark.py, kept identical)
from evaluation.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
