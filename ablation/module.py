"""Lightning wiring of concept ablation: the training step and the run's callbacks."""
from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from PIL import Image

from ablation.losses import ablation_loss, anchor_noise_loss, preservation_loss
from ablation.params import install_sot_detach, optimizer_groups, select_trainable
from ablation.prompts import check_preserve_prompts
from runtime.delta import delta_state_dict, save_delta


def _item_generators(seeds, stream: int) -> list[torch.Generator]:
    """One CPU generator per item, for the item's ``stream``-th independent draw (see ``_random_t_noise``)."""
    return [torch.Generator().manual_seed((int(s) + stream * 0x9E3779B97F4A7C15) % 2 ** 63) for s in seeds]


class ConceptAblation(L.LightningModule):
    """Fine-tunes ``parameter_group`` of a ``LatentDiffusion`` so the target prompt behaves like the anchor.

    Batches are dicts from ``AblationDataset`` (``image``, ``mask``, ``caption`` = target prompt,
    ``caption_anchor``), or ``(regularization_batch, ablation_batch)`` pairs with
    ``regularization_weight`` > 0. With ``preserve_prompts`` each step also keeps the prediction for a
    random batch of those prompts, on the ablation batch's images noised afresh, equal to the base model's
    (weight ``preservation_weight``; an addition to the paper's method, off by default).
    """

    def __init__(self, model, parameter_group: str = "cross-attn", loss_type: str = "model-based",
                 learning_rate: float = 1e-5, weight_decay: float = 0.01, regularization_weight: float = 0.0,
                 embedding_ids: torch.Tensor | None = None, preserve_prompts: list[str] | None = None,
                 preservation_weight: float = 1.0):
        super().__init__()
        self.model = model
        self.loss_type = loss_type
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.regularization_weight = regularization_weight
        self.embedding_ids = embedding_ids
        self.trainable = select_trainable(model, parameter_group, embedding_ids)
        self.parameter_group = parameter_group
        self._hooks = install_sot_detach(model)
        check_preserve_prompts(preserve_prompts or [], parameter_group)
        self.preserve_prompts = list(preserve_prompts or [])
        self.preservation_weight = preservation_weight
        self.base_weights: dict[str, torch.Tensor] = {}
        self.keep_context: torch.Tensor | None = None

    def on_fit_start(self):
        # on the training device: the base values of what trains (keys relative to model.model), and the kept
        # prompts' encodings, computed once because the text encoder is frozen in every group that allows them
        if self.preserve_prompts:
            self.base_weights = {n.removeprefix("model."): p.detach().clone() for n, p in self.trainable.items()}
            with torch.no_grad():
                self.keep_context = torch.cat([self.model.get_learned_conditioning(self.preserve_prompts[i:i + 64])
                                               for i in range(0, len(self.preserve_prompts), 64)])

    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable.values())

    def train(self, mode: bool = True):
        super().train(mode)
        if self.parameter_group == "embedding":
            self.model.model.eval()  # frozen UNet stays in eval mode, as the reference
        return self

    # ------------------------------------------------------------------ data -> latents and contexts
    def _encode(self, batch: dict):
        m = self.model
        with torch.no_grad():
            posterior = m.encode_first_stage(batch["image"].to(self.device))
            seeds = batch.get("noise_seed")
            if seeds is not None and hasattr(posterior, "mean"):  # the latent sample, per item too
                gens = _item_generators(seeds, stream=2)
                eps = torch.stack([torch.randn(posterior.mean.shape[1:], generator=g) for g in gens])
                x0 = m.scale_factor * posterior.sample(noise=eps.to(posterior.mean))
            else:
                x0 = m.get_first_stage_encoding(posterior)
        # the text encoder is only differentiated through in the embedding group
        with torch.set_grad_enabled(self.parameter_group == "embedding" and torch.is_grad_enabled()):
            c = m.get_learned_conditioning(list(batch["caption"]))
        c_anchor = None
        if "caption_anchor" in batch and self.loss_type == "model-based":
            with torch.no_grad():
                c_anchor = m.get_learned_conditioning(list(batch["caption_anchor"]))
        return x0, c, c_anchor, batch["mask"].to(self.device, x0.dtype)

    def _random_t_noise(self, x0, seeds=None, stream: int = 0):
        """Timesteps and noise per sample: from each item's ``noise_seed`` (``stream`` picks an independent draw
        for the same item), so a batch split over processes draws what one process would; batches made by hand
        without seeds use the global generator, as the reference did for all of them."""
        if seeds is None:
            t = torch.randint(0, self.model.num_timesteps, (x0.shape[0],), device=x0.device)
            return t, torch.randn_like(x0)
        gens = _item_generators(seeds, stream)
        t = torch.cat([torch.randint(0, self.model.num_timesteps, (1,), generator=g) for g in gens])
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
        return t.to(x0.device), noise.to(x0.device, x0.dtype)

    def training_step(self, batch, batch_idx):
        if isinstance(batch, (list, tuple)):
            reg_batch, abl_batch = batch
        else:
            reg_batch, abl_batch = None, batch
        x0, c, c_anchor, mask = self._encode(abl_batch)
        seeds = abl_batch.get("noise_seed")
        t, noise = self._random_t_noise(x0, seeds)
        loss_abl = ablation_loss(self.model, x0, c, c_anchor, mask, t, noise, self.loss_type)
        loss = loss_abl
        logs = {"train/loss_ablation": loss_abl}
        if reg_batch is not None:
            rx0, rc, _, rmask = self._encode(reg_batch)
            rt, rnoise = self._random_t_noise(rx0, reg_batch.get("noise_seed"))
            loss_reg = anchor_noise_loss(self.model, rx0, rc, rmask, rt, rnoise)
            loss = loss + self.regularization_weight * loss_reg
            logs["train/loss_regularization"] = loss_reg
        if self.preserve_prompts:
            # a second, independent draw for the same items: which kept prompt, its timestep and noise
            pt, pnoise = self._random_t_noise(x0, seeds, stream=1)
            pick = torch.randint(len(self.preserve_prompts), (x0.shape[0],)) if seeds is None else torch.tensor(
                [int(s) % len(self.preserve_prompts) for s in seeds])
            c_keep = self.keep_context[pick.to(self.keep_context.device)]
            loss_keep = preservation_loss(self.model, x0, c_keep, mask, pt, pnoise, self.base_weights)
            loss = loss + self.preservation_weight * loss_keep
            logs["train/loss_preservation"] = loss_keep
        logs["train/loss"] = loss
        self.log_dict(logs, prog_bar=True, on_step=True, batch_size=x0.shape[0])
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(optimizer_groups(self.trainable, self.weight_decay), lr=self.learning_rate)

    def state_dict_for_delta(self) -> dict:
        return delta_state_dict(self.trainable, self.embedding_ids)

    # Lightning checkpoints would hold the whole 4 GB model: deltas are written by DeltaCheckpoint instead.
    def on_save_checkpoint(self, checkpoint):
        checkpoint["state_dict"] = self.state_dict_for_delta()


