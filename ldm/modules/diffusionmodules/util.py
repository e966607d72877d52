"""Small numerical pieces shared by the UNet, the DDPM schedule and the samplers."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _torch_checkpoint


# ----------------------------------------------------------------------------- schedules
def make_beta_schedule(schedule: str, n_timestep: int, linear_start: float = 1e-4,
                       linear_end: float = 2e-2, cosine_s: float = 8e-3) -> np.ndarray:
    """Betas in float64 numpy, as the reference computes them (cast to float32 later)."""
    if schedule == "linear":
        # "linear" in LDM means linear in sqrt(beta) (diffusers' "scaled_linear").
        return np.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=np.float64) ** 2
    if schedule == "cosine":
        steps = np.arange(n_timestep + 1, dtype=np.float64) / n_timestep + cosine_s
        alphas = np.cos(steps / (1 + cosine_s) * np.pi / 2) ** 2
        alphas = alphas / alphas[0]
        return np.clip(1 - alphas[1:] / alphas[:-1], 0, 0.999)
    if schedule == "sqrt_linear":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64)
    if schedule == "sqrt":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64) ** 0.5
    raise ValueError(f"unknown beta schedule {schedule!r} (linear, cosine, sqrt_linear, sqrt)")


# The persistent schedule buffers of ``DDPM``, in state-dict order (the keys of ``sd-v1-4.ckpt``).
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")


def schedule_buffers(beta_schedule: str = "linear", timesteps: int = 1000, linear_start: float = 1e-4,
                     linear_end: float = 2e-2, cosine_s: float = 8e-3, v_posterior: float = 0.0,
                     given_betas=None, parameterization: str = "eps") -> dict[str, torch.Tensor]:
    """The noise schedule of a CompVis ``DDPM`` as float32 tensors (what ``DDPM.register_schedule`` registers).

    A plain function so that code which needs the schedule without a model (the diffusers converter) computes
    exactly the model's values. Args are ``DDPM``'s: ``given_betas`` (any sequence), when not None, replaces
    ``make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)``; ``v_posterior``
    mixes the posterior variance towards ``betas``; ``parameterization`` (``"eps"`` or ``"x0"``) picks the
    ELBO weights.

    Returns ``{name: tensor}``: the 12 :data:`SCHEDULE_BUFFERS` in that order (float64 numpy math, then
    float32, as the reference), then ``lvlb_weights`` (float32 torch math, as the reference; a model keeps it
    out of its state dict). All have one entry per training timestep.

    Raises ``ValueError`` for an unknown ``beta_schedule``.
    """
    if given_betas is not None:
        betas = np.asarray(given_betas, dtype=np.float64)
    else:
        betas = make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    v = v_posterior
    posterior_variance = (1 - v) * betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod) + v * betas
    arrays = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        # the variance is 0 at t=0, so the log is clipped
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    }
    out = {name: torch.tensor(value, dtype=torch.float32) for name, value in arrays.items()}

    if parameterization == "eps":
        lvlb = out["betas"] ** 2 / (2 * out["posterior_variance"] * torch.tensor(alphas, dtype=torch.float32)
                                    * (1 - out["alphas_cumprod"]))
    else:
        ac = torch.tensor(alphas_cumprod, dtype=torch.float32)
        lvlb = 0.5 * torch.sqrt(ac) / (2.0 * (1 - ac))
    lvlb[0] = lvlb[1]  # t=0 has zero posterior variance
    out["lvlb_weights"] = lvlb
    return out


def make_ddim_timesteps(method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int) -> np.ndarray:
    """Ascending sub-grid of DDPM steps; +1 so that the final step is t=1, as in the reference."""
    if not 0 < num_ddim_timesteps <= num_ddpm_timesteps:
        raise ValueError(f"number of sampling steps must be in [1, {num_ddpm_timesteps}], got {num_ddim_timesteps}")
    if method == "uniform":
        # The reference grid: every multiple of T // S below T (S + 1 or more steps when S does not divide T).
        # Where it reaches T - 1 (e.g. S = 3 or 9) the reference indexes t = T and crashes; drop that step.
        steps = np.arange(0, num_ddpm_timesteps, num_ddpm_timesteps // num_ddim_timesteps)
        steps = steps[steps + 1 < num_ddpm_timesteps]
    elif method == "quad":
        steps = (np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps) ** 2).astype(int)
    else:
        raise ValueError(f"unknown DDIM discretization {method!r} (uniform, quad)")
    return steps + 1


def make_ddim_sampling_parameters(alphacums: np.ndarray, ddim_timesteps: np.ndarray, eta: float):
    """(sigmas, alphas, alphas_prev) of the DDIM update on the given grid (float64 numpy)."""
    alphacums = np.asarray(alphacums, dtype=np.float64)
    alphas = alphacums[ddim_timesteps]
    alphas_prev = np.concatenate([alphacums[:1], alphacums[ddim_timesteps[:-1]]])
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    return sigmas, alphas, alphas_prev


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape) -> torch.Tensor:
    """``a[t]`` reshaped to broadcast against a batch of shape ``x_shape``."""
    return a.gather(-1, t).reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


# ----------------------------------------------------------------------------- layers
def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000,
                       repeat_only: bool = False) -> torch.Tensor:
    """Sinusoidal embedding ``cat([cos, sin])`` of (possibly fractional) timesteps, float32."""
    if repeat_only:
        return timesteps[:, None].float().expand(-1, dim)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (fp16 statistics are unstable), cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> nn.Module:
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.detach().zero_()
    return module


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    return (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[dims - 1](*args, **kwargs)


def checkpoint(func, inputs, params, flag: bool):
    """Gradient checkpointing when ``flag`` and autograd is recording; a plain call otherwise.

    ``params`` is accepted for CompVis call compatibility; torch's non-reentrant checkpoint
    tracks parameters by itself.
    """
    if flag and torch.is_grad_enabled():
        return _torch_checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)
