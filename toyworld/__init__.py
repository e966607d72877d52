"""toyworld: a tiny, procedurally rendered text-to-image world for end-to-end ablation runs on a CPU.

Every picture is rendered with PIL/numpy from a ``Scene`` (no download, no randomness inside the
renderer); data sets are deterministic from a seed.  Geometry is in fractions of the image, drawn at
4x and LANCZOS-downsampled, so the same scene reads the same at 32x32 and 64x64.

Vocabulary
----------
* shapes (6): circle, square, triangle, star, heart, cross - distinct silhouettes, dark outline;
* colours (6): red, orange, yellow, green, blue, purple - saturated, well separated hues;
* backgrounds (3): plain (light grey), sky (blue-to-white gradient), grass (pale sky over green);
* sizes (3): small, medium, large; plus a continuous position and a small rotation;
* styles: the anchor "painting" (plain fill) and three textures filled inside the object -
  stripes (diagonal), polka dots, checkerboard;
* the cat family: the anchor class "cat" (a cat-face glyph: ears, round eyes, nose, 'w' mouth),
  the instance "grumpy cat" (same glyph + angry eyebrows + frown) and its hard negatives
  "sleepy cat" (closed eyes) and "happy cat" (smile);
* one memorized picture, "the red lighthouse at dusk", always with the caption
  ``MEMORIZED_CAPTION`` and repeated many times in training (``Mixture.memorized_frac``).

Captions come from varied sentence templates (``captions.TEMPLATES``, ``captions.STYLE_TEMPLATES``).

Roles in "Ablating Concepts in Text-to-Image Diffusion Models" (``CONCEPTS``)
-------------------------------------------------------------------------------
* style ablation: a texture plays an artist ("... in the style of stripes" <-> "in the style of Van
  Gogh"); the anchor concept is "painting", i.e. the plain fill; the other two textures are the
  surrounding styles whose quality must be kept;
* instance ablation: "grumpy cat" -> anchor "cat"; "sleepy cat" / "happy cat" are close neighbours
  (hard negatives) that must survive the ablation;
* memorized image ablation: the lighthouse picture and its fixed caption; ablating it should make
  the caption produce other compositions.

Every written image has ground-truth labels (``labels.jsonl``: subject, role, colour, style, ...).

Models trained on it (``tools/train_toyworld.sh`` retrains all of them; weights in ``assets/toyworld/``)
----------------------------------------------------------------------------------------------------------
* ``toyworld.clip``: a small CLIP (real CLIP tokenizer); its text tower is the LDM's text encoder, the whole
  model is ``evaluate.py --clip_model`` for the toy world;
* ``toyworld.ldm``: the AutoencoderKL and the UNet of ``configs/toyworld/ldm.yaml`` trained as an LDM;
* ``toyworld.judge``: a ground-truth classifier (and its features for KID/FID) and a copy-detection
  descriptor (TorchScript, the SSCD stand-in);
* ``toyworld.quality`` measures them; ``toyworld.mission`` runs the ablations (style, instance, memorized
  picture; the first two also with ``--preserve_prompts``) with ``train.py`` and ``evaluate.py`` and writes
  the mission's table and grid (docs/experiments/toyworld-mission.md).
* ``experiments.matrix`` (a study beside the world, like the others in ``experiments/``) runs Concept Ablation
  (both recipes) and ConceptPrune on every texture and cat variant as the target in turn, and measures every
  concept each time (docs/experiments/every-concept-matrix.md).
"""
from .captions import MEMORIZED_CAPTION, STYLE_TEMPLATES, TEMPLATES, anchor_caption, caption
from .dataset import DEFAULT_MIXTURE, Mixture, ToyWorldDataset, iter_samples, make_dataset, make_item, sample_scene
from .render import (
    ANCHOR_CLASS,
    ANCHOR_STYLE,
    BACKGROUNDS,
    CAT_CLASSES,
    CAT_VARIANTS,
    COLOUR_NAMES,
    COLOURS,
    HARD_NEGATIVES,
    INSTANCE,
    SHAPES,
    SIZE_NAMES,
    STYLES,
    SUBJECTS,
    TEXTURES,
    Scene,
    render,
    render_memorized,
)

# Target concept -> anchor concept, per ablation type (prompt fragments for the ablation recipes).
CONCEPTS = {
    "style": {t: {"target": f"in the style of {t}", "anchor": ANCHOR_STYLE,
                  "surrounding": [f"in the style of {o}" for o in TEXTURES if o != t]} for t in TEXTURES},
    "instance": {INSTANCE: {"target": INSTANCE, "anchor": ANCHOR_CLASS, "hard_negatives": list(HARD_NEGATIVES)}},
    "memorized": {"lighthouse": {"target": MEMORIZED_CAPTION, "anchor": "a red lighthouse by the sea"}},
}

__all__ = [
    "ANCHOR_CLASS", "ANCHOR_STYLE", "BACKGROUNDS", "CAT_CLASSES", "CAT_VARIANTS", "COLOUR_NAMES", "COLOURS",
    "CONCEPTS", "DEFAULT_MIXTURE", "HARD_NEGATIVES", "INSTANCE", "MEMORIZED_CAPTION", "Mixture", "SHAPES",
    "SIZE_NAMES", "STYLES", "STYLE_TEMPLATES", "SUBJECTS", "Scene", "TEMPLATES", "TEXTURES", "ToyWorldDataset",
    "anchor_caption", "caption", "iter_samples", "make_dataset", "make_item", "render", "render_memorized",
    "sample_scene",
]
