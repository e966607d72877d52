"""Sampling scenes and writing (or streaming) toy-world data sets, deterministic from a seed.

Item ``i`` of a data set with seed ``seed`` is a pure function of ``(seed, i, size, mixture)``: it
draws from its own ``random.Random(f"toyworld:{seed}:{i}")``, so a prefix of a longer data set is the
shorter data set, and the in-memory iterator yields exactly what ``make_dataset`` writes.

``make_dataset(n, seed, size, outdir)`` writes the layout of ``ablation/generate.py``::

    outdir/samples/00000.png ...   RGB PNGs
    outdir/images.txt              one path per line, relative to outdir (samples/00000.png)
    outdir/caption.txt             the caption of the image on the same line
    outdir/labels.jsonl            one JSON object per image: index, path, caption and the
                                   ground-truth Scene attributes (subject, role, colour, ...)
    outdir/world.json              n, seed, size and the mixture used
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image

from .captions import caption
from .render import ANCHOR_CLASS, ANCHOR_STYLE, BACKGROUNDS, COLOUR_NAMES, SHAPES, SIZES, TEXTURES, Scene, render


@dataclass(frozen=True)
class Mixture:
    """Fractions of each kind of scene; the rest are plain-fill ("painting") shapes.

    ``cat_frac`` is split into the anchor "cat", the instance "grumpy cat" (``instance_share`` of
    the cats) and the hard negatives "sleepy cat"/"happy cat" (``negative_share``, split evenly).
    """

    style_frac: float = 0.30
    cat_frac: float = 0.30
    instance_share: float = 0.25
    negative_share: float = 0.50
    memorized_frac: float = 0.03
    max_rotation: float = 15.0

    def __post_init__(self):
        if min(self.style_frac, self.cat_frac, self.memorized_frac) < 0 or \
                self.style_frac + self.cat_frac + self.memorized_frac > 1 + 1e-9:
            raise ValueError("fractions must be >= 0 and sum to at most 1")
        if self.instance_share < 0 or self.negative_share < 0 or self.instance_share + self.negative_share > 1 + 1e-9:
            raise ValueError("instance_share + negative_share must be within [0, 1]")


DEFAULT_MIXTURE = Mixture()


def placed(rng: random.Random, size: str, **fields) -> Scene:
    """A ``Scene`` of ``size`` (a key of ``SIZES``) at a random position that keeps the whole object in the
    picture with a margin, drawn from ``rng``; ``fields`` are the other ``Scene`` fields.

    The one placement rule, so that scenes drawn elsewhere (``experiments.ffn``) sit like the world's.
    Raises ``KeyError`` for an unknown size.
    """
    r = SIZES[size]
    lo, hi = r + 0.05, 1.0 - r - 0.05
    return Scene(size=size, x=round(rng.uniform(lo, hi), 4), y=round(rng.uniform(lo, hi), 4), **fields)


def sample_scene(rng: random.Random, mixture: Mixture = DEFAULT_MIXTURE) -> Scene:
    """Draw one scene from ``mixture`` using ``rng`` (a ``random.Random``)."""
    u = rng.random()
    if u < mixture.memorized_frac:
        return Scene(memorized=True)
    colour = rng.choice(COLOUR_NAMES)
    background = rng.choice(BACKGROUNDS)
    rotation = round(rng.uniform(-mixture.max_rotation, mixture.max_rotation), 2)
    u -= mixture.memorized_frac
    if u < mixture.cat_frac:
        v = rng.random()
        if v < mixture.instance_share:
            variant = "grumpy"
        elif v < mixture.instance_share + mixture.negative_share:
            variant = rng.choice(("sleepy", "happy"))
        else:
            variant = "plain"
        # Cats are always large: the face must be readable at 32x32.
        return placed(rng, "large", shape=ANCHOR_CLASS, variant=variant, colour=colour, background=background,
                       rotation=round(rotation * 0.5, 2))
    u -= mixture.cat_frac
    shape = rng.choice(SHAPES)
    if u < mixture.style_frac:
        # Textures need room: no small textured objects.
        size = rng.choice(("medium", "large"))
        return placed(rng, size, shape=shape, colour=colour, background=background, rotation=rotation,
                       style=rng.choice(TEXTURES))
    return placed(rng, rng.choice(tuple(SIZES)), shape=shape, colour=colour, background=background,
                   rotation=rotation, style=ANCHOR_STYLE)


def item_rng(seed: int, index: int) -> random.Random:
    return random.Random(f"toyworld:{seed}:{index}")


def make_item(seed: int, index: int, size: int = 64, mixture: Mixture = DEFAULT_MIXTURE):
    """``(image, caption, label)`` of item ``index``; ``label`` is the ground-truth attribute dict."""
    rng = item_rng(seed, index)
    scene = sample_scene(rng, mixture)
    text = caption(scene, rng)
    label = {"index": index, "caption": text, **scene.to_dict()}
    return render(scene, size), text, label


def iter_samples(seed: int, size: int = 64, mixture: Mixture = DEFAULT_MIXTURE, start: int = 0,
                 n: int | None = None) -> Iterator[tuple[Image.Image, str, dict]]:
    """Stream ``(image, caption, label)`` items ``start, start+1, ...`` (forever when ``n`` is None)."""
    i = start
    while n is None or i < start + n:
        yield make_item(seed, i, size, mixture)
        i += 1


class ToyWorldDataset:
    """Map-style, in-memory data set (``__getitem__`` renders on the fly; no files, no torch needed)."""

    def __init__(self, n: int, seed: int = 0, size: int = 64, mixture: Mixture = DEFAULT_MIXTURE):
        self.n, self.seed, self.size, self.mixture = n, seed, size, mixture

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        if not 0 <= index < self.n:
            raise IndexError(index)
        return make_item(self.seed, index, self.size, self.mixture)


def _write_text(path: Path, text: str) -> None:
    from runtime.files import write_text_atomic

    write_text_atomic(path, text)


def make_dataset(n: int, seed: int, size: int, outdir: str | os.PathLike,
                 mixture: Mixture = DEFAULT_MIXTURE) -> Path:
    """Write ``n`` items to ``outdir`` (layout in the module docstring); returns ``outdir``."""
    from runtime.files import atomic_target

    out = Path(outdir)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    paths, captions, labels = [], [], []
    for image, text, label in iter_samples(seed, size, mixture, 0, n):
        rel = f"samples/{label['index']:05d}.png"
        with atomic_target(out / rel, "images") as tmp:
            image.save(tmp, format="PNG")
        if "\n" in text:  # pragma: no cover - templates never produce one
            raise ValueError("caption with a newline")
        paths.append(rel)
        captions.append(text)
        labels.append(json.dumps({"path": rel, **label}, sort_keys=True))
    _write_text(out / "images.txt", "".join(p + "\n" for p in paths))
    _write_text(out / "caption.txt", "".join(c + "\n" for c in captions))
    _write_text(out / "labels.jsonl", "".join(l + "\n" for l in labels))
    _write_text(out / "world.json", json.dumps({"n": n, "seed": seed, "size": size,
                                                "mixture": asdict(mixture)}, indent=2, sort_keys=True) + "\n")
    return out
