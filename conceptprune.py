#!/usr/bin/env python
"""ConceptPrune on our Stable Diffusion v1: three steps.

1. discover -- record ff.net.2 input norms for a concept's base and target prompts (PLMS, CFG,
   empty negative prompt, seed 0 before every generation; gender pairs: one seed per pair in 0..249),
   score |W|*||X_j|| and keep per output row
   the top-k (k = int(skill_ratio * in_features)) target scores where target > base::

       python conceptprune.py discover --concept "Van Gogh" --ckpt assets/pretrained_models/sd-v1-4.ckpt \\
           --outdir logs/prune/van_gogh [--skill_ratio 0.01]

   writes ``{outdir}/norms-{key}.safetensors`` (the norms, reused when the same prompts, settings and
   checkpoint come again: ``key`` hashes all of them; a new skill_ratio only recomputes masks),
   ``{outdir}/masks_sr{skill_ratio}.safetensors`` (per-(call, layer) masks, format in
   ``prune/wanda.py``), ``{outdir}/discover.json`` and the first images ``{outdir}/images/{base,target}_{i}.png``.

2. check -- sample the target prompts with and without the per-call masks (hooks; every call t
   uses mask t) and save side-by-side images ``{outdir}/check/{i:03d}.png`` (left original, right
   pruned) with ``{outdir}/check/prompts.txt``::

       python conceptprune.py check --masks logs/prune/van_gogh/masks_sr0.01.safetensors --ckpt ... --outdir ...

3. prune -- union of the masks over the first tau calls (several mask files: several concepts, one
   union), zero those ff.net.2 weights and save a delta checkpoint (only the changed weights, CompVis
   keys; with --delta_ckpt the input delta's tensors are carried over) for sample.py/evaluate.py::

       python conceptprune.py prune --masks a/masks_sr0.01.safetensors b/masks_sr0.02.safetensors \\
           --ckpt ... [--tau 10] --out logs/prune/delta_pruned.ckpt

   --tau defaults to each concept family's tau; one value applies to every mask file.
   With ``--out {run}/checkpoints/delta_pruned.ckpt`` the model config is saved to ``{run}/configs/``, so that
   ``evaluate.py --root {run} --filter 'delta_pruned*'`` scores it like an ablation run.
"""
from prune.jobs import main

if __name__ == "__main__":
    raise SystemExit(main())
