"""``DDPM`` / ``LatentDiffusion``: the SD-v1 latent diffusion model (eps-prediction, CompVis names).

Only what SD-v1 inference and fine-tuning use: the noise schedule buffers, ``q_sample``, the
``p_losses`` objective, the cross-attention ``apply_model``, text conditioning and the VAE round
trip. These are plain ``nn.Module``s; training loops (Lightning) wrap them from outside.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.diffusionmodules.util import SCHEDULE_BUFFERS, extract_into_tensor, schedule_buffers
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import default, instantiate_from_config


def disabled_train(self, mode: bool = True):
    """Replacement for ``.train()`` of frozen sub-models: they stay in eval mode."""
    return self


class DiffusionWrapper(nn.Module):
    """Holds the UNet as ``diffusion_model`` (the ``model.diffusion_model.*`` keys) and routes conditioning."""

    def __init__(self, diff_model_config: Mapping, conditioning_key: str | None):
        super().__init__()
        if conditioning_key not in (None, "crossattn"):
            raise NotImplementedError(f"conditioning_key {conditioning_key!r}: only 'crossattn' (SD v1) is supported")
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key

    def forward(self, x, t, c_concat: list | None = None, c_crossattn: list | None = None):
        if self.conditioning_key is None:
            return self.diffusion_model(x, t)
        context = c_crossattn[0] if len(c_crossattn) == 1 else torch.cat(c_crossattn, 1)
        return self.diffusion_model(x, t, context=context)


class DDPM(nn.Module):
    """Noise schedule, forward process and eps-prediction loss around a denoiser."""

    def __init__(self, unet_config: Mapping, timesteps: int = 1000, beta_schedule: str = "linear",
                 loss_type: str = "l2", ckpt_path: str | None = None, ignore_keys: Sequence[str] = (),
                 load_only_unet: bool = False, monitor: str = "val/loss", use_ema: bool = True,
                 first_stage_key: str = "image", image_size: int = 256, channels: int = 3,
                 log_every_t: int = 100, clip_denoised: bool = True, linear_start: float = 1e-4,
                 linear_end: float = 2e-2, cosine_s: float = 8e-3, given_betas=None,
                 original_elbo_weight: float = 0.0, v_posterior: float = 0.0, l_simple_weight: float = 1.0,
                 conditioning_key: str | None = None, parameterization: str = "eps",
                 scheduler_config: Mapping | None = None, use_positional_encodings: bool = False,
                 learn_logvar: bool = False, logvar_init: float = 0.0):
        super().__init__()
        if parameterization not in ("eps", "x0"):
            raise ValueError(f"parameterization must be 'eps' or 'x0', got {parameterization!r}")
        if use_ema:
            raise NotImplementedError(
                "EMA training copies (use_ema: True) are not supported; set model.params.use_ema=False "
                "(SD v1 configs do). model_ema.* keys in checkpoints are ignored at load.")
        if use_positional_encodings:
            raise NotImplementedError("use_positional_encodings is not part of SD v1")
        if loss_type not in ("l1", "l2"):
            raise ValueError(f"loss_type must be 'l1' or 'l2', got {loss_type!r}")
        self.parameterization = parameterization
        self.cond_stage_model = None
        self.clip_denoised = clip_denoised
        self.log_every_t = log_every_t
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.use_ema = use_ema
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.use_scheduler = scheduler_config is not None
        self.scheduler_config = scheduler_config  # used by training code, never at inference
        self.v_posterior = v_posterior
        self.original_elbo_weight = original_elbo_weight
        self.l_simple_weight = l_simple_weight
        self.monitor = monitor
        self.loss_type = loss_type
        self.register_schedule(given_betas=given_betas, beta_schedule=beta_schedule, timesteps=timesteps,
                               linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s)
        self.learn_logvar = learn_logvar
        logvar = torch.full((self.num_timesteps,), float(logvar_init))
        if learn_logvar:
            self.logvar = nn.Parameter(logvar)
        else:
            self.logvar = logvar  # plain attribute: not in the state dict, as the reference
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, only_model=load_only_unet)

    # ------------------------------------------------------------------ schedule
    def register_schedule(self, given_betas=None, beta_schedule: str = "linear", timesteps: int = 1000,
                          linear_start: float = 1e-4, linear_end: float = 2e-2, cosine_s: float = 8e-3):
        """Register the 12 persistent schedule buffers and ``lvlb_weights`` (see :func:`schedule_buffers`)."""
        buffers = schedule_buffers(beta_schedule, timesteps, linear_start, linear_end, cosine_s, self.v_posterior,
                                   given_betas, self.parameterization)
        self.num_timesteps = int(buffers["betas"].shape[0])
        self.linear_start, self.linear_end = linear_start, linear_end
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=name in SCHEDULE_BUFFERS)

    @property
    def device(self) -> torch.device:
        return self.betas.device

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(acp_t) x_0 + sqrt(1 - acp_t) eps."""
        noise = default(noise, lambda: torch.randn_like(x_start))
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)

    # ------------------------------------------------------------------ objective
    def get_loss(self, pred: torch.Tensor, target: torch.Tensor, mean: bool = True) -> torch.Tensor:
        if self.loss_type == "l1":
            loss = (target - pred).abs()
            return loss.mean() if mean else loss
        return F.mse_loss(target, pred, reduction="mean" if mean else "none")

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any, return_ids: bool = False):
        if return_ids:
            raise NotImplementedError("return_ids (codebook ids) is not part of SD v1")
        if not isinstance(cond, dict):
            cond = {"c_crossattn": cond if isinstance(cond, list) else [cond]}
        return self.model(x_noisy, t, **cond)

    def p_losses(self, x_start: torch.Tensor, cond: Any, t: torch.Tensor, noise: torch.Tensor | None = None):
        """The LDM training loss: ``l_simple_weight * mean(loss_t / exp(logvar_t) + logvar_t) + elbo``.

        Returns ``(loss, loss_dict)`` with ``{train|val}/loss_simple``, ``loss_vlb`` and ``loss``.
        """
        noise = default(noise, lambda: torch.randn_like(x_start))
        x_noisy = self.q_sample(x_start, t, noise)
        model_output = self.apply_model(x_noisy, t, cond)
        target = noise if self.parameterization == "eps" else x_start
        prefix = "train" if self.training else "val"

        per_sample = self.get_loss(model_output, target, mean=False).mean(dim=(1, 2, 3))
        loss_dict = {f"{prefix}/loss_simple": per_sample.mean()}
        logvar_t = self.logvar.to(per_sample.device)[t]
        loss = per_sample / torch.exp(logvar_t) + logvar_t
        if self.learn_logvar:
            loss_dict[f"{prefix}/loss_gamma"] = loss.mean()
            loss_dict["logvar"] = self.logvar.data.mean()
        loss = self.l_simple_weight * loss.mean()
        loss_vlb = (self.lvlb_weights[t] * per_sample).mean()
        loss_dict[f"{prefix}/loss_vlb"] = loss_vlb
        loss = loss + self.original_elbo_weight * loss_vlb
        loss_dict[f"{prefix}/loss"] = loss
        return loss, loss_dict

    # ------------------------------------------------------------------ loading
    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = (), only_model: bool = False):
        from ldm.checkpoint import load_into, load_state_dict

        sd = load_state_dict(path)
        sd = {k: v for k, v in sd.items() if not any(k.startswith(ik) for ik in ignore_keys)}
        report = load_into(self.model if only_model else self, sd, strict=False)
        print(f"Restored from {path}: {report}")
        return report


