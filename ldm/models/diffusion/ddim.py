"""DDIM sampling for ``LatentDiffusion`` (CompVis ``DDIMSampler`` API).

The pieces are separate: ``guided_eps`` (classifier-free guidance, one batched UNet call),
``ddim_step`` (the DDIM update on precomputed coefficients), the step noise as a ``NoiseSampler``
callable (k-diffusion's ``noise_sampler``) and the sampler's loop. ``PLMSSampler`` reuses the
schedule and loop and only swaps the step rule.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.modules.diffusionmodules.util import make_ddim_sampling_parameters, make_ddim_timesteps

Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape, generator: Generators, device, dtype=torch.float32) -> torch.Tensor:
    """Gaussian noise. With a list of generators, row ``i`` is drawn from ``generator[i]`` (on that
    generator's device), so each sample's noise is independent of its batch and of the device."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device) for g in generator]
        return torch.stack(rows).to(device=device, dtype=dtype)
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


NoiseSampler = Callable[[int, torch.Tensor], torch.Tensor]
"""``noise_sampler(step, like) -> noise``: the standard normal noise that sampling step ``step`` adds
(0 = the first step taken, in sampling order), with the shape, device and dtype of ``like`` (the current
latents). A sampler calls it at most once per step, in step order, and only for steps that add noise
(eta > 0). One type for every source of noise, as k-diffusion's ``noise_sampler``."""


def generator_noise_sampler(generator: Generators = None) -> NoiseSampler:
    """Noise drawn when asked, from ``generator`` as :func:`randn` draws it (None: the global RNG; one
    generator per image: row ``i`` from ``generator[i]``, on that generator's device). ``step`` is unused:
    the generators' state carries the order."""

    def noise_sampler(step: int, like: torch.Tensor) -> torch.Tensor:
        return randn(like.shape, generator, like.device, like.dtype)

    return noise_sampler


def noise_bank_sampler(generator: Sequence[torch.Generator], steps: Sequence[int], shape, device) -> NoiseSampler:
    """Noise for ``steps`` drawn now from per-image CPU ``generator``s, in step order (so the values equal
    :func:`generator_noise_sampler`'s), and moved to ``device`` in one copy (pinned on CUDA): a per-step
    copy from pageable host memory makes the host wait for the GPU at every step. Asking for a step not in
    ``steps`` raises ``KeyError``."""
    bank: dict[int, torch.Tensor] = {}
    if steps:
        noise = torch.stack([randn(shape, generator, "cpu") for _ in steps])
        if torch.device(device).type == "cuda":
            noise = noise.pin_memory().to(device, non_blocking=True)
        bank = dict(zip(steps, noise.to(device)))

    def noise_sampler(step: int, like: torch.Tensor) -> torch.Tensor:
        if step not in bank:
            raise KeyError(f"no noise drawn ahead for sampling step {step} (have {sorted(bank)})")
        return bank[step].to(device=like.device, dtype=like.dtype)

    return noise_sampler


def default_noise_sampler(generator: Generators, steps: Sequence[int], shape, device) -> NoiseSampler:
    """The noise a sampler adds when the caller gives only ``generator``: drawn ahead for ``steps`` (the
    noisy steps) with per-image CPU generators, else drawn step by step. Build it after the start noise is
    drawn from the same generators, so that the start noise comes first in every stream."""
    if isinstance(generator, (list, tuple)) and steps and all(g.device.type == "cpu" for g in generator):
        return noise_bank_sampler(generator, steps, shape, device)
    return generator_noise_sampler(generator)


def guided_eps(model, x: torch.Tensor, t: torch.Tensor, cond, uncond=None, scale: float = 1.0) -> torch.Tensor:
    """eps_uncond + scale * (eps_cond - eps_uncond), with both halves in one UNet call."""
    if uncond is None or scale == 1.0:
        return model.apply_model(x, t, cond)
    x_in, t_in = torch.cat([x, x]), torch.cat([t, t])
    if isinstance(cond, dict):
        c_in = {k: [torch.cat([u, c]) for u, c in zip(uncond[k], cond[k])] for k in cond}
    else:
        c_in = torch.cat([uncond, cond])
    e_uncond, e_cond = model.apply_model(x_in, t_in, c_in).chunk(2)
    return e_uncond + scale * (e_cond - e_uncond)


def ddim_step(x: torch.Tensor, e_t: torch.Tensor, a_t: float, a_prev: float, sigma_t: float,
              noise: torch.Tensor | None = None):
    """One DDIM update from alpha-bar ``a_t`` to ``a_prev``; returns (x_prev, pred_x0)."""
    pred_x0 = (x - (1.0 - a_t) ** 0.5 * e_t) / a_t ** 0.5
    x_prev = a_prev ** 0.5 * pred_x0 + (1.0 - a_prev - sigma_t ** 2) ** 0.5 * e_t
    if sigma_t > 0:
        x_prev = x_prev + sigma_t * noise
    return x_prev, pred_x0


class DDIMSampler:
    """``sample(S, batch_size, shape, conditioning, ...)`` as in CompVis, with a tqdm progress bar."""

    name = "DDIM"

    def __init__(self, model, schedule: str = "linear", **kwargs):
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True):
        self.ddim_timesteps = make_ddim_timesteps(ddim_discretize, ddim_num_steps, self.ddpm_num_timesteps)
        alphas_cumprod = self.model.alphas_cumprod.detach().cpu().numpy()
        sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(alphas_cumprod, self.ddim_timesteps, ddim_eta)
        # The reference feeds these to torch.full, i.e. rounds each to float32: do the same.
        self.ddim_sigmas = sigmas.astype(np.float32)
        self.ddim_alphas = alphas.astype(np.float32)
        self.ddim_alphas_prev = alphas_prev.astype(np.float32)
        self.ddim_eta = ddim_eta
        if verbose:
            print(f"Selected timesteps for {self.name} sampler: {self.ddim_timesteps.tolist()}")

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape, conditioning=None, callback: Callable | None = None,
               img_callback: Callable | None = None, eta: float = 0.0, x_T: torch.Tensor | None = None,
               log_every_t: int = 100, unconditional_guidance_scale: float = 1.0, unconditional_conditioning=None,
               verbose: bool = True, temperature: float = 1.0, generator: Generators = None,
               ddim_discretize: str = "uniform", progress: bool = True, noise_sampler: NoiseSampler | None = None,
               **kwargs):
        """Sample latents of ``(batch_size, *shape)``; returns ``(samples, {'x_inter', 'pred_x0'})``.

        ``generator`` (one, or one per sample) draws the start noise unless ``x_T`` is given. Each eta>0
        step adds ``temperature`` times the noise of ``noise_sampler`` (see :data:`NoiseSampler`), by
        default :func:`default_noise_sampler` on ``generator``: with generators, samples do not depend on
        the global RNG. Unsupported CompVis options (masks, score correctors, ...) raise ``NotImplementedError``.
        """
        unsupported = {k: v for k, v in kwargs.items() if v not in (None, False, 0, 0.0)}
        if unsupported:
            raise NotImplementedError(f"{self.name} sampler options not supported: {sorted(unsupported)}")
        if conditioning is not None and not isinstance(conditioning, dict):
            if conditioning.shape[0] != batch_size:
                raise ValueError(f"conditioning batch {conditioning.shape[0]} != batch_size {batch_size}")
        self.make_schedule(S, ddim_discretize=ddim_discretize, ddim_eta=eta, verbose=verbose)
        device = self.model.device
        size = (batch_size, *shape)
        img = randn(size, generator, device) if x_T is None else x_T.to(device)

        intermediates = {"x_inter": [img], "pred_x0": [img]}
        timesteps = np.flip(self.ddim_timesteps)
        total = len(timesteps)
        self._reset()
        if noise_sampler is None:
            noisy = [i for i in range(total) if self.ddim_sigmas[total - i - 1] > 0]
            noise_sampler = default_noise_sampler(generator, noisy, size, device)
        iterator = tqdm(timesteps, desc=f"{self.name} Sampler", total=total, disable=not progress,
                        leave=False, dynamic_ncols=True)
        for i, step in enumerate(iterator):
            index = total - i - 1
            t = torch.full((batch_size,), int(step), device=device, dtype=torch.long)
            t_next = torch.full((batch_size,), int(timesteps[min(i + 1, total - 1)]), device=device, dtype=torch.long)

            def eps(x, tt):
                return guided_eps(self.model, x, tt, conditioning, unconditional_conditioning,
                                  unconditional_guidance_scale)

            # drawn before the UNet call: with the global RNG (no generator) the order is part of the result
            noise = noise_sampler(i, img) * temperature if self.ddim_sigmas[index] > 0 else None
            img, pred_x0 = self._step(eps, img, t, t_next, index, noise)
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or index == total - 1:
                intermediates["x_inter"].append(img)
                intermediates["pred_x0"].append(pred_x0)
        return img, intermediates

    # ------------------------------------------------------------------ step rule
    def _reset(self):
        pass

    def _coefficients(self, index: int):
        return float(self.ddim_alphas[index]), float(self.ddim_alphas_prev[index]), float(self.ddim_sigmas[index])

    def _step(self, eps, x, t, t_next, index, noise):
        """One update at schedule ``index``: ``(x_prev, pred_x0)``. ``noise``: this step's noise (already
        times the temperature), None where the step adds none (sigma 0)."""
        a_t, a_prev, sigma_t = self._coefficients(index)
        return ddim_step(x, eps(x, t), a_t, a_prev, sigma_t, noise)
