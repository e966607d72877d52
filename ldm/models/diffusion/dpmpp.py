"""DPM-Solver++(2M) sampling for ``LatentDiffusion``, in k-diffusion's form (not in the CompVis code).

The pieces, as in k-diffusion (Karras et al. 2022's notation: ``x = x0 + sigma * eps``):

* ``discrete_sigmas`` / ``linspace_timesteps``: the model's sigma table and the sub-grid of its
  training timesteps to step on;
* ``Denoiser``: the eps-model (``guided_eps``, one batched UNet call for both CFG halves) seen as a
  denoiser ``D(x, sigma) -> x0`` on the variance-exploding scale;
* ``sample_dpmpp_2m``: the solver itself (Lu et al. 2022, "DPM-Solver++", multistep second order);
* ``DPMPP2MSampler``: the CompVis ``sample(S, batch_size, shape, conditioning, ...)`` API around them.

The grid is diffusers' ``DPMSolverMultistepScheduler`` default (``timestep_spacing="linspace"``:
``round(linspace(0, T-1, S+1))`` from the top, without the 0, then sigma 0; ``final_sigmas_type
"zero"``, so the last step is first order) and the start is DDIM's: ``x_T`` as the variance-preserving
sample at ``t = T-1``. With the same model and ``x_T`` the result is diffusers' DPM-Solver++ 2M up to
float rounding (``tests/test_dpmpp.py``). ``S`` steps cost ``S`` UNet calls (2 per call with CFG, batched).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ldm.models.diffusion.ddim import Generators, NoiseSampler, guided_eps, randn


def discrete_sigmas(alphas_cumprod) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t) / abar_t) for every training timestep (float64)."""
    a = np.asarray(alphas_cumprod, dtype=np.float64)
    return np.sqrt((1.0 - a) / a)


def linspace_timesteps(steps: int, num_timesteps: int = 1000) -> np.ndarray:
    """``steps`` distinct training timesteps from ``T-1`` down (diffusers' "linspace" spacing)."""
    if not isinstance(steps, int) or not 1 <= steps < num_timesteps:
        raise ValueError(f"dpmpp_2m steps must be an integer in [1, {num_timesteps - 1}], got {steps!r}")
    return np.linspace(0, num_timesteps - 1, steps + 1).round()[::-1][:-1].astype(np.int64)


class Denoiser:
    """``D(x, sigma)``: the guided eps-model as a denoiser on the VE scale (k-diffusion's CompVisDenoiser).

    ``x`` is ``x0 + sigma * eps``; the UNet sees the VP sample ``x / sqrt(1 + sigma^2)`` at the training
    timestep of ``sigma`` (nearest in log sigma: exact for sigmas taken from the table).
    """

    def __init__(self, model, cond, uncond=None, scale: float = 1.0):
        self.model, self.cond, self.uncond, self.scale = model, cond, uncond, scale
        self.log_sigmas = np.log(discrete_sigmas(model.alphas_cumprod.detach().cpu().numpy()))
        self._t = {}  # (timestep, batch) -> the long tensor the UNet gets: built once, not every call

    def sigma_to_t(self, sigma: float) -> int:
        return int(np.abs(self.log_sigmas - math.log(sigma)).argmin())

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        key = (self.sigma_to_t(sigma), x.shape[0])
        if key not in self._t:
            self._t[key] = torch.full((x.shape[0],), key[0], device=x.device, dtype=torch.long)
        eps = guided_eps(self.model, x * (1.0 + sigma ** 2) ** -0.5, self._t[key], self.cond, self.uncond, self.scale)
        return x - sigma * eps


def sample_dpmpp_2m(denoise: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor, sigmas,
                    callback: Callable | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) from ``x`` at ``sigmas[0]`` down the decreasing ``sigmas`` (python floats; a final
    0 returns the last denoised estimate). One ``denoise`` call per step; ``callback(i, denoised)``."""
    old_d, h_last = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = denoise(x, s)
        if callback is not None:
            callback(i, d)
        if s_next == 0:  # to sigma 0 the first-order step is the denoised estimate itself
            x = d
            break
        h = math.log(s) - math.log(s_next)  # step in lambda = -log sigma
        d_step = d
        if old_d is not None:  # second order: D extrapolated linearly in lambda to the step's midpoint
            r = h_last / h
            d_step = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old_d
        x = (s_next / s) * x - math.expm1(-h) * d_step
        old_d, h_last = d, h
    return x


class DPMPP2MSampler:
    """``sample(S, batch_size, shape, conditioning, ...)`` as ``DDIMSampler``; deterministic (eta must be 0)."""

    name = "DPM++2M"

    def __init__(self, model, **kwargs):
        self.model = model

    def sigmas(self, steps: int) -> list[float]:
        table = discrete_sigmas(self.model.alphas_cumprod.detach().cpu().numpy())
        return [float(s) for s in table[linspace_timesteps(steps, len(table))]] + [0.0]

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape, conditioning=None, callback: Callable | None = None,
               eta: float = 0.0, x_T: torch.Tensor | None = None, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning=None, generator: Generators = None, verbose: bool = True,
               progress: bool = False, noise_sampler: NoiseSampler | None = None, **kwargs):
        """Latents of ``(batch_size, *shape)`` from ``x_T`` (or noise from ``generator``); returns
        ``(samples, {"pred_x0": [...]})`` like DDIM. ``noise_sampler`` is accepted for DDIM's interface and
        never called: the solver adds no noise after the start. Unsupported CompVis options raise."""
        unsupported = {k: v for k, v in kwargs.items() if v not in (None, False, 0, 0.0)}
        if unsupported:
            raise NotImplementedError(f"{self.name} sampler options not supported: {sorted(unsupported)}")
        if eta != 0:
            raise ValueError("DPM++2M is deterministic: eta must be 0")
        sigmas = self.sigmas(S)
        if verbose:
            print(f"{self.name} sampler: {S} steps, sigma {sigmas[0]:.3f} -> 0")
        device = self.model.device
        x_T = randn((batch_size, *shape), generator, device) if x_T is None else x_T.to(device)
        denoise = Denoiser(self.model, conditioning, unconditional_conditioning, unconditional_guidance_scale)
        pred_x0 = []

        def record(i, d):
            pred_x0.append(d)
            if callback is not None:
                callback(i)

        # x_T is the VP sample at t = T-1 (where DDIM starts); on the VE scale that is x_T * sqrt(1 + sigma^2)
        x = sample_dpmpp_2m(denoise, x_T * (1.0 + sigmas[0] ** 2) ** 0.5, sigmas, record)
        return x, {"x_inter": [x_T, x], "pred_x0": pred_x0}
