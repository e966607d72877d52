"""DDIM sampling for ``LatentDiffusion`` (CompVis ``DDIMSampler`` API).

The pieces are separate: ``guided_eps`` (classifier-free guidance, one batched UNet call),
``ddim_step`` (the DDIM update on precomputed coefficients) and the sampler's loop. ``PLMSSampler``
reuses the schedule and loop and only swaps the step rule.
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
               ddim_discretize: str = "uniform", progress: bool = True, **kwargs):
        """Sample latents of ``(batch_size, *shape)``; returns ``(samples, {'x_inter', 'pred_x0'})``.

        ``generator`` (one, or one per sample) makes the start noise and the eta>0 noise reproducible
        independently of the global RNG. Unsupported CompVis options (masks, score correctors, ...) raise.
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
        self._noise = None
        if isinstance(generator, (list, tuple)) and eta > 0 and all(g.device.type == "cpu" for g in generator):
            # Per-image CPU generators: draw every step's noise now, in the order the steps would (so the
            # values are the same), and move it in one copy; a per-step copy from pageable host memory makes
            # the host wait for the GPU at every step.
            noisy = [i for i in range(total) if self.ddim_sigmas[total - i - 1] > 0]
            self._noise = {}
            if noisy:
                bank = torch.stack([randn(size, generator, "cpu") for _ in noisy])
                if torch.device(device).type == "cuda":
                    bank = bank.pin_memory().to(device, non_blocking=True)
                self._noise = dict(zip(noisy, bank.to(device)))
        iterator = tqdm(timesteps, desc=f"{self.name} Sampler", total=total, disable=not progress,
                        leave=False, dynamic_ncols=True)
        for i, step in enumerate(iterator):
            index = total - i - 1
            t = torch.full((batch_size,), int(step), device=device, dtype=torch.long)
            t_next = torch.full((batch_size,), int(timesteps[min(i + 1, total - 1)]), device=device, dtype=torch.long)

            def eps(x, tt):
                return guided_eps(self.model, x, tt, conditioning, unconditional_conditioning,
                                  unconditional_guidance_scale)

            img, pred_x0 = self._step(eps, img, t, t_next, index, temperature,
                                      generator if self._noise is None else self._noise.get(i))
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

    def _step(self, eps, x, t, t_next, index, temperature, generator):
        """``generator``: where this step's noise comes from, or the noise itself (drawn ahead)."""
        a_t, a_prev, sigma_t = self._coefficients(index)
        noise = None
        if sigma_t > 0:
            if isinstance(generator, torch.Tensor):
                noise = generator.to(x.dtype) * temperature
            else:
                noise = randn(x.shape, generator, x.device, x.dtype) * temperature
        return ddim_step(x, eps(x, t), a_t, a_prev, sigma_t, noise)
