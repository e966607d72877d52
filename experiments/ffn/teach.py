"""Teaching waves to the shipped UNet through its FFN weights only (``experiments.ffn``).

The fine-tune trains only feed-forward weights of the transformer blocks (``*.transformer_blocks.*.ff.*``;
everything else frozen) on waves scenes mixed with ordinary world scenes, the latter fitted to the frozen
shipped UNet's own prediction so that the other prompts stay where they were (``fine_tune_ffn``). Two shipped
deltas (``DELTA_FILES``): "units", where only 1/8 of each FFN's hidden units learn (ConceptPrune's premise, a
concept carried by a few FFN neurons, built in; ConceptPrune is not told which), and "dense", every FFN weight.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

from toyworld import mission

from .data import ASSETS, FFN_ASSETS, TEXTURE, ffn_pool, load_base

DELTA_FILE = "ffn_delta.safetensors"
FFN_PATTERN = ".transformer_blocks."  # with ".ff." in the name: the only weights the fine-tune trains
# unit_frac: the share of each FFN's hidden units that learn the texture (those the shipped model uses least on
# world captions; the rest of the FFN stays as shipped); 1.0 trains every FFN weight ("dense", DELTA_FILES).
DELTA_SETTINGS = {"pool": 8000, "texture_frac": 0.5, "steps": 3000, "batch_size": 64, "lr": 4e-3,
                  "offset_noise": 0.3, "min_snr_gamma": 5.0, "seed": 0, "unit_frac": 0.125}
DELTA_FILES = {"units": DELTA_FILE, "dense": "ffn_delta_dense.safetensors"}
VARIANTS = {"units": {}, "dense": {"unit_frac": 1.0}}  # DELTA_SETTINGS overrides per shipped delta


def torch_no_grad(fn):
    """``torch.no_grad()`` around ``fn``, with torch imported only when it runs."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


def is_ffn(name: str) -> bool:
    """A transformer block's feed-forward weight or bias (what the fine-tune trains)."""
    return FFN_PATTERN in name and ".ff." in name


def fine_tune_ffn(ldm, mean, std, captions, is_texture, steps: int, batch_size: int = 64, lr: float = 4e-3,
                  p_uncond: float = 0.1, ema_decay: float = 0.999, offset_noise: float = 0.3,
                  min_snr_gamma: float = 5.0, seed: int = 0, log_every: int = 100, progress: bool = True,
                  masks: dict | None = None) -> list[dict]:
    """``toyworld.ldm.train_unet``'s loop (Min-SNR-weighted eps MSE, offset noise, AdamW, clipped gradients, EMA
    loaded at the end) on the parameters of ``ldm.model`` that require grad, with one change: the items that
    are not ``is_texture`` (the ordinary world scenes) are fitted to the frozen shipped UNet's own prediction
    instead of the true noise, and only they have their caption dropped (``p_uncond``). The waves items teach
    the new texture; the others keep every other prompt, and the unconditional prediction, where the shipped
    model had them (fitting them to the true noise also went on training the shipped model; the trial is on
    docs/experiments/ffn-waves.md). ``masks`` (parameter name of ``ldm.model`` ->
    bool tensor of its shape): only the True entries change (gradients masked, the rest restored after every
    step, weight decay included)."""
    import copy

    import torch
    from tqdm.auto import tqdm

    from toyworld.ldm import UNetTrainer, draw_batch

    gen = torch.Generator().manual_seed(seed)
    is_texture = torch.as_tensor(is_texture, dtype=torch.bool)
    teacher = copy.deepcopy(ldm.model).eval().requires_grad_(False)
    tr = UNetTrainer(ldm, captions, steps, lr, min_snr_gamma, ema_decay, progress)
    own = dict(tr.unet.named_parameters())
    frozen = {n: (own[n], m, own[n].detach().clone()) for n, m in (masks or {}).items()}
    for p, m, _ in frozen.values():
        p.register_hook(lambda g, m=m: g * m)

    def restore_frozen():
        for p, m, orig in frozen.values():
            p.copy_(torch.where(m, p, orig))

    history, t0 = [], time.time()
    bar = tqdm(range(steps), desc="ffn", disable=not progress)
    for step in bar:
        tr.set_lr(step)
        idx, z, c, t, noise = draw_batch(ldm, gen, mean, std, tr.ctx, tr.empty, batch_size, p_uncond, offset_noise,
                                         droppable=~is_texture)
        tex = is_texture[idx]
        x_t = ldm.q_sample(z, t, noise)
        target = noise.clone()
        if (~tex).any():
            with torch.no_grad():
                target[~tex] = teacher(x_t[~tex], t[~tex], c_crossattn=[c[~tex]])
        eps = ldm.apply_model(x_t, t, c)
        loss = (tr.weight[t] * ldm.get_loss(eps, target, mean=False).mean(dim=(1, 2, 3))).mean()
        tr.update(loss, step, after_step=restore_frozen)
        if step % log_every == 0 or step == steps - 1:
            history.append({"step": step, "loss": round(loss.item(), 5), "time_s": round(time.time() - t0, 1)})
            bar.set_postfix(loss=f"{loss.item():.4f}")
    tr.finish()
    return history


