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

:func:`run` (``python -m experiments.toy_attacks``) runs the attack job on the toy model for several concepts into
one folder, so ``{out}/results.md`` is one table over concepts and attacks::

    python -m experiments.toy_attacks --attack none --concepts stripes "grumpy cat" \
        --delta ca-style=outputs/toyworld-benchmark/logs/<run>/checkpoints/delta_step_100.ckpt --out outputs/toy-attacks
"""  # noqa: E501 (--help text, kept as printed)
from __future__ import annotations

import argparse
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


def settings_for(concept: str, attacks, out: Path, assets: Path = ASSETS, **changes):
    """The attack job's settings for ``toy:{concept}`` on the toy model (32 px, fp32; ``changes``: any other
    :class:`attacks.settings.AttackSettings` field, e.g. ``delta``, ``steps``, ``limit``, ``base``)."""
    from attacks.settings import AttackSettings
    from toyworld.mission import asset_paths

    p = asset_paths(assets)
    base = dict(attacks=tuple(attacks), concept=f"toy:{concept}", base=str(p["weights"]), config=str(p["config"]),
                H=32, W=32, precision="full", score_device="cpu", outdir=str(out))
    return AttackSettings(**{**base, **changes})


def run(out: Path, concepts, attacks, assets: Path = ASSETS, **changes) -> dict:
    """Attack every concept (all inputs checked first); ``{concept: {model: summary}}``. One table in
    ``{out}/results.md``."""
    from attacks.job import check
    from attacks.job import run as attack

    plans = [check(settings_for(c, attacks, out, assets, **changes)) for c in concepts]
    return {c: attack(p.settings, plan=p) for c, p in zip(concepts, plans)}


def main(argv=None) -> dict:
    from runtime.cli import exit_on_usage_error

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attack", nargs="+", default=["none"], help="attacks (attack.py's names)")
    p.add_argument("--concepts", nargs="+", default=["stripes", "grumpy cat"], choices=CONCEPTS)
    p.add_argument("--delta", action="append", default=[], help="an erased model, NAME=PATH (a delta of the toy LDM)")
    p.add_argument("--base", default=None, help="another base checkpoint (e.g. the waves-taught model)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps of the checks (PLMS)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts per concept")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="ATTACK.FIELD=VALUE")
    p.add_argument("--out", default="outputs/toy-attacks")
    a = p.parse_args(argv)
    changes = {"delta": tuple(a.delta), "steps": a.steps, "limit": a.limit, "overrides": tuple(a.overrides)}
    if a.base:
        changes["base"] = a.base
    return exit_on_usage_error(lambda: run(Path(a.out), a.concepts, a.attack, **changes))


if __name__ == "__main__":
    main()
