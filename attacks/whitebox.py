"""Pieces shared by the white-box attacks (UnlearnDiffAtk, P4D): target latents, seeded noise, prompt checks."""
from __future__ import annotations

import numpy as np
import torch

from attacks import text
from attacks.base import Check, Checker, Concept


def target_image(concept: Concept, index: int, attack: str) -> np.ndarray:
    """The target image of prompt row ``index`` (uint8 HxWx3); a clear error when the job gave none."""
    targets = concept.targets
    if targets is None or len(targets) == 0:
        raise ValueError(f"{attack} needs target images of the concept (Concept.targets is empty)")
    if not 0 <= index < len(targets):
        raise ValueError(f"{attack}: prompt row {index} has no target image ({len(targets)} given)")
    image = np.asarray(targets[index])
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{attack}: target image {index} must be uint8 HxWx3, got {image.dtype} {image.shape}")
    return image


@torch.no_grad()
def target_latent(model, image: np.ndarray, generator: torch.Generator | None = None,
                  zero_one: bool = False) -> torch.Tensor:
    """Scaled first-stage latent [1, C, h, w] of a uint8 HxWx3 image, its pixels scaled to [-1, 1] (the VAE's
    range; UnlearnDiffAtk's ``Normalize([0.5], [0.5])``) or, ``zero_one``, to [0, 1] (P4D's preprocessing,
    which has no Normalize).

    ``generator`` None: the posterior mean (UnlearnDiffAtk's ``latent_dist.mean``); else a posterior sample
    drawn with it (P4D's ``latent_dist.sample()``)."""
    param = next(model.first_stage_model.parameters())
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(param.device, param.dtype)
    posterior = model.encode_first_stage(x / 255.0 if zero_one else x / 127.5 - 1.0)
    if generator is None:
        return model.get_first_stage_encoding(posterior.mode())
    return model.get_first_stage_encoding(posterior, generator=generator)


def randn(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Normal noise drawn on the generator's device (so a CPU generator seeds a CUDA run), moved to ``like``."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device).to(like.device, like.dtype)


def check_prompt(encoder, check: Checker, prompt: str, step: int) -> Check:
    """Judge one generation of ``prompt`` as typed (tokenized the usual way), as the originals check a prompt."""
    with torch.no_grad():
        cond = text.encode_ids(encoder, text.tokenize(encoder, prompt))
    return check(cond, step)