@torch_no_grad
def unit_usage(ldm, mean, captions, n: int = 512, seed: int = 0) -> dict:
    """RMS of every FFN hidden unit (the input of each ``ff.net.2``) of ``ldm.model`` over ``n`` training items
    (latent means, noised at uniform t, with their captions): ``{block prefix: [inner]}``."""
    import torch

    from toyworld.ldm import encode_all

    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(mean), generator=gen)[:n]
    sums, hooks = {}, []
    blocks = {name[:-len(".ff.net.2")]: m for name, m in ldm.model.named_modules() if name.endswith(".ff.net.2")
              and FFN_PATTERN in name}
    for prefix, module in blocks.items():
        def hook(_, args, prefix=prefix):
            h = args[0].float()
            sums[prefix] = sums.get(prefix, 0) + h.pow(2).reshape(-1, h.shape[-1]).sum(0)
        hooks.append(module.register_forward_pre_hook(hook))
    tokens = 0
    try:
        for s in range(0, n, 64):
            b = idx[s:s + 64]
            z = ldm.scale_factor * mean[b]
            t = torch.randint(0, ldm.num_timesteps, (len(b),), generator=gen)
            x_t = ldm.q_sample(z, t, torch.randn(z.shape, generator=gen))
            ldm.apply_model(x_t, t, encode_all(ldm, [captions[i] for i in b.tolist()], progress=False))
            tokens += len(b)
    finally:
        for h in hooks:
            h.remove()
    return {p: (v / tokens).sqrt() for p, v in sums.items()}


def unit_masks(ldm, units: dict) -> dict:
    """Trainable entries for hidden units ``units`` ({block prefix: indices}): their value and gate rows of
    ``ff.net.0.proj`` (weight and bias) and their columns of ``ff.net.2.weight``."""
    import torch

    own = dict(ldm.model.named_parameters())
    masks = {}
    for prefix, idx in units.items():
        idx = torch.as_tensor(idx, dtype=torch.long)
        inner = own[f"{prefix}.ff.net.2.weight"].shape[1]
        rows = torch.cat([idx, idx + inner])
        for kind in ("weight", "bias"):
            m = torch.zeros_like(own[f"{prefix}.ff.net.0.proj.{kind}"], dtype=torch.bool)
            m[rows] = True
            masks[f"{prefix}.ff.net.0.proj.{kind}"] = m
        m = torch.zeros_like(own[f"{prefix}.ff.net.2.weight"], dtype=torch.bool)
        m[:, idx] = True
        masks[f"{prefix}.ff.net.2.weight"] = m
        masks[f"{prefix}.ff.net.2.bias"] = torch.zeros_like(own[f"{prefix}.ff.net.2.bias"], dtype=torch.bool)
    return masks


