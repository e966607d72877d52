"""The waves world and the shipped model it starts from (``experiments.ffn``).

``waves`` (``toyworld.render.FFN_TEXTURES``: wavy horizontal bands) is a texture the shipped model never saw;
these functions draw world scenes in it, deterministic from a seed, with captions from the world's own
templates, and load the shipped LDM the fine-tune starts from.
"""
from __future__ import annotations

import random
from pathlib import Path

from toyworld import mission
from toyworld.captions import caption
from toyworld.dataset import DEFAULT_MIXTURE, placed, sample_scene
from toyworld.mission import ASSETS
from toyworld.render import BACKGROUNDS, COLOUR_NAMES, FFN_TEXTURES, SHAPES, Scene

FFN_ASSETS = ASSETS / "ffn"
TEXTURE = FFN_TEXTURES[0]  # "waves"


def chw(image):
    """A PIL image as a uint8 ``[3, H, W]`` tensor."""
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def texture_scene(rng: random.Random, texture: str = TEXTURE) -> Scene:
    """A textured shape like the world's style scenes (any shape, colour, background; medium or large), in
    ``texture``."""
    colour = rng.choice(COLOUR_NAMES)
    background = rng.choice(BACKGROUNDS)
    rotation = round(rng.uniform(-DEFAULT_MIXTURE.max_rotation, DEFAULT_MIXTURE.max_rotation), 2)
    shape = rng.choice(SHAPES)
    return placed(rng, rng.choice(("medium", "large")), shape=shape, colour=colour, background=background,
                   rotation=rotation, style=texture)


def ffn_item(seed: int, index: int, texture_frac: float, texture: str = TEXTURE):
    """``(scene, caption)`` of item ``index`` of the fine-tune world: with probability ``texture_frac`` a
    ``texture`` scene, else an ordinary world scene (``sample_scene``, the shipped mixture)."""
    rng = random.Random(f"toyworld-ffn:{texture}:{seed}:{index}")
    scene = texture_scene(rng, texture) if rng.random() < texture_frac else sample_scene(rng)
    return scene, caption(scene, rng)


def ffn_pool(n: int, seed: int, texture_frac: float, size: int = 32, texture: str = TEXTURE):
    """``(images uint8 [n, 3, size, size], captions, scenes)`` of items ``0..n-1``."""
    import torch

    from toyworld.render import render

    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    captions, scenes = [], []
    for i in range(n):
        scene, text = ffn_item(seed, i, texture_frac, texture)
        images[i] = chw(render(scene, size))
        captions.append(text)
        scenes.append(scene)
    return images, captions, scenes


def load_base(assets: Path = ASSETS, delta=None):
    """The shipped LDM (optionally with a delta applied), eval mode, CPU."""
    from ldm.util import load_model_config
    from runtime.loading import load_model

    p = mission.asset_paths(assets)
    return load_model(load_model_config(p["config"]), p["weights"], delta).eval()
