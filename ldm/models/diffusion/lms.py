"""LMS (linear multistep, order 4) sampling for ``LatentDiffusion``: diffusers' ``LMSDiscreteScheduler``.

UnlearnDiffAtk's checker (``src/tasks/classifier_.py``) and its data-set generation sample with it. Not in the
CompVis code. The method (Karras et al. 2022's notation, ``x = x0 + sigma * eps`` on the variance-exploding
scale):

* the grid: ``steps`` fractional timesteps ``linspace(0, T-1, steps)`` from the top (diffusers' "linspace"
  spacing), their sigmas interpolated linearly in the sigma table, then sigma 0;
* the start: ``x_T * sigma_max`` (diffusers' ``init_noise_sigma`` for this spacing);
* each step: the UNet sees ``x / sqrt(1 + sigma^2)`` at the fractional timestep, and the update is
  ``x + sum_j c_j * eps_{i-j}`` over the last ``min(i + 1, 4)`` eps, where ``c_j`` integrates the Lagrange
  basis polynomial of node ``sigma_{i-j}`` (nodes ``sigma_i ... sigma_{i-order+1}``) from ``sigma_i`` to
  ``sigma_{i+1}``. diffusers integrates numerically (``scipy.integrate.quad``); the integrand is a polynomial
  of degree < 4, so here it is integrated exactly.

``S`` steps cost ``S`` UNet calls (2 per call with CFG, batched). ``tests/ldm/test_lms.py`` checks it against
diffusers' scheduler.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from numpy.polynomial import polynomial as P

from ldm.models.diffusion.ddim import Generators, NoiseSampler, guided_eps, randn
from ldm.models.diffusion.dpmpp import discrete_sigmas

ORDER = 4  # diffusers' default, and what UnlearnDiffAtk's step() calls use


def lms_grid(alphas_cumprod, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``(timesteps, sigmas)``: ``steps`` fractional timesteps from ``T-1`` down to 0 and their ``steps + 1``
    sigmas (the last 0), float64."""
    table = discrete_sigmas(alphas_cumprod)
    T = len(table)
    if not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"lms steps must be an integer in [1, {T}], got {steps!r}")
    timesteps = np.linspace(0, T - 1, steps)[::-1].copy()
    sigmas = np.concatenate([np.interp(timesteps, np.arange(T), table), [0.0]])
    return timesteps, sigmas


def lms_coefficients(sigmas, i: int, order: int = ORDER) -> list[float]:
    """The weights of ``eps_i, eps_{i-1}, ...`` (newest first) in step ``i`` of order ``min(i + 1, order)``."""
    order = min(i + 1, order)
    nodes = [float(sigmas[i - k]) for k in range(order)]
    out = []
    for j in range(order):
        poly = np.array([1.0])  # the Lagrange basis polynomial of node j, built factor by factor
        for k in range(order):
            if k != j:
                poly = P.polymul(poly, np.array([-nodes[k], 1.0]) / (nodes[j] - nodes[k]))
        antiderivative = P.polyint(poly)
        out.append(float(P.polyval(sigmas[i + 1], antiderivative) - P.polyval(sigmas[i], antiderivative)))
    return out


def sample_lms(eps: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor, sigmas, timesteps,
               order: int = ORDER, callback: Callable | None = None) -> torch.Tensor:
    """LMS from ``x`` (VE scale, at ``sigmas[0]``) down the decreasing ``sigmas``; ``eps(x_vp, t)`` is the guided
    eps-model at fractional timestep ``t``. One ``eps`` call per step; ``callback(i, pred_x0)``."""
    history: list[torch.Tensor] = []  # eps of the last `order` steps, oldest first
    for i, t in enumerate(timesteps):
        s = float(sigmas[i])
        e = eps(x * (1.0 + s * s) ** -0.5, float(t))
        if callback is not None:
            callback(i, x - s * e)
        history = (history + [e])[-order:]
        coeffs = lms_coefficients(sigmas, i, order)
        x = x + sum(c * d for c, d in zip(coeffs, reversed(history)))
    return x


class LMSSampler:
    """``sample(S, batch_size, shape, conditioning, ...)`` as ``DDIMSampler``; deterministic (eta must be 0)."""

    name = "LMS"

    def __init__(self, model, **kwargs):
        self.model = model

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape, conditioning=None, callback: Callable | None = None,
               eta: float = 0.0, x_T: torch.Tensor | None = None, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning=None, generator: Generators = None, verbose: bool = True,
               progress: bool = False, noise_sampler: NoiseSampler | None = None, **kwargs):
        """Latents of ``(batch_size, *shape)`` from ``x_T`` (or noise from ``generator``), standard normal: it is
        scaled by ``sigma_max`` here, as diffusers' pipelines do. Returns ``(samples, {"pred_x0": [...]})`` like
        DDIM. ``noise_sampler`` is accepted for DDIM's interface and never called. Unsupported CompVis options
        raise."""
        unsupported = {k: v for k, v in kwargs.items() if v not in (None, False, 0, 0.0)}
        if unsupported:
            raise NotImplementedError(f"{self.name} sampler options not supported: {sorted(unsupported)}")
        if eta != 0:
            raise ValueError("LMS is deterministic: eta must be 0")
        timesteps, sigmas = lms_grid(self.model.alphas_cumprod.detach().cpu().numpy(), S)
        if verbose:
            print(f"{self.name} sampler: {S} steps, sigma {sigmas[0]:.3f} -> 0")
        device = self.model.device
        x_T = randn((batch_size, *shape), generator, device) if x_T is None else x_T.to(device)
        cond, uncond, scale = conditioning, unconditional_conditioning, unconditional_guidance_scale
        t_in: dict[float, torch.Tensor] = {}

        def eps(x_vp, t):
            if t not in t_in:  # the UNet's timestep embedding takes the fractional t as it is
                t_in[t] = torch.full((x_vp.shape[0],), t, device=device, dtype=torch.float32)
            return guided_eps(self.model, x_vp, t_in[t], cond, uncond, scale)

        pred_x0 = []

        def record(i, x0):
            pred_x0.append(x0)
            if callback is not None:
                callback(i)

        x = sample_lms(eps, x_T * float(sigmas[0]), sigmas, timesteps, ORDER, record)
        return x, {"x_inter": [x_T, x], "pred_x0": pred_x0}
