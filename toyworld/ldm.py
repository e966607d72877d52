"""Train the toy world's latent diffusion model (``configs/toyworld/ldm.yaml``) on a CPU.

Two stages, each a plain loop over a pre-rendered pool of (32x32 render, caption) items:

1. ``vae``: the ``AutoencoderKL`` with L1 + MSE reconstruction and ``kl_weight`` x KL (no GAN or LPIPS
   terms: the world is flat colours and simple textures). ``scale_factor`` is then measured as
   1 / std of the posterior samples of the pool (SD's 0.18215 plays the same part).
2. ``unet``: the ``UNetModel`` as an eps-prediction LDM (uniform t, the simple eps loss with Min-SNR-5
   weights, offset noise 0.3), on posterior samples of the pool's latents, conditioned by the frozen toy
   CLIP text tower (``toyworld.clip``); captions are dropped to ``""`` with probability ``p_uncond`` so that
   classifier-free guidance works; the EMA of the weights is what is saved.

Output folder::

    ldm.yaml                      configs/toyworld/ldm.yaml with the measured scale_factor
    toyworld-ldm.safetensors      the whole LatentDiffusion state dict (CompVis keys, fp16)
    vae_loss.png, unet_loss.png   loss curves (and *_loss.json)
    samples.png                   a grid of samples for a few prompts (DDIM 50, eta 1, CFG 6)
    train.json                    settings, timings, final losses

CLI (after ``python -m toyworld.clip --out DIR``)::

    python -m toyworld.ldm --clip assets/toyworld/clip --out assets/toyworld/ldm
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from runtime.resources import config_path

from .dataset import DEFAULT_MIXTURE, Mixture, iter_samples
from .training import lr_at, save_curve

DEFAULT_CONFIG = config_path("toyworld/ldm.yaml")
WEIGHTS_NAME = "toyworld-ldm.safetensors"
PREVIEW_PROMPTS = (
    "a red circle on the grass", "a blue star against a blue sky", "a yellow triangle on a plain background",
    "a painting of a green heart in the style of stripes", "a painting of a purple square in the style of polka dots",
    "a painting of an orange cross in the style of checkerboard", "a photo of a grumpy cat", "a photo of a happy cat",
)

__all__ = ["render_pool", "cached_pool", "train_vae", "latent_moments", "measure_scale_factor", "min_snr_weights",
           "unet_loss", "train_unet", "build_ldm", "save_ldm", "vae_settings", "decode_u8", "main", "DEFAULT_CONFIG",
           "WEIGHTS_NAME"]


# ---------------------------------------------------------------------------------------- data
def render_pool(n: int, seed: int, size: int = 32, mixture: Mixture = DEFAULT_MIXTURE, progress: bool = True):
    """``(images uint8 [n, 3, size, size], captions, labels)`` of data-set items ``0..n-1`` of ``seed``."""
    from tqdm.auto import tqdm

    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    captions, labels = [], []
    for i, (im, text, label) in enumerate(tqdm(iter_samples(seed, size, mixture, 0, n), total=n, desc="render",
                                               disable=not progress)):
        images[i] = torch.from_numpy(np.array(im.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
        captions.append(text)
        labels.append(label)
    return images, captions, labels


def cached_pool(n: int, seed: int, size: int = 32, cache_dir=None, progress: bool = True):
    """``render_pool``, kept in ``cache_dir`` (default ``~/.cache/toyworld``) under a name that includes a
    hash of the world's code (renderer, captions, sampling), so a changed world is never read stale."""
    import hashlib
    import os

    from runtime.files import atomic_target, read_cache

    here = Path(__file__).resolve().parent
    code = hashlib.sha256(b"".join((here / f).read_bytes() for f in ("render.py", "captions.py", "dataset.py")))
    cache = Path(cache_dir or os.environ.get("TOYWORLD_CACHE", Path.home() / ".cache/toyworld"))
    path = cache / f"pool-{seed}-{n}-{size}-{code.hexdigest()[:12]}.pt"
    cached = read_cache(path, lambda p: _read_pool(p, n, size), "the toy-world pool cache")
    if cached is not None:
        return cached
    images, captions, labels = render_pool(n, seed, size, progress=progress)
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_target(path, "the pool cache") as tmp:
        torch.save({"images": images, "captions": captions, "labels": labels}, tmp)
    return images, captions, labels