class LatentDiffusion(DDPM):
    """DDPM in the latent space of a frozen ``AutoencoderKL``, conditioned on frozen CLIP text features."""

    def __init__(self, first_stage_config: Mapping, cond_stage_config: Mapping | str,
                 num_timesteps_cond: int | None = None, cond_stage_key: str = "image",
                 cond_stage_trainable: bool = False, concat_mode: bool = True, cond_stage_forward: str | None = None,
                 conditioning_key: str | None = None, scale_factor: float = 1.0, scale_by_std: bool = False,
                 **kwargs):
        self.num_timesteps_cond = default(num_timesteps_cond, 1)
        if self.num_timesteps_cond > 1:
            raise NotImplementedError("num_timesteps_cond > 1 (shortened conditioning schedules) is not part of SD v1")
        if scale_by_std:
            raise NotImplementedError("scale_by_std is not supported: SD v1 uses a fixed scale_factor (0.18215)")
        if isinstance(cond_stage_config, str):
            raise NotImplementedError(f"cond_stage_config {cond_stage_config!r}: SD v1 needs a text encoder config")
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", ())
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        super().__init__(conditioning_key=conditioning_key, **kwargs)
        self.concat_mode = concat_mode
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_key = cond_stage_key
        self.scale_factor = scale_factor
        self.scale_by_std = scale_by_std
        self.cond_stage_forward = cond_stage_forward
        self.clip_denoised = False

        self.first_stage_model = self._frozen(instantiate_from_config(first_stage_config))
        cond_model = instantiate_from_config(cond_stage_config)
        self.cond_stage_model = cond_model if cond_stage_trainable else self._frozen(cond_model)

        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)

    @staticmethod
    def _frozen(model: nn.Module) -> nn.Module:
        model.eval()
        model.train = disabled_train.__get__(model)  # keep eval mode under a parent's .train()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    # ------------------------------------------------------------------ conditioning and VAE
    def get_learned_conditioning(self, c):
        """Text (str or list of str) -> cross-attention context [B, 77, context_dim]."""
        if self.cond_stage_forward is not None:
            return getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        if callable(getattr(self.cond_stage_model, "encode", None)):
            c = self.cond_stage_model.encode(c)
            return c.mode() if isinstance(c, DiagonalGaussianDistribution) else c
        return self.cond_stage_model(c)

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latent: a posterior sample times ``scale_factor``."""
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample(generator=generator)
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise TypeError(f"encoder_posterior of type {type(encoder_posterior)} not supported")
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False, force_not_quantize: bool = False):
        return self.first_stage_model.decode(z / self.scale_factor)

    def forward(self, x: torch.Tensor, c, *args, **kwargs):
        """Training loss at uniformly drawn timesteps (``x``: scaled latents)."""
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=x.device).long()
        if self.cond_stage_trainable:
            c = self.get_learned_conditioning(c)
        return self.p_losses(x, c, t, *args, **kwargs)
