"""Concept parsing and prompt construction for concept ablation.

Vocabulary (as in the paper): the *anchor* concept is the one we keep (``cat``), the *target*
concept is the one we ablate (``grumpy cat``). Training images are generated from *anchor
prompts*; the fine-tuned model is fed the matching *target prompt* and trained to predict what it
predicts for the anchor prompt.

``--caption_target`` syntax (``;`` separates several concepts):

* style:        ``"van gogh"``                     -> ``Concept(None, "van gogh")``
* object:       ``"cat+grumpy cat"``               -> ``Concept("cat", "grumpy cat")``
* memorization: ``"New Orleans House Galaxy Case"`` or ``"*+New Orleans House Galaxy Case"``
                                                    -> ``Concept("*", "New Orleans House Galaxy Case")``

Everything here is pure Python and cheap, so the command line can be validated before any model
is loaded.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

CONCEPT_TYPES = ("style", "object", "memorization")

MEMORIZATION_ANCHOR = "*"

ZOOM_OUT_PREFIXES = ("a far away ", "very small ")
ZOOM_IN_PREFIXES = ("zoomed in ", "close up ")


@dataclass(frozen=True)
class Concept:
    """One ablated concept. ``anchor`` is None for style, the anchor word for object, ``"*"`` for memorization."""

    anchor: str | None
    target: str


def _check_concept_type(concept_type: str) -> None:
    if concept_type not in CONCEPT_TYPES:
        raise ValueError(f"unknown concept type {concept_type!r}; expected one of {', '.join(CONCEPT_TYPES)}")


def parse_caption_target(concept_type: str, caption_target: str) -> list[Concept]:
    """Parse ``--caption_target`` into a list of concepts; raise ``ValueError`` on malformed input."""
    _check_concept_type(concept_type)
    if not isinstance(caption_target, str):
        raise ValueError(f"caption_target must be a string, got {type(caption_target).__name__}")
    if not caption_target.strip():
        raise ValueError("caption_target is empty; give the concept to ablate, e.g. 'van gogh' (style), "
                         "'cat+grumpy cat' (object) or the memorized caption (memorization)")
    parts = caption_target.split(";")
    concepts = []
    for k, raw in enumerate(parts):
        part = raw.strip()
        where = f"concept {k + 1} of {len(parts)} in caption_target {caption_target!r}"
        if not part:
            raise ValueError(f"{where} is empty (check for a stray or doubled ';')")
        if concept_type == "style":
            if "+" in part:
                raise ValueError(f"{where}: a style concept is just the style name, e.g. 'van gogh'; "
                                 f"'+' is only used by object ('anchor+target') and memorization ('*+caption')")
            concepts.append(Concept(None, part))
        elif concept_type == "object":
            pieces = part.split("+")
            if len(pieces) != 2:
                n = len(pieces) - 1
                raise ValueError(f"{where}: an object concept must be 'anchor+target' with exactly one '+', "
                                 f"e.g. 'cat+grumpy cat'; found {n} '+'")
            anchor, target = pieces[0].strip(), pieces[1].strip()
            if not anchor or not target:
                side = "anchor (left of '+')" if not anchor else "target (right of '+')"
                raise ValueError(f"{where}: the {side} is empty; expected 'anchor+target', e.g. 'cat+grumpy cat'")
            if anchor.lower() == target.lower():
                raise ValueError(f"{where}: anchor and target are the same ({anchor!r}); nothing would be ablated")
            concepts.append(Concept(anchor, target))
        else:  # memorization
            caption = part
            if part.startswith(MEMORIZATION_ANCHOR) and part[1:].lstrip().startswith("+"):
                caption = part[1:].lstrip()[1:].strip()
                if not caption:
                    raise ValueError(f"{where}: the memorized caption after '*+' is empty")
            if caption == MEMORIZATION_ANCHOR:
                raise ValueError(f"{where}: the memorized caption is the anchor marker '*' itself "
                                 f"(anchor and target are the same)")
            concepts.append(Concept(MEMORIZATION_ANCHOR, caption))
    return concepts


def check_preserve_prompts(keep: Sequence[str], parameter_group: str, concepts: Sequence[Concept] = (),
                           source: str = "preserve prompts") -> None:
    """Raise ``ValueError`` if prompts kept at the base model's prediction (``--preserve_prompts``, read from
    ``source``) cannot work: with the ``embedding`` group they are unchanged by construction, and none may name a
    target being ablated."""
    if keep and parameter_group == "embedding":
        raise ValueError("--preserve_prompts does nothing with the embedding group: prompts without the target's "
                         "tokens are unchanged by construction")
    clash = [k for k in keep for c in concepts if c.target.lower() in k.lower()]
    if clash:
        raise ValueError(f"{source}: {len(clash)} prompt(s) mention the target being ablated, e.g. {clash[0]!r}")


def check_anchor_words(concepts: Sequence[Concept], prompts: Sequence[str], source: str = "anchor prompts") -> int:
    """Object concepts rewrite each anchor prompt by replacing the anchor word (:func:`object_prompt`): raise
    ``ValueError`` if a concept's anchor occurs in none of ``prompts`` (its ablation would train the anchor
    prompts onto themselves, a no-op), and warn with the count when some prompts lack every anchor.
    Returns the number of prompts that contain an anchor."""
    import warnings

    lowered = [p.lower() for p in prompts]
    for c in concepts:
        if c.anchor and c.anchor != MEMORIZATION_ANCHOR and not any(c.anchor.lower() in p for p in lowered):
            raise ValueError(f"{source}: the anchor word {c.anchor!r} of '{c.anchor}+{c.target}' occurs in none of "
                             f"its {len(prompts)} prompts, e.g. {prompts[0]!r}: no target prompt could be made and "
                             f"nothing would be ablated")
    hits = sum(any(c.anchor and c.anchor.lower() in p for c in concepts) for p in lowered)
    if hits < len(prompts):
        anchors = ", ".join(repr(c.anchor) for c in concepts)
        warnings.warn(f"{source}: only {hits} of {len(prompts)} prompts contain the anchor word ({anchors}); the "
                      f"others train the unchanged prompt onto itself", stacklevel=2)
    return hits


def styled_prompt(target: str, anchor_prompt: str, rng: random.Random) -> str:
    """Style target prompt: one of three templates (uniform) with the style name doubled on a fair coin.

    The six forms (``c`` anchor prompt, ``t`` style):
    ``"{c}, in the style of {t}"``, ``"{c}, in the style of {t} {t}"``,
    ``"{t} inspired painting, {c}"``, ``"{t} {t} inspired painting, {c}"``,
    ``"in {t}'s style, {c}"``, ``"in {t} {t}'s style, {c}"``.
    """
    c = anchor_prompt.strip()
    form = rng.randrange(3)
    name = f"{target} {target}" if rng.random() < 0.5 else target
    if form == 0:
        return f"{c}, in the style of {name}"
    if form == 1:
        return f"{name} inspired painting, {c}"
    return f"in {name}'s style, {c}"


def object_prompt(anchor_prompt: str, concept: Concept) -> str:
    """Object target prompt: the lower-cased anchor prompt with the anchor word replaced by the target.

    Kept from the reference: a plain substring replace on the lower-cased prompt, so the anchor
    also matches inside longer words ("cat" in "vacation") and a prompt without the anchor word is
    returned lower-cased but otherwise unchanged. Unlike the reference, the anchor word itself is
    lower-cased too, so ``Concept("Cat", ...)`` matches "A cat ..." (the reference would not).
    """
    if concept.anchor is None or concept.anchor == MEMORIZATION_ANCHOR:
        raise ValueError(f"object_prompt needs an object concept 'anchor+target', got {concept}")
    return anchor_prompt.strip().lower().replace(concept.anchor.lower(), concept.target)


def target_prompt(concept_type: str, concepts: Sequence[Concept], index: int, anchor_prompt: str,
                  rng: random.Random) -> str:
    """The prompt fed to the model being trained, for dataset item ``index`` with anchor prompt ``anchor_prompt``.

    * style: round robin ``concepts[index % n]``, then :func:`styled_prompt`.
    * memorization: round robin, the concept's caption.
    * object, one concept: :func:`object_prompt`. Several concepts: the first concept whose
      (lower-cased) anchor word occurs in the lower-cased anchor prompt, else round robin by index.
      The reference used ``concepts[(index % n_images) // 1000]``, which silently assumed 1000
      contiguous images per concept in the data list; we select by content instead.
    """
    _check_concept_type(concept_type)
    if not concepts:
        raise ValueError("target_prompt needs at least one concept")
    n = len(concepts)
    if concept_type == "style":
        return styled_prompt(concepts[index % n].target, anchor_prompt, rng)
    if concept_type == "memorization":
        return concepts[index % n].target
    if n == 1:
        concept = concepts[0]
    else:
        lowered = anchor_prompt.lower()
        matching = [c for c in concepts if c.anchor is not None and c.anchor.lower() in lowered]
        concept = matching[0] if matching else concepts[index % n]
    return object_prompt(anchor_prompt, concept)


def zoom_prefix(kind: str, rng: random.Random) -> str:
    """Caption prefix for the object augmentation: ``kind`` is ``"out"`` (zoom-out) or ``"in"`` (zoom-in)."""
    if kind == "out":
        return rng.choice(ZOOM_OUT_PREFIXES)
    if kind == "in":
        return rng.choice(ZOOM_IN_PREFIXES)
    raise ValueError(f"zoom kind must be 'out' or 'in', got {kind!r}")
