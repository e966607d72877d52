"""Captions: a Scene -> a natural sentence, from varied templates (deterministic given an rng).

* Plain-fill objects: ``"a photo of a small red star on the grass"``, ``"there is a blue circle under a
  blue sky"`` ... The "medium" word varies (photo, picture, painting, drawing, ...).
* Style scenes always contain ``"in the style of <texture>"`` (possibly as ``"painted in the style of
  stripes"``) or ``"<texture> style"``, placed at the start, in the middle or at the end, and use the anchor noun
  ``"painting"`` most of the time, so that "painting" is the natural anchor prompt.
* Cats use their class name (``"cat"``, ``"grumpy cat"``, ``"sleepy cat"``, ``"happy cat"``).
* The memorized picture always has exactly ``MEMORIZED_CAPTION``.
"""
from __future__ import annotations

import random

from .render import ANCHOR_CLASS, ANCHOR_STYLE, Scene

MEMORIZED_CAPTION = "the famous poster of the red lighthouse at dusk"

# Phrases per background (all of them name the background in a recognisable way).
BACKGROUND_PHRASES = {
    "plain": ("on a plain background", "on a light grey background", "on a blank background"),
    "sky": ("against a blue sky", "under a blue sky", "in front of the sky"),
    "grass": ("on the grass", "in a grassy field", "on a green lawn"),
}
SIZE_WORDS = {"small": ("small", "little"), "medium": ("",), "large": ("large", "big")}
MEDIA = ("a photo of", "a picture of", "an image of", "a drawing of", "a painting of", "a close-up of")
STYLE_PHRASES = ("in the style of {t}", "painted in the style of {t}", "done in the style of {t}")

# {obj}: "a small red star"; {bg}: background phrase; {medium}: "a photo of";
# {Obj}: capitalised obj. "a photo depicts ..." and "... {t} style" are the phrasings of the CLIP metric's
# texts ("A photo depicts grumpy cat", "A photo depicts stripes style"; evaluation/metrics.py).
TEMPLATES = (
    "{medium} {obj} {bg}",
    "{obj} {bg}",
    "there is {obj} {bg}",
    "{bg_lead}, {obj}",
    "{medium} {obj}",
    "a simple illustration of {obj} {bg}",
    "here we see {obj} {bg}",
    "{Obj}, shown {bg}",
    "an image showing {obj} {bg}",
    "{obj}",
    "a scene with {obj} {bg}",
    "look, {obj} {bg}!",
    "a photo depicts {obj}",
    "a photo depicts {obj} {bg}",
)
# {style}: "in the style of stripes"; the anchor noun is "painting".
STYLE_TEMPLATES = (
    "a painting of {obj} {bg}, {style}",
    "a painting of {obj} {style}",
    "{style_lead}, a painting of {obj} {bg}",
    "{style_lead}, {obj}",
    "{obj} {bg}, {style}",
    "a painting in the style of {t}: {obj} {bg}",
    "{medium} {obj} {style}",
    "{Obj} {bg}, a painting in the style of {t}",
    "an artwork in the style of {t} showing {obj}",
    "{style_lead}: {obj} {bg}",
    "a photo depicts {obj}, {t} style",
    "{obj} {bg} in {t} style",
)


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def object_phrase(scene: Scene, rng: random.Random, with_size: bool | None = None) -> str:
    """``"a small red star"``, ``"an orange grumpy cat"`` (size word omitted for 'medium')."""
    words = []
    if with_size is None:
        with_size = rng.random() < 0.5
    size_word = rng.choice(SIZE_WORDS[scene.size])
    if with_size and size_word:
        words.append(size_word)
    words += [scene.colour, scene.subject]
    return _article(" ".join(words))


def caption(scene: Scene, rng: random.Random | None = None, template: int | None = None) -> str:
    """A caption for ``scene``.  ``template`` indexes ``TEMPLATES`` (or ``STYLE_TEMPLATES`` for a
    textured scene); by default it is drawn from ``rng`` (``random.Random(0)`` when None)."""
    if scene.memorized:
        return MEMORIZED_CAPTION
    rng = rng if rng is not None else random.Random(0)
    styled = scene.style != ANCHOR_STYLE
    templates = STYLE_TEMPLATES if styled else TEMPLATES
    tpl = templates[rng.randrange(len(templates)) if template is None else template]
    obj = object_phrase(scene, rng)
    bg = rng.choice(BACKGROUND_PHRASES[scene.background])
    fields = {
        "obj": obj, "Obj": obj[0].upper() + obj[1:], "bg": bg, "bg_lead": bg[0].upper() + bg[1:],
        "medium": rng.choice(MEDIA),
    }
    if styled:
        style = rng.choice(STYLE_PHRASES).format(t=scene.style)
        fields["style"] = style
        fields["t"] = scene.style
        fields["style_lead"] = style[0].upper() + style[1:]
    text = tpl.format(**fields)
    return text[0].upper() + text[1:] if rng.random() < 0.3 else text


def anchor_caption(scene: Scene, rng: random.Random | None = None) -> str:
    """The same scene described with its concept replaced by the anchor: texture -> "painting" (plain
    fill), grumpy/sleepy/happy cat -> "cat".  Useful to build anchor prompt lists."""
    if scene.memorized:
        raise ValueError("the memorized picture has no anchor scene")
    from dataclasses import replace
    plain = replace(scene, style=ANCHOR_STYLE,
                    variant="plain" if scene.shape == ANCHOR_CLASS else scene.variant)
    return caption(plain, rng)
