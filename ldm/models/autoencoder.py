"""KL-regularised autoencoder (the SD v1 first stage), inference / fine-tuning only.

The constructor and attribute names follow CompVis ``ldm.models.autoencoder.AutoencoderKL`` so the
``first_stage_model.*`` weights of an SD v1 checkpoint load unchanged. The adversarial training loop of the
original (a Lightning module) is not reproduced; ``loss`` is still built from ``lossconfig`` so that configs
such as ``{target: torch.nn.Identity}`` work and key layouts stay the same.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config


class AutoencoderKL(nn.Module):
    def __init__(self, ddconfig: Mapping, lossconfig: Mapping, embed_dim: int,
                 ckpt_path: Optional[str] = None, ignore_keys: Sequence[str] = (),
                 image_key: str = "image", colorize_nlabels: Optional[int] = None,
                 monitor: Optional[str] = None):
        super().__init__()
        ddconfig = dict(ddconfig)
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z=True (mean and log-variance)")
        self.image_key = image_key
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.embed_dim = embed_dim
        if colorize_nlabels is not None:
            raise NotImplementedError("colorize_nlabels (segmentation autoencoders) is not part of SD v1")
        if monitor is not None:
            self.monitor = monitor
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def init_from_ckpt(self, path: str, ignore_keys: Iterable[str] = ()):
        from ldm.checkpoint import load_into, load_state_dict

        sd = load_state_dict(path)
        own = self.state_dict().keys()
        prefix = "first_stage_model."
        if not any(k in own for k in sd) and any(k.startswith(prefix) for k in sd):
            # a full LatentDiffusion checkpoint: take its first-stage sub-dict
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        report = load_into(self, sd, strict=False, ignore_prefixes=tuple(ignore_keys) + ("model_ema.",))
        print(f"Restored from {path}: {report}")
        return report

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        h = self.encoder(x)
        moments = self.quant_conv(h)
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, input: torch.Tensor, sample_posterior: bool = True):
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        dec = self.decode(z)
        return dec, posterior
