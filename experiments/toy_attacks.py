"""The toy world as a concept preset of the attack job (``attack.py --concept toy:CONCEPT``), registered by name in
``attacks.concepts.PLUGINS``.

============================  ===============================================  ===================================
CONCEPT                       prompts (seed ``--seed`` + row; ``--prompts``     success (the ground-truth judge)
                              a one-per-line file instead)
============================  ===============================================  ===================================
stripes, polka dots,          the texture's evaluation prompts (36,            the judge's style head names the
checkerboard                  ``assets/toyworld/eval_prompts``)                 texture
grumpy cat, sleepy cat,       the cat evaluation prompts (24) with the         the judge's subject head names the
happy cat                     variant in place of "cat"                         variant
waves                         the FFN experiment's waves prompts (36)          the waves detector fires
                                                                               (``experiments.ffn.style_of``)
============================  ===============================================  ===================================

``Concept.pairs`` (for Ring-A-Bell's concept direction) pair each concept prompt with the same prompt without
the concept: the anchor's evaluation prompt (textures), "cat" (cat variants), ConceptPrune's waves base prompts.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from toyworld.mission import ASSETS
from toyworld.render import FFN_TEXTURES, HARD_NEGATIVES, INSTANCE, TEXTURES

CATS = (INSTANCE, *HARD_NEGATIVES)
CONCEPTS = (*TEXTURES, *CATS, *FFN_TEXTURES)


def _lines(path: Path) -> list[str]:
    from runtime.files import read_prompts

    return read_prompts(path)


def prompts_and_pairs(concept: str, assets: Path = ASSETS) -> tuple[list[str], list[tuple[str, str]]]:
    """The default prompts of ``concept`` and its (with, without) prompt pairs."""
    if concept in TEXTURES:
        target = _lines(assets / "eval_prompts" / f"{concept.replace(' ', '_')}_eval.txt")
        return target, list(zip(target, _lines(assets / "eval_prompts" / "painting_eval.txt")))
    if concept in CATS:
        cats = _lines(assets / "eval_prompts" / "cat_eval.txt")
        target = [re.sub(r"\bcat\b", concept, p) for p in cats]
        return target, list(zip(target, cats))
    target = _lines(assets / "ffn" / "eval_prompts" / f"{concept}_eval.txt")
    pairs = list(zip(_lines(assets / "prune_prompts" / f"{concept}_target.txt"),
                     _lines(assets / "prune_prompts" / f"{concept}_base.txt")))
    return target, pairs


def judge_for(concept: str, assets: Path = ASSETS):
    """The judge of ``concept``: uint8 images -> [{"success", "saw"}] (the judge's style or subject; the waves
    detector's verdict for waves)."""
    from PIL import Image

    from toyworld.judge import classify, load_judge

    judge = load_judge(assets / "judge" / "judge.safetensors")
    detector = None
    if concept in FFN_TEXTURES:
        from experiments.ffn import load_detector

        detector = load_detector(assets / "ffn" / "waves_detector.safetensors")
    head = "subject" if concept in CATS else "style"

    def judge_images(images):
        pils = [Image.fromarray(np.asarray(im, dtype=np.uint8)) for im in images]
        if detector is not None:
            from experiments.ffn import style_of

            seen = style_of(judge, detector, pils)
        else:
            seen = [row[head] for row in classify(judge, pils)]
        return [{"success": s == concept, "saw": s} for s in seen]

    return judge_images


def preset(arg: str, settings):
    """``--concept toy:CONCEPT`` (``attacks.concepts`` calls it with the job's settings)."""
    from attacks.base import Concept
    from attacks.concepts import Preset, file_rows
    from evaluation.prompt_sets import Row

    concept = arg.lower()
    if concept not in CONCEPTS:
        raise ValueError(f"--concept toy:{arg}: unknown toy concept; the toy concepts are: {', '.join(CONCEPTS)}")
    prompts, pairs = prompts_and_pairs(concept)
    if settings.prompts:
        rows = file_rows(Path(settings.prompts), settings.seed)
    else:
        rows = [Row(f"toy-{i:03d}", p, settings.seed + i) for i, p in enumerate(prompts)]
    what = "the waves detector" if concept in FFN_TEXTURES else \
        f"the ground-truth judge's {'subject' if concept in CATS else 'style'} head"
    return Preset(f"toy:{concept}", rows, Concept(concept, tuple(pairs)), judge_for(concept),
                  f"{what} sees {concept!r}", {"judge": "toyworld", "concept": concept})
