"""The job's :class:`attacks.base.Checker`: one generation from a conditioning, from the prompt's fixed start noise,
judged by the concept preset's judge.

Sampling is ``runtime.generate``'s (:func:`runtime.generate.sample_conditioned`, the step the image folders use):
a check of the unmodified prompt's conditioning is the image ``generate_images`` makes for that prompt and seed.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from runtime.generate import NonFiniteSampleError, Sampling, latent_shape, sample_conditioned, start_noise

from .base import Check


class GenerationChecker:
    """Checks of one prompt on one model: start noise from a CPU generator seeded ``seed`` (drawn anew for every
    call, so every check of the prompt starts from the same code), classifier-free guidance against the empty
    prompt at ``sampling.scale``; ``judge`` (a preset's) decides. ``log`` holds every check's step and verdict."""

    def __init__(self, model, sampling: Sampling, seed: int, judge, uncond: torch.Tensor | None = None):
        self.model, self.sampling, self.seed, self.judge = model, sampling, int(seed), judge
        self.device = next(model.parameters()).device
        self.shape = latent_shape(model, sampling.height, sampling.width)
        amp = sampling.precision == "autocast" and self.device.type == "cuda"
        self.amp = (lambda: torch.autocast("cuda", dtype=torch.float16)) if amp else nullcontext
        if uncond is None and sampling.scale != 1.0:
            with torch.no_grad(), self.amp():
                uncond = model.get_learned_conditioning([""])
        self.uncond = uncond
        self.log: list[dict] = []

    @torch.no_grad()
    def __call__(self, cond: torch.Tensor, step: int) -> Check:
        cond = cond.detach().to(self.device)
        if cond.ndim != 3 or cond.shape[0] != 1:
            raise ValueError(f"a check takes one conditioning [1, 77, D], got {tuple(cond.shape)}")
        gen = torch.Generator().manual_seed(self.seed)  # then each check's eta noise, as Runner's
        if self.sampling.noise == "original":
            x_T = start_noise(self.shape, self.seed, self.device, "original")[None]
        else:  # drawn from gen itself, as Runner does: gen continues after it
            x_T = torch.randn(self.shape, generator=gen)[None].to(self.device)
        with self.amp():
            image = sample_conditioned(self.model, self.sampling, cond, self.uncond, x_T, [gen],
                                       finite=lambda t, what: self._finite(t, what, step))[0]
        verdict = dict(self.judge([image])[0])
        success = bool(verdict.pop("success"))
        self.log.append({"step": int(step), "success": success, **verdict})
        return Check(success, image)

    def _finite(self, t: torch.Tensor, what: str, step: int) -> None:
        """NaN/inf would become a black image, which no judge calls the concept: a false "erased". Stop instead."""
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteSampleError(f"the check of attack step {step} (seed {self.seed}) sampled NaN or inf "
                                       f"{what}: the model's weights are broken or overflow (try --precision full)")
