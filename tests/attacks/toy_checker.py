"""A real Checker on the toy world for the attack tests: the shipped toy LDM, a few DDIM steps from one fixed start
noise (CFG 6, eta 0: the same seed for every call, as the job's checker), judged by the shipped toy judge."""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from PIL import Image

from attacks.base import Check

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "toyworld"


@functools.lru_cache(maxsize=1)
def toy_world():
    """(toy LDM, toy judge), loaded once per test process (eval mode, fp32, CPU)."""
    from omegaconf import OmegaConf

    from runtime.loading import load_model
    from toyworld.judge import load_judge

    config = OmegaConf.to_container(OmegaConf.load(ASSETS / "ldm/ldm.yaml").model, resolve=True)
    return load_model(config, ASSETS / "ldm/toyworld-ldm.safetensors").eval(), load_judge(ASSETS / "judge")


class ToyChecker:
    """Generate from ``cond`` (DDIM ``steps``, fixed start noise of ``seed``) and judge: success when the judge's
    ``head`` ("style" or "subject") says ``want``. Records every call's step and label."""

    def __init__(self, model, judge, head: str, want: str, steps: int = 8, seed: int = 0, scale: float = 6.0):
        self.model, self.judge, self.head, self.want, self.steps, self.scale = model, judge, head, want, steps, scale
        self.shape = (model.channels, model.image_size, model.image_size)
        self.x_T = torch.randn((1, *self.shape), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            self.uc = model.get_learned_conditioning([""])
        self.calls: list[tuple[int, str]] = []

    @torch.no_grad()
    def __call__(self, cond: torch.Tensor, step: int) -> Check:
        from ldm.models.diffusion.ddim import DDIMSampler
        from toyworld.judge import classify
        from toyworld.ldm import decode_u8

        z, _ = DDIMSampler(self.model).sample(self.steps, 1, self.shape, conditioning=cond.detach(), eta=0.0,
                                              x_T=self.x_T.clone(), unconditional_guidance_scale=self.scale,
                                              unconditional_conditioning=self.uc, verbose=False, progress=False)
        image = decode_u8(self.model, z)[0].permute(1, 2, 0).numpy()
        label = classify(self.judge, [Image.fromarray(image)])[0][self.head]
        self.calls.append((step, label))
        return Check(success=label == self.want, image=image)