def _read_pool(path: Path, n: int, size: int):
    """A pool cache written by :func:`cached_pool`; raises when it is damaged or not a pool of ``n`` images."""
    obj = torch.load(path, weights_only=True)
    images, captions, labels = obj["images"], obj["captions"], obj["labels"]
    if tuple(images.shape) != (n, 3, size, size) or images.dtype != torch.uint8 or len(captions) != n \
            or len(labels) != n:
        raise ValueError(f"not a pool of {n} images of {size} px")
    return images, captions, labels


def to_model_range(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float().div(127.5).sub(1.0)


def decode_u8(ldm, z: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> uint8 images ``[n, 3, H, W]`` (the inverse of ``to_model_range`` after decoding)."""
    return ldm.decode_first_stage(z).clamp(-1, 1).add(1).mul(127.5).round().byte()


# ---------------------------------------------------------------------------------------- stage 1: VAE
def train_vae(vae, images_u8: torch.Tensor, steps: int = 2000, batch_size: int = 64, lr: float = 1e-3,
              kl_weight: float = 1e-6, crop: int | None = 16, crop_frac: float = 0.85, seed: int = 0,
              log_every: int = 50, progress: bool = True):
    """Train ``vae`` (an ``AutoencoderKL``) in place on ``images_u8``; returns the loss history.

    ``crop``: the first ``crop_frac`` of the steps see random ``crop`` x ``crop`` windows (one offset per
    batch), 4x cheaper than whole 32 px images (the autoencoder is convolutional); the rest see whole
    images, so that the mid-block attention at the latent resolution adapts to the full 8x8 grid."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    vae.requires_grad_(True)  # LatentDiffusion freezes its first stage; mode does not matter (no dropout/BN)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    history, t0 = [], time.time()
    bar = tqdm(range(steps), desc="vae", disable=not progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=min(100, steps // 10), final_frac=0.1)
        x = to_model_range(images_u8[torch.randint(len(images_u8), (batch_size,), generator=gen)])
        if crop and crop < x.shape[-1] and step < crop_frac * steps:
            i, j = torch.randint(0, x.shape[-1] - crop + 1, (2,), generator=gen).tolist()
            x = x[:, :, i:i + crop, j:j + crop]
        posterior = vae.encode(x)
        rec = vae.decode(posterior.sample(generator=gen))
        l1, l2 = (rec - x).abs().mean(), (rec - x).pow(2).mean()
        kl = posterior.kl().mean()  # summed over latent dims, averaged over the batch (as CompVis)
        loss = l1 + l2 + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            history.append({"step": step, "l1": l1.item(), "mse": l2.item(), "kl": kl.item(),
                            "time_s": round(time.time() - t0, 1)})
            bar.set_postfix(l1=f"{l1.item():.4f}")
    vae.requires_grad_(False)
    return history


@torch.no_grad()
def latent_moments(vae, images_u8: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (unscaled latents)."""
    means, stds = [], []
    for s in range(0, len(images_u8), batch_size):
        post = vae.encode(to_model_range(images_u8[s:s + batch_size]))
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def measure_scale_factor(mean: torch.Tensor, std: torch.Tensor, seed: int = 0) -> float:
    """1 / std of posterior samples, so that scaled latents have unit variance (SD: 0.18215)."""
    gen = torch.Generator().manual_seed(seed)
    z = mean + std * torch.randn(mean.shape, generator=gen)
    return float(1.0 / z.flatten().std())


# ---------------------------------------------------------------------------------------- stage 2: UNet
def build_ldm(config_path=DEFAULT_CONFIG, scale_factor: float | None = None, transformer_depth: int | None = None):
    """``(ldm, model_config)``: a fresh ``LatentDiffusion`` from the toy config and the config's ``model:`` section
    (a plain dict, :func:`ldm.util.load_model_config`) it was built from, optionally with ``scale_factor`` set and
    with ``transformer_depth`` transformer blocks per attention level."""
    from ldm.util import instantiate_from_config, load_model_config

    model_config = load_model_config(config_path)
    params = model_config["params"]
    if scale_factor is not None:
        params["scale_factor"] = float(scale_factor)
    if transformer_depth is not None:
        params["unet_config"]["params"]["transformer_depth"] = int(transformer_depth)
    return instantiate_from_config(model_config), model_config


def load_clip_text(ldm, clip_dir) -> None:
    """Copy the toy CLIP's text tower (``toyworld.clip`` output) into ``ldm.cond_stage_model``."""
    from transformers import CLIPModel

    from ldm.checkpoint import load_into

    from .clip import ldm_text_config, text_state_dict_for_ldm

    clip = CLIPModel.from_pretrained(str(clip_dir)).float()
    want = ldm_text_config(clip.config)
    have = ldm.cond_stage_model.transformer.text_model.config
    wrong = {k: (v, getattr(have, k)) for k, v in want.items() if getattr(have, k) != v}
    if wrong:
        raise ValueError(f"the CLIP in {clip_dir} does not fit the LDM config's text_config: {wrong}")
    sd = text_state_dict_for_ldm(clip, prefix="transformer.text_model.")
    load_into(ldm.cond_stage_model, sd, strict=True)


def _tokens(ldm, texts: list[str]) -> torch.Tensor:
    return ldm.cond_stage_model.tokenizer(texts, max_length=ldm.cond_stage_model.max_length)


@torch.no_grad()
def encode_all(ldm, texts: list[str], batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """Cross-attention context ``[len(texts), 77, d]`` of the frozen text tower."""
    from tqdm.auto import tqdm

    text = ldm.cond_stage_model.transformer.eval()
    out = []
    for s in tqdm(range(0, len(texts), batch_size), desc="encode captions", disable=not progress):
        out.append(text(input_ids=_tokens(ldm, texts[s:s + batch_size])).last_hidden_state)
    return torch.cat(out)


def min_snr_weights(alphas_cumprod: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-timestep eps-loss weights ``min(SNR_t, gamma) / SNR_t`` (Min-SNR-gamma, Hang et al. 2023), with
    ``SNR_t = abar_t / (1 - abar_t)``; all ones when ``gamma`` <= 0."""
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return snr.clamp(max=gamma) / snr if gamma > 0 else torch.ones_like(snr)


def unet_loss(ldm, z: torch.Tensor, c: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
              weight: torch.Tensor) -> torch.Tensor:
    """``LatentDiffusion.p_losses`` with its default settings (simple eps loss of the model's ``loss_type``,
    no learned logvar, no ELBO term), each sample's loss times ``weight[t]``."""
    eps = ldm.apply_model(ldm.q_sample(z, t, noise), t, c)
    return (weight[t] * ldm.get_loss(eps, noise, mean=False).mean(dim=(1, 2, 3))).mean()


def draw_batch(ldm, gen: torch.Generator, mean: torch.Tensor, std: torch.Tensor, ctx: torch.Tensor,
               empty: torch.Tensor, batch_size: int, p_uncond: float, offset_noise: float,
               droppable: torch.Tensor | None = None):
    """One training batch ``(idx, z, c, t, noise)``, every random draw from ``gen`` in a fixed order (so a seed
    gives the same run): items, latents drawn from their encoder Gaussians (times ``scale_factor``), their
    encoded captions with a ``p_uncond`` share swapped for the empty caption (only items with ``droppable[idx]``
    when given), timesteps, and noise plus ``offset_noise`` times a per-channel constant (see ``train_unet``)."""
    idx = torch.randint(len(mean), (batch_size,), generator=gen)
    z = ldm.scale_factor * (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen))
    c = ctx[idx]  # advanced indexing copies: ctx itself is never written
    drop = torch.rand(batch_size, generator=gen) < p_uncond
    if droppable is not None:
        drop &= droppable[idx]
    c[drop] = empty
    t = torch.randint(0, ldm.num_timesteps, (batch_size,), generator=gen)
    noise = torch.randn(z.shape, generator=gen)
    if offset_noise:
        noise = noise + offset_noise * torch.randn(z.shape[:2] + (1, 1), generator=gen)
    return idx, z, c, t, noise


class UNetTrainer:
    """What the toy UNet's training loops (``train_unet``, ``experiments.ffn.fine_tune_ffn``) share around
    their own loss: the captions encoded once, AdamW on the UNet parameters that require grad with
    ``training.lr_at``'s schedule, clipped gradients, and an EMA copy that ``finish`` loads."""

    def __init__(self, ldm, captions, steps: int, lr: float, min_snr_gamma: float, ema_decay: float,
                 progress: bool = True):
        # The text tower is frozen: encode every caption once (30k x 77 x 64 fp32 is ~0.6 GB) instead of
        # re-running it on every batch (a sixth of a step's time).
        self.ctx = encode_all(ldm, list(captions), progress=progress)
        self.empty = encode_all(ldm, [""], progress=False)[0]
        self.unet = ldm.model
        self.unet.train()
        self.ema = copy.deepcopy(self.unet).eval().requires_grad_(False)
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self._ema_params, self._unet_params = list(self.ema.parameters()), list(self.unet.parameters())
        # fused: one kernel for the whole update instead of a dozen small ops per tensor (CPU too)
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.01, fused=True)
        self.weight = min_snr_weights(ldm.alphas_cumprod, min_snr_gamma)
        self.steps, self.lr, self.ema_decay = steps, lr, ema_decay

    def set_lr(self, step: int) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr_at(step, self.steps, self.lr, warmup=min(200, self.steps // 10), final_frac=0.1)

    def update(self, loss: torch.Tensor, step: int, after_step=None) -> None:
        """Backward, clip, optimizer step, ``after_step()`` (e.g. restoring frozen entries), then the EMA with a
        short warm-up (decay ``min(ema_decay, (1 + step) / (10 + step))``), so the first weights do not linger."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        with torch.no_grad():
            if after_step is not None:
                after_step()
            d = min(self.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(self._ema_params, self._unet_params, 1 - d)

    def finish(self) -> None:
        """Load the EMA weights into the UNet, eval mode."""
        self.unet.load_state_dict(self.ema.state_dict())
        self.unet.eval()


def train_unet(ldm, mean: torch.Tensor, std: torch.Tensor, captions: list[str], steps: int = 5000,
               batch_size: int = 64, lr: float = 5e-4, p_uncond: float = 0.1, ema_decay: float = 0.999,
               offset_noise: float = 0.0, min_snr_gamma: float = 0.0, seed: int = 0, log_every: int = 50,
               progress: bool = True):
    """Train ``ldm.model`` (the UNet) in place; ends with the EMA weights loaded. Returns the history.

    The loss is ``unet_loss``: the LDM's simple eps MSE, each sample weighted by ``min_snr_weights`` when
    ``min_snr_gamma`` > 0, so that the nearly clean timesteps (fine detail) no longer outweigh the noisy
    ones, where shape and texture are decided.

    ``offset_noise``: std of a per-sample, per-channel constant added to the training noise. On an 8x8
    latent the noise's own spatial mean is weak (std 1/8), so the latent's mean, i.e. the picture's
    colour, shows through x_t down to large t: the UNet then reads colour from x_t instead of learning it
    from the prompt, and at sampling time the start noise's mean picks the colour."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    tr = UNetTrainer(ldm, captions, steps, lr, min_snr_gamma, ema_decay, progress)
    history, t0 = [], time.time()
    bar = tqdm(range(steps), desc="unet", disable=not progress)
    for step in bar:
        tr.set_lr(step)
        _, z, c, t, noise = draw_batch(ldm, gen, mean, std, tr.ctx, tr.empty, batch_size, p_uncond, offset_noise)
        loss = unet_loss(ldm, z, c, t, noise, tr.weight)
        tr.update(loss, step)
        if step % log_every == 0 or step == steps - 1:
            history.append({"step": step, "loss": loss.item(), "time_s": round(time.time() - t0, 1)})
            bar.set_postfix(loss=f"{loss.item():.4f}")
    tr.finish()
    return history


# ---------------------------------------------------------------------------------------- output
def save_ldm(ldm, model_config: dict, outdir) -> Path:
    """Write ``ldm.yaml`` (``model_config`` as its ``model:`` section, the only one a model config is read for)
    and the fp16 ``toyworld-ldm.safetensors`` into ``outdir``; returns the weights path."""
    from omegaconf import OmegaConf

    from ldm.checkpoint import save_state_dict

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in ldm.state_dict().items()}
    path = out / WEIGHTS_NAME
    save_state_dict(sd, path, metadata={"config": "ldm.yaml", "trained_by": "toyworld/ldm.py"})
    OmegaConf.save(OmegaConf.create({"model": model_config}), out / "ldm.yaml")
    return path


@torch.no_grad()
def sample_grid(ldm, prompts, path, n_per_prompt: int = 8, steps: int = 50, scale: float = 6.0, seed: int = 0):
    """Save a grid (one row per prompt) of DDIM samples; returns the PIL grid."""
    from PIL import Image

    from ldm.models.diffusion.ddim import DDIMSampler

    sampler = DDIMSampler(ldm)
    rows = []
    lf = 2 ** (len(ldm.first_stage_model.encoder.down) - 1)
    shape = (ldm.channels, ldm.image_size, ldm.image_size)
    for k, prompt in enumerate(prompts):
        gens = [torch.Generator().manual_seed(seed + 1000 * k + i) for i in range(n_per_prompt)]
        c = ldm.get_learned_conditioning([prompt] * n_per_prompt)
        uc = ldm.get_learned_conditioning([""] * n_per_prompt)
        z, _ = sampler.sample(steps, n_per_prompt, shape, conditioning=c, eta=1.0, unconditional_guidance_scale=scale,
                              unconditional_conditioning=uc, generator=gens, verbose=False, progress=False)
        x = decode_u8(ldm, z)
        rows.append(torch.cat(list(x.permute(0, 2, 3, 1)), dim=1))
    grid = Image.fromarray(torch.cat(rows, dim=0).numpy())
    size = ldm.image_size * lf
    grid = grid.resize((grid.width * 2, grid.height * 2), Image.Resampling.NEAREST) if size <= 64 else grid
    grid.save(path)
    return grid


def vae_settings(args, config_path) -> dict:
    """What stage 1's result depends on: its own arguments and the first-stage part of the config (so a
    changed diffusion schedule or UNet reuses the autoencoder)."""
    from ldm.util import load_model_config

    first_stage = load_model_config(config_path)["params"]["first_stage_config"]
    return {"pool": args.pool, "seed": args.seed, "vae_steps": args.vae_steps, "vae_lr": args.vae_lr,
            "batch_size": args.batch_size, "crop": args.vae_crop, "crop_frac": args.vae_crop_frac,
            "first_stage_config": first_stage}


def _stage_vae(args, config_path, out: Path, images) -> tuple[dict, float, list]:
    """Stage 1, or its saved result when ``out/vae.json`` records the same settings."""
    from ldm.checkpoint import load_into, load_state_dict, save_state_dict
    from runtime.files import read_cache, write_text_atomic

    settings = vae_settings(args, config_path)
    meta_path, weights = out / "vae.json", out / "vae.safetensors"
    ldm, _ = build_ldm(config_path)
    vae = ldm.first_stage_model
    def reuse(path: Path):  # the saved stage when it was made with these settings; raises when damaged
        meta = json.loads(path.read_text())
        if meta.get("settings") != settings:
            return None
        load_into(vae, load_state_dict(weights), strict=True)
        return vae.state_dict(), float(meta["scale_factor"]), meta["history"]

    saved = read_cache(meta_path, reuse, "the saved VAE stage") if weights.is_file() else None
    if saved is not None:
        print(f"stage 1 (vae): reusing {weights}")
        return saved
    history = train_vae(vae, images, args.vae_steps, args.batch_size, args.vae_lr, crop=args.vae_crop or None,
                        crop_frac=args.vae_crop_frac, seed=args.seed)
    save_curve(out / "vae_loss.png", history, ("l1", "mse"), "toy-world AutoencoderKL", write_json=True)
    mean, std = latent_moments(vae, images)
    scale = measure_scale_factor(mean, std, args.seed)
    save_state_dict(vae.state_dict(), weights)
    write_text_atomic(meta_path, json.dumps({"settings": settings, "scale_factor": scale, "history": history}) + "\n")
    return vae.state_dict(), scale, history


def _shipped_vae(ldm_dir) -> tuple[dict, float]:
    """First-stage weights and scale_factor of a trained LDM folder (``ldm.yaml`` + weights), so that a
    UNet variant can be trained on the shipped autoencoder (its fp16 weights) without retraining it."""
    from ldm.checkpoint import load_state_dict
    from ldm.util import load_model_config

    d = Path(ldm_dir)
    prefix = "first_stage_model."
    sd = {k[len(prefix):]: v.float() for k, v in load_state_dict(d / WEIGHTS_NAME).items() if k.startswith(prefix)}
    return sd, float(load_model_config(d / "ldm.yaml")["params"]["scale_factor"])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="Train the toy world's VAE and UNet (configs/toyworld/ldm.yaml).")
    p.add_argument("--clip", default=None,
                   help="toy CLIP folder written by python -m toyworld.clip (needed for the UNet)")
    p.add_argument("--out", default="assets/toyworld/ldm")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--stage", choices=("vae", "all"), default="all",
                   help="vae: only stage 1 (reused by a later 'all' run with the same settings)")
    p.add_argument("--pool", type=int, default=30000, help="rendered training items")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae_steps", type=int, default=1200)
    p.add_argument("--vae_lr", type=float, default=1e-3)
    p.add_argument("--unet_steps", type=int, default=5000)
    p.add_argument("--unet_lr", type=float, default=2e-3)
    p.add_argument("--offset_noise", type=float, default=0.3,
                   help="std of a per-channel constant added to the UNet's training noise (see train_unet)")
    p.add_argument("--min_snr_gamma", type=float, default=5.0,
                   help="Min-SNR loss weighting min(SNR, gamma) / SNR of the UNet's eps loss (0: off)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--vae_crop", type=int, default=16,
                   help="VAE crops for the first --vae_crop_frac of its steps (0: whole)")
    p.add_argument("--vae_crop_frac", type=float, default=0.85)
    p.add_argument("--preview_steps", type=int, default=50, help="DDIM steps of samples.png")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--transformer_depth", type=int, default=None,
                   help="transformer blocks per attention level of the UNet (default: the config's, 1)")
    p.add_argument("--vae_from", default=None,
                   help="LDM folder (ldm.yaml + weights) whose autoencoder and scale_factor to reuse instead of "
                        "stage 1, e.g. assets/toyworld/ldm")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stage == "all" and (args.clip is None or not (Path(args.clip) / "config.json").is_file()):
        raise SystemExit(f"--clip {args.clip} is not a toy CLIP folder (no config.json); "
                         "run python -m toyworld.clip first")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    ldm, model_config = build_ldm(args.config, transformer_depth=args.transformer_depth)
    if args.stage == "all":
        load_clip_text(ldm, args.clip)  # fails early when the CLIP does not fit the config
    size = int(model_config["params"]["first_stage_config"]["params"]["ddconfig"]["resolution"])
    images, captions, _ = cached_pool(args.pool, args.seed, size)

    if args.vae_from and args.stage == "all":
        (vae_state, scale), vae_hist = _shipped_vae(args.vae_from), [{"l1": None, "time_s": 0.0}]
    else:
        vae_state, scale, vae_hist = _stage_vae(args, args.config, out, images)
    if args.stage == "vae":
        return {"scale_factor": scale, "vae_final_l1": vae_hist[-1]["l1"]}
    ldm.first_stage_model.load_state_dict(vae_state)
    ldm.scale_factor = scale
    model_config["params"]["scale_factor"] = scale
    mean, std = latent_moments(ldm.first_stage_model, images)

    unet_hist = train_unet(ldm, mean, std, captions, args.unet_steps, args.batch_size, args.unet_lr,
                           offset_noise=args.offset_noise, min_snr_gamma=args.min_snr_gamma, seed=args.seed)
    save_curve(out / "unet_loss.png", unet_hist, ("loss",), "toy-world UNet (eps MSE)", write_json=True)
    path = save_ldm(ldm, model_config, out)
    sample_grid(ldm, PREVIEW_PROMPTS, out / "samples.png", steps=args.preview_steps, seed=args.seed)
    report = {"pool": args.pool, "seed": args.seed, "vae_steps": args.vae_steps, "unet_steps": args.unet_steps,
              "batch_size": args.batch_size, "vae_lr": args.vae_lr, "unet_lr": args.unet_lr,
              "offset_noise": args.offset_noise, "min_snr_gamma": args.min_snr_gamma,
              "transformer_depth": int(model_config["params"]["unet_config"]["params"]["transformer_depth"]),
              "vae_from": args.vae_from, "unet_params": sum(p.numel() for p in ldm.model.parameters()),
              "scale_factor": scale, "vae_final_l1": vae_hist[-1]["l1"], "unet_final_loss": unet_hist[-1]["loss"],
              "vae_time_s": vae_hist[-1]["time_s"], "unet_time_s": unet_hist[-1]["time_s"],
              "total_time_s": round(time.time() - t0, 1), "weights": path.name,
              "weights_mb": round(path.stat().st_size / 2 ** 20, 2)}
    (out / "train.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