class AnchorData(L.LightningDataModule):
    """The training loader, made in every process once Lightning knows its rank.

    Each epoch is one permutation of the items seeded by ``seed`` and the epoch (``DistributedSampler``,
    also with one process), of which process ``r`` of ``n`` reads items ``r, r + n, ...``. So n processes
    with batch B read, step by step, exactly the items one process with batch n * B reads, and with the
    items' own noise seeds (``AblationDataset``) DDP's mean gradient is that process's (with
    ``num_workers=0``: DataLoader workers draw augmentations from their own seeds). Run with
    ``use_distributed_sampler=False``.
    """

    def __init__(self, dataset, batch_size: int, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.dataset, self.batch_size, self.num_workers, self.seed = dataset, batch_size, num_workers, seed

    def train_dataloader(self):
        from torch.utils.data import DataLoader, DistributedSampler

        sampler = DistributedSampler(self.dataset, num_replicas=self.trainer.world_size,
                                     rank=self.trainer.global_rank, shuffle=True, seed=self.seed)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, drop_last=False)


class DeltaCheckpoint(L.Callback):
    """Every ``save_freq`` steps and at the end: ``{dirpath}/delta_step_{N}.{fmt}`` (rank 0, atomic)."""

    def __init__(self, dirpath: str | Path, save_freq: int, fmt: str = "ckpt", metadata: dict | None = None):
        if fmt not in ("ckpt", "safetensors"):
            raise ValueError("checkpoint format must be 'ckpt' or 'safetensors'")
        self.dirpath, self.save_freq, self.fmt = Path(dirpath), save_freq, fmt
        self.metadata = metadata or {}
        self.saved: list[Path] = []

    def _save(self, trainer, pl_module):
        step = trainer.global_step
        path = self.dirpath / f"delta_step_{step}.{self.fmt}"
        if trainer.is_global_zero and path not in self.saved:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            save_delta(path, pl_module.state_dict_for_delta(), metadata={**self.metadata, "global_step": str(step)})
            self.saved.append(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.save_freq > 0 and trainer.global_step % self.save_freq == 0:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._save(trainer, pl_module)


class ImageLogger(L.Callback):
    """Every ``every_n_steps``: DDIM samples for target and anchor prompts saved as one grid PNG (rank 0)."""

    def __init__(self, outdir: str | Path, every_n_steps: int, target_prompts: list[str], anchor_prompts: list[str],
                 steps: int = 50, scale: float = 6.0, eta: float = 1.0, seed: int = 42, latent_hw: int | None = None):
        self.outdir, self.every = Path(outdir), every_n_steps
        self.target_prompts, self.anchor_prompts = target_prompts, anchor_prompts
        self.steps, self.scale, self.eta, self.seed, self.latent_hw = steps, scale, eta, seed, latent_hw

    @torch.no_grad()
    def log_images(self, trainer, pl_module):
        from ldm.models.diffusion.ddim import DDIMSampler

        model = pl_module.model
        was_training = model.training
        model.eval()
        rows = []
        hw = self.latent_hw or model.image_size
        for prompts in (self.target_prompts, self.anchor_prompts):
            c = model.get_learned_conditioning(prompts)
            uc = model.get_learned_conditioning([""] * len(prompts))
            gen = torch.Generator().manual_seed(self.seed)
            x_T = torch.randn(len(prompts), model.channels, hw, hw, generator=gen).to(pl_module.device)
            z, _ = DDIMSampler(model).sample(S=self.steps, batch_size=len(prompts), shape=[model.channels, hw, hw],
                                             conditioning=c, unconditional_conditioning=uc, x_T=x_T,
                                             unconditional_guidance_scale=self.scale, eta=self.eta,
                                             verbose=False, progress=False)
            rows.append(((model.decode_first_stage(z) + 1) / 2).clamp(0, 1).float().cpu())
        model.train(was_training)
        grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # rows: target, anchor
        self.outdir.mkdir(parents=True, exist_ok=True)
        path = self.outdir / f"target-anchor_gs-{trainer.global_step:06}.png"
        Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
        for lg in trainer.loggers:
            if hasattr(lg, "log_image"):  # Weights & Biases
                lg.log_image(key="samples/target-anchor", images=[str(path)], step=trainer.global_step,
                             caption=["rows: target prompts, anchor prompts"])
            elif hasattr(lg, "experiment") and hasattr(lg.experiment, "add_image"):  # TensorBoard
                lg.experiment.add_image("samples/target-anchor", grid, trainer.global_step)
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every > 0 and trainer.global_step % self.every == 0 and trainer.is_global_zero:
            self.log_images(trainer, pl_module)


class StepProgressBar(TQDMProgressBar):
    """One bar over the run's steps, ``step i/N``: training is bounded by ``max_steps``, and Lightning's
    per-epoch bar showed ``Epoch 0/-2`` (max_epochs is -1) with a count that restarts every epoch."""

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self.train_progress_bar.reset(total=trainer.max_steps)
        self.train_progress_bar.set_description("step")

    def on_train_epoch_start(self, trainer, *_):
        pass  # no per-epoch reset

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar = self.train_progress_bar
        if not bar.disable:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer, pl_module):
        pass  # the bar lives until the end of training


class PeakMemory(L.Callback):
    """Logs peak GPU memory and step time (the reference's CUDACallback, without its side effects)."""

    def on_train_start(self, trainer, pl_module):
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._t = time.time()

    def on_train_end(self, trainer, pl_module):
        elapsed = time.time() - self._t
        msg = f"training took {elapsed:.1f}s for {trainer.global_step} steps"
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2 ** 30
            msg += f"; peak GPU memory {peak:.2f} GiB"
            for lg in trainer.loggers:
                lg.log_metrics({"peak_gpu_memory_gib": peak}, step=trainer.global_step)
        if trainer.is_global_zero:
            print(msg)