def train_delta(outdir=FFN_ASSETS, assets: Path = ASSETS, progress: bool = True, save: bool = True,
                name: str = DELTA_FILE, **overrides):
    """Fine-tune the shipped UNet's FFN weights on the waves world (``DELTA_SETTINGS``, ``overrides``) with
    ``fine_tune_ffn``: with ``unit_frac`` < 1 only that share of each FFN's hidden units (the least used on the
    world's captions by the shipped model, ``unit_usage``) learns, the rest stays as shipped. Writes ``name``
    (fp16, CompVis keys; every FFN tensor) and its ``.json``. Returns (delta, meta)."""
    import torch

    from runtime.delta import save_delta
    from toyworld.ldm import latent_moments

    s = {**DELTA_SETTINGS, **overrides}
    torch.manual_seed(s["seed"])
    random.seed(s["seed"])
    t0 = time.time()
    images, captions, scenes = ffn_pool(s["pool"], s["seed"], s["texture_frac"])
    render_s = time.time() - t0
    ldm = load_base(assets)
    ldm.requires_grad_(False)
    trained = [n for n, p in ldm.model.named_parameters() if is_ffn(n)]
    for n, p in ldm.model.named_parameters():
        p.requires_grad_(is_ffn(n))
    mean, std = latent_moments(ldm.first_stage_model, images)
    is_texture = [sc.style == TEXTURE for sc in scenes]
    units, masks = None, None
    if s["unit_frac"] < 1:
        world = [i for i, x in enumerate(is_texture) if not x]
        usage = unit_usage(ldm, mean[world], [captions[i] for i in world], seed=s["seed"])
        units = {p: sorted(u.argsort()[:max(1, round(s["unit_frac"] * len(u)))].tolist()) for p, u in usage.items()}
        masks = unit_masks(ldm, units)
    history = fine_tune_ffn(ldm, mean, std, captions, is_texture, s["steps"], s["batch_size"], s["lr"],
                            offset_noise=s["offset_noise"], min_snr_gamma=s["min_snr_gamma"], seed=s["seed"],
                            progress=progress, masks=masks)
    train_s = time.time() - t0 - render_s
    own = dict(ldm.model.named_parameters())
    delta = {f"model.{n}": own[n].detach().half().contiguous() for n in trained}
    n_params = sum(v.numel() for v in delta.values())
    if units is None:
        trained_what = ("every weight and bias of ff.net.0.proj and ff.net.2 of "
                        "model.diffusion_model.*.transformer_blocks.*")
    else:
        trained_what = ("the units' value and gate rows of ff.net.0.proj (weight and bias) and their columns of "
                        "ff.net.2.weight")
    meta = {"texture": TEXTURE, "settings": s, "trained": trained_what, "tensors": len(delta), "params": n_params,
            "trained_params": sum(int(m.sum()) for m in masks.values()) if masks else n_params,
            "unet_params": sum(p.numel() for p in ldm.model.parameters()),
            "texture_items": sum(sc.style == TEXTURE for sc in scenes), "render_s": round(render_s, 1),
            "train_s": round(train_s, 1), "final_loss": history[-1]["loss"], "units": units, "history": history,
            "torch_threads": torch.get_num_threads()}
    if save:
        out = Path(outdir)
        out.mkdir(parents=True, exist_ok=True)
        save_delta(out / name, delta, metadata={"ffn_concept": json.dumps(
            {k: v for k, v in meta.items() if k not in ("history", "units")})})
        (out / name).with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    return delta, meta


def suffix(variant: str) -> str:
    """File and run-name suffix of a shipped delta variant (``VARIANTS``): "" for units, "-dense"."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown FFN delta variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return "" if variant == "units" else f"-{variant}"


def build_checkpoint(out: Path, assets: Path = ASSETS, variant: str = "units", delta=None) -> Path:
    """``{out}/base_waves{suffix}.safetensors``: the shipped checkpoint with the variant's FFN delta (or ``delta``)
    written in (fp16, as shipped); built when missing."""
    from ldm.checkpoint import load_state_dict, save_state_dict

    delta = Path(delta or assets / "ffn" / DELTA_FILES[variant])
    path = Path(out) / f"base_waves{suffix(variant)}.safetensors"
    if path.is_file():
        return path
    sd = dict(load_state_dict(mission.asset_paths(assets)["weights"]))
    changed = dict(load_state_dict(delta))
    unknown = [k for k in changed if k not in sd or sd[k].shape != changed[k].shape]
    if unknown or not all(is_ffn(k) for k in changed):
        raise ValueError(f"{delta} is not an FFN delta of the shipped UNet: {unknown[:3] or list(changed)[:3]}")
    sd.update({k: v.to(sd[k].dtype) for k, v in changed.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    # "built_by" keeps the name of the module that made the shipped results, so the built file stays byte-identical
    save_state_dict(sd, path, metadata={"built_by": "toyworld/ffn_concept.py", "delta": delta.name})
    return path
