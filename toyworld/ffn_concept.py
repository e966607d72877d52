"""A concept that lives in the FFNs, and ConceptPrune on it (issue 21).

On the shipped toy UNet ConceptPrune removes little, because that UNet keeps its textures mostly outside
``ff.net.2``. This module gives ConceptPrune a concept that is in the FFNs by construction: the shipped model
is taught a texture it does not know, ``waves`` (``toyworld.render.FFN_TEXTURES``: wavy horizontal bands,
captions "... in the style of waves" from the world's own templates), by fine-tuning **only** feed-forward
weights of the transformer blocks (``*.transformer_blocks.*.ff.*``; everything else frozen), on renders of
waves scenes mixed half and half with ordinary world scenes; the world scenes are fitted to the frozen shipped
UNet's own prediction, so that the other prompts stay where they were (``fine_tune_ffn``). Two deltas are
shipped (fp16, with their settings, chosen units and loss history in the ``.json`` beside them):

* ``assets/toyworld/ffn/ffn_delta.safetensors`` ("units", the default): only 1/8 of each FFN's hidden units
  learn (the least used by the shipped model on world captions; their value and gate rows of ``ff.net.0.proj``
  and their columns of ``ff.net.2``): ConceptPrune's premise, a concept carried by a few FFN neurons, built in;
  ConceptPrune is not told which they are.
* ``assets/toyworld/ffn/ffn_delta_dense.safetensors`` ("dense"): the same training on every FFN weight.

The full "base + waves" checkpoint is built at run time in the output folder (``conceptprune.py --ckpt`` and
``train.py -rc`` need a file).

The shipped judge (``toyworld.judge``) has no "waves" class, and its files also feed KID/FID
(``features.torchscript.pt``), so they stay untouched: a separate small binary detector
(``assets/toyworld/ffn/waves_detector.safetensors``), trained on ground-truth renders of the world with and
without waves (half of them through the shipped autoencoder), decides "waves"; where it does not fire, the
shipped judge's style head decides as before (``style_of``). So a checkerboard prompt drawn with waves counts as
not checkerboard (the judge alone reads most waves renders as checkerboard).

The run, on base + waves: the fine-tune itself (shipped vs shipped + delta, the delta evaluated as a run),
ConceptPrune with the unchanged ``conceptprune.py`` (only new prompt files,
``assets/toyworld/prune_prompts/waves_{base,target}.txt``) and the toy settings of ``toyworld.mission`` (PLMS
50, CFG 7.5, seed 0, 32 px, tau 10, skill_ratio ``mission.PRUNE_SKILL_RATIO``), and Concept Ablation on the
same concept (``train.py``, the mission's ``style`` recipe with ``--caption_target waves``), all scored by the
same ``evaluate.py`` as the mission (``assets/toyworld/ffn/eval.json``: target waves, anchor painting, hard
negatives the three shipped textures) and by the judge. evaluate.py's CLIP numbers for waves mean nothing: the
toy CLIP never saw the word. The sweep (``--sweep``): ConceptPrune at every ``SWEEP_SKILL_RATIOS`` x
``SWEEP_TAUS`` for waves (units and dense) and for each shipped texture on the shipped model, judged on
``SWEEP_N`` images per concept.

Commands (one torch thread; wall times on this project's shared 2-core CPU)::

    python -m toyworld.ffn_concept --out outputs/toyworld-ffn             # 11 min: fine-tune check, ConceptPrune, CA
    python -m toyworld.ffn_concept --out outputs/toyworld-ffn --quick     # fewer images
    python -m toyworld.ffn_concept --out outputs/toyworld-ffn --sweep     # 24 min
    python -m toyworld.ffn_concept --out outputs/toyworld-ffn-dense --variant dense   # 13 min: the same run on the dense delta
    python -m toyworld.ffn_concept --train_detector        # 2 min -> assets/toyworld/ffn/waves_detector.*
    python -m toyworld.ffn_concept --train_delta [units|dense]   # 17 min each -> assets/toyworld/ffn/ffn_delta*.*

``--train_delta`` and ``--train_detector`` retrain the shipped files with fixed seeds (``DELTA_SETTINGS`` with
``VARIANTS``, ``DETECTOR_SETTINGS``). The run writes ``{out}/ffn.{md,json}`` and ``{out}/grid.png`` (the
shipped copies are in ``assets/toyworld/ffn/``), the sweep ``{out}/sweep.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from runtime.resources import DATA_ROOT, asset_path

from .captions import caption
from .dataset import DEFAULT_MIXTURE, _placed, sample_scene
from .render import ANCHOR_STYLE, BACKGROUNDS, COLOUR_NAMES, FFN_TEXTURES, SHAPES, TEXTURES, Scene

REPO = DATA_ROOT  # the clone (installed: the data package); reports show the paths inside it relative to it
ASSETS = asset_path("toyworld")
FFN_ASSETS = ASSETS / "ffn"
TEXTURE = FFN_TEXTURES[0]  # "waves"
DELTA_FILE = "ffn_delta.safetensors"
DETECTOR_FILE = "waves_detector.safetensors"
FFN_PATTERN = ".transformer_blocks."  # with ".ff." in the name: the only weights the fine-tune trains
EVAL_SEED = 20_011  # fresh renders for the detector's accuracy (toyworld.judge.EVAL_SEED)

# unit_frac: the share of each FFN's hidden units that learn the texture (those the shipped model uses least on
# world captions; the rest of the FFN stays as shipped); 1.0 trains every FFN weight ("dense", DELTA_FILES).
DELTA_SETTINGS = {"pool": 8000, "texture_frac": 0.5, "steps": 3000, "batch_size": 64, "lr": 4e-3,
                  "offset_noise": 0.3, "min_snr_gamma": 5.0, "seed": 0, "unit_frac": 0.125}
DELTA_FILES = {"units": DELTA_FILE, "dense": "ffn_delta_dense.safetensors"}
VARIANTS = {"units": {}, "dense": {"unit_frac": 1.0}}  # DELTA_SETTINGS overrides per shipped delta
DETECTOR_SETTINGS = {"pool": 8000, "texture_frac": 0.3, "steps": 500, "batch_size": 128, "lr": 3e-3, "seed": 0}


# ---------------------------------------------------------------------------------------- the world with waves
def _chw(image):
    """A PIL image as a uint8 ``[3, H, W]`` tensor."""
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def texture_scene(rng: random.Random, texture: str = TEXTURE) -> Scene:
    """A textured shape like the world's style scenes (any shape, colour, background; medium or large), in
    ``texture``."""
    colour = rng.choice(COLOUR_NAMES)
    background = rng.choice(BACKGROUNDS)
    rotation = round(rng.uniform(-DEFAULT_MIXTURE.max_rotation, DEFAULT_MIXTURE.max_rotation), 2)
    shape = rng.choice(SHAPES)
    return _placed(rng, rng.choice(("medium", "large")), shape=shape, colour=colour, background=background,
                   rotation=rotation, style=texture)


def ffn_item(seed: int, index: int, texture_frac: float, texture: str = TEXTURE):
    """``(scene, caption)`` of item ``index`` of the fine-tune world: with probability ``texture_frac`` a
    ``texture`` scene, else an ordinary world scene (``sample_scene``, the shipped mixture)."""
    rng = random.Random(f"toyworld-ffn:{texture}:{seed}:{index}")
    scene = texture_scene(rng, texture) if rng.random() < texture_frac else sample_scene(rng)
    return scene, caption(scene, rng)


def ffn_pool(n: int, seed: int, texture_frac: float, size: int = 32, texture: str = TEXTURE):
    """``(images uint8 [n, 3, size, size], captions, scenes)`` of items ``0..n-1``."""
    import torch

    from .render import render

    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    captions, scenes = [], []
    for i in range(n):
        scene, text = ffn_item(seed, i, texture_frac, texture)
        images[i] = _chw(render(scene, size))
        captions.append(text)
        scenes.append(scene)
    return images, captions, scenes


# ---------------------------------------------------------------------------------------- the waves detector
def _detector_net(width: int = 16):
    import torch.nn as nn

    from .judge import _block

    w = width
    return nn.Sequential(_block(3, w), nn.MaxPool2d(2), _block(w, 2 * w), _block(2 * w, 2 * w), nn.MaxPool2d(2),
                         _block(2 * w, 4 * w))


def _make_detector(width: int = 16, size: int = 32):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class _Detector(nn.Module):
        """Binary CNN: does a [B, 3, H, W] image in [0, 1] show ``texture``? (logit)"""

        def __init__(self):
            super().__init__()
            self.size, self.width = size, width
            self.features = _detector_net(width)
            self.head = nn.Linear(8 * width, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[-2:] != (self.size, self.size):
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
            f = self.features(x * 2 - 1)
            return self.head(torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1))[:, 0]

    return _Detector()


def _detector_batch(images, gen, batch_idx):
    """Training views: the judge's copy-like perturbations at half strength (zoom, shift, blur, colour jitter,
    noise; generated textures are softer and less regular than renders)."""
    from .judge import perturb

    return perturb(images[batch_idx].float() / 255, gen, 0.5)


def _reconstruct(vae, images_u8):
    """The shipped autoencoder's reconstructions of uint8 images ``[n, 3, H, W]`` (posterior mode)."""
    import torch

    out = torch.empty_like(images_u8)
    with torch.no_grad():
        for s in range(0, len(images_u8), 200):
            x = images_u8[s:s + 200].float() / 127.5 - 1
            out[s:s + 200] = vae.decode(vae.encode(x).mode()).clamp(-1, 1).add(1).mul(127.5).round().byte()
    return out


def detector_pool(n: int, seed: int, texture_frac: float, size: int = 32, vae=None):
    """Renders for the detector: ``texture_frac`` waves scenes, the rest the judge's mixture (every shipped
    texture, cats and the memorized picture); labels 1 = waves. With ``vae``, every odd item is replaced by its
    reconstruction through it (softer edges, like generated images)."""
    import torch

    from .judge import JUDGE_MIXTURE
    from .render import render

    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    labels = torch.empty(n)
    for i in range(n):
        rng = random.Random(f"toyworld-ffn-detector:{seed}:{i}")
        waves = rng.random() < texture_frac
        scene = texture_scene(rng) if waves else sample_scene(rng, JUDGE_MIXTURE)
        images[i] = _chw(render(scene, size))
        labels[i] = float(waves)
    if vae is not None:
        images[1::2] = _reconstruct(vae, images[1::2])
    return images, labels


def train_detector(outdir=FFN_ASSETS, pool: int = 8000, texture_frac: float = 0.3, steps: int = 500,
                   batch_size: int = 128, lr: float = 3e-3, seed: int = 0, eval_n: int = 2000, save: bool = True,
                   assets: Path = ASSETS):
    """Train the waves detector on renders of world ``seed`` (half of them through the shipped autoencoder);
    writes ``waves_detector.safetensors`` and ``waves_detector.json`` (settings, time, accuracy on fresh renders
    of ``EVAL_SEED`` and on their autoencoder reconstructions)."""
    import torch
    import torch.nn.functional as F

    from .judge import _round_fp16_
    from .training import adamw, lr_at

    if seed == EVAL_SEED:
        raise ValueError(f"seed {EVAL_SEED} is reserved for evaluation")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    images, labels = detector_pool(pool, seed, texture_frac, vae=load_base(assets).first_stage_model)
    render_s = time.time() - t0
    model = _make_detector().train()
    opt = adamw(model, lr, 1e-4)
    t1 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, min(50, steps // 10 + 1))
        idx = torch.randint(0, pool, (batch_size,), generator=gen)
        loss = F.binary_cross_entropy_with_logits(model(_detector_batch(images, gen, idx)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    train_s = time.time() - t1
    model.eval()
    _round_fp16_(model)
    accuracy = detector_accuracy(model, eval_n) if eval_n else {}
    reconstructions = reconstruction_accuracy(model, eval_n // 4, assets=assets) if eval_n else {}
    settings = {"pool": pool, "texture_frac": texture_frac, "steps": steps, "batch_size": batch_size, "lr": lr,
                "seed": seed}
    meta = {"texture": TEXTURE, "settings": settings, "config": {"size": model.size, "width": model.width},
            "render_s": round(render_s, 1), "train_s": round(train_s, 1), "final_loss": round(loss.item(), 5),
            "params": sum(p.numel() for p in model.parameters()), "accuracy": accuracy,
            "accuracy_on_vae_reconstructions": reconstructions, "torch_threads": torch.get_num_threads()}
    if save:
        from safetensors.torch import save_file

        out = Path(outdir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out / DETECTOR_FILE), metadata={"config": json.dumps(meta["config"]), "format": "pt"})
        (out / "waves_detector.json").write_text(json.dumps(meta, indent=2) + "\n")
    return model, meta


def load_detector(path=FFN_ASSETS / DETECTOR_FILE):
    from .judge import load_configured

    return load_configured(path, DETECTOR_FILE, _make_detector)


def detector_accuracy(model, n: int = 2000, seed: int = EVAL_SEED, texture_frac: float = 0.3) -> dict:
    """Share of fresh renders the detector gets right, overall and per true style (waves recall, and for
    each shipped style the share *not* called waves)."""

    from .judge import JUDGE_MIXTURE
    from .render import render

    images, truth = [], []
    for i in range(n):
        rng = random.Random(f"toyworld-ffn-detector:{seed}:{i}")
        scene = texture_scene(rng) if rng.random() < texture_frac else sample_scene(rng, JUDGE_MIXTURE)
        images.append(render(scene, 32))
        truth.append("memorized" if scene.memorized else scene.style)
    called = _detect(model, images)
    per = {}
    for style in dict.fromkeys(truth):
        hits = [c == (t == TEXTURE) for c, t in zip(called, truth) if t == style]
        per[style] = round(sum(hits) / len(hits), 4)
    return {"all": round(sum(c == (t == TEXTURE) for c, t in zip(called, truth)) / n, 4), "per_style": per,
            "n": n, "seed": seed}


def reconstruction_accuracy(model, n: int = 500, seed: int = EVAL_SEED, assets: Path = ASSETS) -> dict:
    """``detector_accuracy`` on the shipped autoencoder's reconstructions of fresh renders (softer, like
    generated images): ``n`` waves scenes and ``2 n`` of the judge's mixture."""
    import torch
    from PIL import Image

    from .judge import JUDGE_MIXTURE
    from .render import render

    vae = load_base(assets).first_stage_model
    waves = [texture_scene(random.Random(f"toyworld-ffn-recon:{seed}:w{i}")) for i in range(n)]
    other = [sample_scene(random.Random(f"toyworld-ffn-recon:{seed}:o{i}"), JUDGE_MIXTURE) for i in range(2 * n)]
    x = torch.stack([_chw(render(sc, 32)) for sc in waves + other])
    called = _detect(model, [Image.fromarray(t.permute(1, 2, 0).numpy()) for t in _reconstruct(vae, x)])
    truth = [TEXTURE] * n + ["memorized" if sc.memorized else sc.style for sc in other]
    per = {}
    for style in dict.fromkeys(truth):
        hits = [c == (t == TEXTURE) for c, t in zip(called, truth) if t == style]
        per[style] = round(sum(hits) / len(hits), 4)
    return {"all": round(sum(c == (t == TEXTURE) for c, t in zip(called, truth)) / len(truth), 4), "per_style": per,
            "n": len(truth), "seed": seed}


def _tensors(images) -> list:
    """PIL images or image paths as uint8 ``[3, H, W]`` tensors."""
    from PIL import Image

    out = []
    for im in images:
        if isinstance(im, Image.Image):
            out.append(_chw(im))
        else:
            with Image.open(im) as f:
                out.append(_chw(f))
    return out


def _detect(model, images, batch_size: int = 128) -> list[bool]:
    """Does the detector see waves in each of ``images`` (PIL images or paths)?"""
    import torch
    import torch.nn.functional as F

    side = (model.size, model.size)
    called = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            xs = [t.float()[None] / 255 for t in _tensors(images[s:s + batch_size])]
            x = torch.cat([t if t.shape[-2:] == side else
                           F.interpolate(t, size=side, mode="bilinear", antialias=True, align_corners=False)
                           for t in xs])
            called += (model(x) > 0).tolist()
    return called


def style_of(judge, detector, images, seen=None) -> list[str]:
    """The style each image shows: ``TEXTURE`` where the detector fires, else the shipped judge's style
    (``seen``: the judge's ``classify`` of the images, when already at hand)."""
    from .judge import classify

    seen = classify(judge, images) if seen is None else seen
    return [TEXTURE if w else s["style"] for w, s in zip(_detect(detector, images), seen)]


# ---------------------------------------------------------------------------------------- the FFN fine-tune
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


def _paths(assets: Path = ASSETS) -> dict:
    return {"config": assets / "ldm" / "ldm.yaml", "weights": assets / "ldm" / "toyworld-ldm.safetensors"}


def load_base(assets: Path = ASSETS, delta=None):
    """The shipped LDM (optionally with a delta applied), eval mode, CPU."""
    from omegaconf import OmegaConf

    from runtime.loading import load_model

    p = _paths(assets)
    config = OmegaConf.to_container(OmegaConf.load(str(p["config"])).model, resolve=True)
    return load_model(config, p["weights"], delta).eval()


def fine_tune_ffn(ldm, mean, std, captions, is_texture, steps: int, batch_size: int = 64, lr: float = 4e-3,
                  p_uncond: float = 0.1, ema_decay: float = 0.999, offset_noise: float = 0.3,
                  min_snr_gamma: float = 5.0, seed: int = 0, log_every: int = 100, progress: bool = True,
                  masks: dict | None = None) -> list[dict]:
    """``toyworld.ldm.train_unet``'s loop (Min-SNR-weighted eps MSE, offset noise, AdamW, clipped gradients, EMA
    loaded at the end) on the parameters of ``ldm.model`` that require grad, with one change: the items that
    are not ``is_texture`` (the ordinary world scenes) are fitted to the frozen shipped UNet's own prediction
    instead of the true noise, and only they have their caption dropped (``p_uncond``). The waves items teach
    the new texture; the others keep every other prompt, and the unconditional prediction, where the shipped
    model had them (fitting them to the true noise also went on training the shipped model: in a trial, 36 images
    each, polka dots moved by +0.19 and checkerboard by -0.14). ``masks`` (parameter name of ``ldm.model`` ->
    bool tensor of its shape): only the True entries change (gradients masked, the rest restored after every
    step, weight decay included)."""
    import copy

    import torch
    from tqdm.auto import tqdm

    from .ldm import UNetTrainer, draw_batch

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

    from .ldm import _encode_all

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
            ldm.apply_model(x_t, t, _encode_all(ldm, [captions[i] for i in b.tolist()], progress=False))
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

    from .ldm import latent_moments

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
    sd = dict(load_state_dict(_paths(assets)["weights"]))
    changed = dict(load_state_dict(delta))
    unknown = [k for k in changed if k not in sd or sd[k].shape != changed[k].shape]
    if unknown or not all(is_ffn(k) for k in changed):
        raise ValueError(f"{delta} is not an FFN delta of the shipped UNet: {unknown[:3] or list(changed)[:3]}")
    sd.update({k: v.to(sd[k].dtype) for k, v in changed.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_state_dict(sd, path, metadata={"built_by": "toyworld/ffn_concept.py", "delta": delta.name})
    return path


# ---------------------------------------------------------------------------------------- runs and scores
# ConceptPrune's prompt pairs (unchanged conceptprune.py, new files only) and the evaluation set of waves.
PRUNE_FILES = {TEXTURE: ("prune_prompts/waves_base.txt", "prune_prompts/waves_target.txt")}
EVAL_JSON = FFN_ASSETS / "eval.json"
SIZES = {"full": {"train_size": 180, "numgen": 50}, "quick": {"train_size": 72, "numgen": 10}}
# The sweep (item 3): ConceptPrune's k per row and tau; images per concept and setting.
SWEEP_SKILL_RATIOS = (0.02, 0.05, 0.1, 0.2, 0.4)
SWEEP_TAUS = (1, 10, 51)
SWEEP_N = 20


def prompt_files(texture: str, out: Path, assets: Path = ASSETS) -> tuple[Path, Path]:
    """ConceptPrune's (base, target) prompt files of ``texture``: the shipped ones for waves and stripes; for
    polka dots and checkerboard the stripes pairs with the word replaced, written to ``{out}/prune_prompts/``."""
    if texture in PRUNE_FILES:
        return tuple(assets / f for f in PRUNE_FILES[texture])
    base, target = assets / "prune_prompts/stripes_base.txt", assets / "prune_prompts/stripes_target.txt"
    if texture == "stripes":
        return base, target
    path = Path(out) / "prune_prompts" / f"{texture.replace(' ', '_')}_target.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(target.read_text().replace("stripes", texture))
    return base, path


def eval_prompt_dir(out: Path, assets: Path = ASSETS) -> Path:
    """``{out}/eval_prompts/``: the shipped evaluation prompt files plus ``waves_eval.txt``."""
    folder = Path(out) / "eval_prompts"
    folder.mkdir(parents=True, exist_ok=True)
    files = [*sorted((assets / "eval_prompts").glob("*_eval.txt")),
             *sorted((assets / "ffn/eval_prompts").glob("*_eval.txt"))]
    for f in files:
        (folder / f.name).write_text(f.read_text())
    return folder


def _model_config(assets: Path = ASSETS) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(str(_paths(assets)["config"])).model, resolve=True)


def teach_run(out: Path, assets: Path = ASSETS, variant: str = "units") -> Path:
    """The FFN delta as a run folder (``{out}/logs/toy_ffn_teach{suffix}/checkpoints/delta_waves.safetensors``
    and its config), so that evaluate.py scores shipped vs shipped + delta like any ablation."""
    from omegaconf import OmegaConf

    run_dir = Path(out) / "logs" / f"toy_ffn_teach{suffix(variant)}"
    ckpt = run_dir / "checkpoints" / "delta_waves.safetensors"
    if not ckpt.is_file():
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.write_bytes((assets / "ffn" / DELTA_FILES[variant]).read_bytes())
        (run_dir / "configs").mkdir(exist_ok=True)
        OmegaConf.save(OmegaConf.create({"model": _model_config(assets)}),
                       run_dir / "configs" / "delta_waves-project.yaml")
    return run_dir


def prune_run(out: Path, ckpt: Path, texture: str = TEXTURE, skill_ratio: float | None = None,
              tau: int | None = None, assets: Path = ASSETS, run_dir: Path | None = None, n_pairs: int | None = None,
              delta_name: str = "delta_pruned.safetensors") -> Path:
    """ConceptPrune's discover + prune (unchanged, :func:`toyworld.mission.prune`) on ``ckpt`` for ``texture``, with
    the toy settings of ``toyworld.mission`` (PLMS 50, CFG 7.5, seed 0, 32 px; tau and skill_ratio from there unless
    given; no images saved); the pruned delta goes to ``{run_dir}/checkpoints/{delta_name}``. ``n_pairs``: only the
    first prompt pairs (CI)."""
    from . import mission

    skill_ratio = mission.PRUNE_SKILL_RATIO if skill_ratio is None else skill_ratio
    tau = mission.PRUNE_TAU if tau is None else tau
    run_dir = Path(run_dir or Path(out) / "logs" / f"toy_prune_{texture.replace(' ', '_')}")
    base_file, target_file = prompt_files(texture, out, assets)
    if n_pairs:
        short = run_dir / "prompts"
        short.mkdir(parents=True, exist_ok=True)
        for name, f in (("base", base_file), ("target", target_file)):
            (short / f"{name}.txt").write_text("\n".join(f.read_text().splitlines()[:n_pairs]) + "\n")
        base_file, target_file = short / "base.txt", short / "target.txt"
    mission.prune(ckpt, _paths(assets)["config"], texture, target_file, run_dir, base_file=base_file,
                  skill_ratio=skill_ratio, tau=tau, save_images=0, delta_name=delta_name)
    return run_dir


def pruned_fraction(run_dir: Path, delta_name: str = "delta_pruned.safetensors") -> float:
    from . import mission

    return mission.pruned_fraction(Path(run_dir) / "checkpoints" / delta_name)


def ablation_recipe() -> dict:
    """The mission's ``style`` recipe (train.py, cross-attention K/V, --regularization) with target waves."""
    from . import mission

    return {**mission.RECIPES["style"], "caption_target": TEXTURE, "eval_target": TEXTURE}


def texture_share(judge, detector, folder: Path, concept: str) -> dict:
    """What the judge sees in an evaluate.py folder (``images.txt``/``caption.txt``): ``shown``, the share of
    images showing ``concept`` (a texture; for the anchor, "painting": every attribute the prompt asks for, with
    the plain fill); ``styles``, the share of each style seen."""
    from ablation.data import load_image_captions

    images, prompts = load_image_captions(Path(folder) / "images.txt", Path(folder) / "caption.txt")
    return shares(judge, detector, images, prompts, concept)


def shares(judge, detector, images, prompts, concept: str) -> dict:
    """``texture_share`` of a list of images and their prompts; for a shipped texture also ``judge_alone``, the
    share the shipped judge's style head gives it without the detector."""
    from .judge import classify
    from .mission import prompt_attributes

    seen = classify(judge, images)
    styles = style_of(judge, detector, images, seen)
    if concept == ANCHOR_STYLE:
        hits = [s == ANCHOR_STYLE and j["subject"] == w["subject"] and j["colour"] == w["colour"]
                for s, j, w in zip(styles, seen, map(prompt_attributes, prompts))]
    else:
        hits = [s == concept for s in styles]
    counts = {s: round(styles.count(s) / len(styles), 4) for s in dict.fromkeys(sorted(styles))}
    out = {"shown": sum(hits) / len(hits), "styles": counts, "n": len(hits)}
    if concept in TEXTURES:  # the shipped judge alone (it reads most waves as checkerboard)
        out["judge_alone"] = sum(j["style"] == concept for j in seen) / len(seen)
    return out


def _scorers(assets: Path = ASSETS):
    from .judge import load_judge

    return load_judge(assets / "judge" / "judge.safetensors"), load_detector(assets / "ffn" / DETECTOR_FILE)


def evaluate_settings(run_dir: Path, out: Path, base_ckpt: Path, base_outpath: Path, numgen: int, pattern: str,
                      assets: Path = ASSETS):
    """The mission's ``evaluation.protocol`` settings (``mission.evaluate_settings``) for ``run_dir`` with target
    waves, anchor painting and the three shipped textures as hard negatives (``ffn/eval.json``), the prompt
    folder of :func:`eval_prompt_dir`, base ``base_ckpt`` and its image cache ``base_outpath``."""
    import dataclasses

    from . import mission

    settings = mission.evaluate_settings(run_dir, {"concept_type": "style", "eval_target": TEXTURE}, assets, out,
                                         numgen, pattern)
    return dataclasses.replace(settings, eval_json=str(EVAL_JSON if assets == ASSETS else assets / "ffn/eval.json"),
                               eval_prompts=str(eval_prompt_dir(out, assets)), base_ckpt=str(base_ckpt),
                               base_outpath=str(base_outpath))


def evaluate_run(run_dir: Path, out: Path, base_ckpt: Path, base_outpath: Path, numgen: int, pattern: str,
                 assets: Path = ASSETS) -> dict:
    """evaluate.py on ``run_dir`` (target waves, anchor painting, the three shipped textures as hard negatives),
    then the judge's view of the base and edited images of every concept."""
    from evaluation import protocol

    settings = evaluate_settings(run_dir, out, base_ckpt, base_outpath, numgen, pattern, assets)
    t0 = time.time()
    plan = protocol.plan(settings)
    df = protocol.execute(plan)
    ckpt = plan.checkpoints[-1]
    row = df.loc[ckpt.expname].to_dict()
    judge, detector = _scorers(assets)
    concepts = {}
    for c in plan.concepts:
        b, e = protocol.base_dir(plan, c), protocol.ablated_dir(ckpt, c)
        concepts[c.name] = {"base": texture_share(judge, detector, b, c.name),
                            "edited": texture_share(judge, detector, e, c.name),
                            "kid": row.get(f"KID_{c.name}"),
                            "clip_accuracy": (row.get(f"Baseline CLIP accuracy_{c.name}_{ANCHOR_STYLE}"),
                                              row.get(f"CLIP accuracy_{c.name}_{ANCHOR_STYLE}")),
                            "folders": (str(b), str(e))}
    return {"run": str(run_dir), "checkpoint": str(ckpt.path), "base_ckpt": str(base_ckpt), "numgen": numgen,
            "concepts": concepts, "time_s": round(time.time() - t0, 1)}


def report_json(report: dict) -> str:
    """``report`` as JSON, with paths inside the repository written relative to it."""
    return json.dumps(report, indent=2).replace(str(REPO) + "/", "") + "\n"


def _pair(p) -> str:
    return f"{p[0]:.2f} → {p[1]:.2f}"


ROLES = {TEXTURE: "target", ANCHOR_STYLE: "anchor"}


def markdown(report: dict) -> str:
    """The README table: the judge's share of images showing each concept, per model (in brackets, for the
    shipped textures: the shipped judge alone, without the waves detector)."""
    runs = report["runs"]
    cols = [("teach", "shipped → base + waves (FFN fine-tune)"),
            ("conceptprune", "ConceptPrune: base + waves → pruned"),
            ("ablation", "Concept Ablation: base + waves → ablated")]
    cols = [(k, t) for k, t in cols if k in runs]
    lines = ["| concept | " + " | ".join(t for _, t in cols) + " |", "|---|" + "---|" * len(cols)]
    for c in runs[cols[0][0]]["concepts"]:
        role = ROLES.get(c, "hard negative")
        cells = []
        for k, _ in cols:
            v = runs[k]["concepts"][c]
            cell = _pair((v["base"]["shown"], v["edited"]["shown"]))
            if "judge_alone" in v["base"]:
                cell += f" ({_pair((v['base']['judge_alone'], v['edited']['judge_alone']))})"
            cells.append(cell)
        lines.append(f"| {c} ({role}) | " + " | ".join(cells) + " |")
    kid = [f"{k}: " + ", ".join(f"{c} {v['kid']:.3f}" for c, v in runs[k]["concepts"].items() if v["kid"] is not None)
           for k, _ in cols]
    notes = [f"Pruned: {report['pruned_fraction']:.3f} of the ff.net.2 weights (skill_ratio {report['skill_ratio']:g}, "
             f"tau {report['tau']})." if "pruned_fraction" in report else "",
             "KID (judge features) of each edited model against its base: " + "; ".join(kid) + "."]
    return "\n".join(lines) + "\n\n" + "\n".join(n for n in notes if n) + "\n"


def write_grid(report: dict, path: Path, concepts=(TEXTURE, "polka dots"), n: int = 8, scale: int = 2) -> Path:
    """The image grid of a ``run`` report: per concept, rows shipped / base + waves / pruned / ablated, ``n``
    images spread over its evaluation folder (every colour), the same prompts and seeds in each row."""
    from . import mission

    runs, rows = report["runs"], []
    first = runs[next(iter(runs))]["concepts"]

    def pick(folder):
        paths = sorted((Path(folder) / "samples").glob("*.png"))
        return [paths[i * len(paths) // n] for i in range(n)]

    for c in concepts:
        if "teach" in runs:
            rows.append((f"shipped: {c}", pick(runs["teach"]["concepts"][c]["folders"][0])))
        rows.append((f"base+waves: {c}", pick(first[c]["folders"][1 if "teach" in runs else 0])))
        for k, label in (("conceptprune", "pruned"), ("ablation", "ablated")):
            if k in runs:
                rows.append((f"{label}: {c}", pick(runs[k]["concepts"][c]["folders"][1])))
    return mission.image_grid(rows, Path(path), scale=scale)


def run(out: Path, assets: Path = ASSETS, quick: bool = False, methods=("teach", "conceptprune", "ablation"),
        skill_ratio: float | None = None, tau: int | None = None, variant: str = "units") -> dict:
    """Build base + waves (the ``variant``'s delta), then evaluate.py + judge on: the fine-tune itself
    (``teach``), ConceptPrune and Concept Ablation on waves. Writes ``{out}/ffn{suffix}.{md,json}`` and
    ``{out}/grid{suffix}.png``."""
    from . import mission

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = SIZES["quick" if quick else "full"]
    skill_ratio = mission.PRUNE_SKILL_RATIO if skill_ratio is None else skill_ratio
    tau = mission.PRUNE_TAU if tau is None else tau
    times, runs = {}, {}
    t0 = time.time()
    sfx = suffix(variant)
    ckpt = build_checkpoint(out, assets, variant)
    shipped = _paths(assets)["weights"]
    times["build_checkpoint_s"] = round(time.time() - t0, 1)
    report = {"variant": variant, "quick": quick, "sizes": sizes, "skill_ratio": skill_ratio, "tau": tau,
              "checkpoint": str(ckpt), "runs": runs, "times": times}
    if "teach" in methods:
        runs["teach"] = evaluate_run(teach_run(out, assets, variant), out, shipped, out / "baseline-shipped",
                                     sizes["numgen"], "delta_waves*", assets)
        times["teach_eval_s"] = runs["teach"]["time_s"]
    if "conceptprune" in methods:
        t = time.time()
        run_dir = prune_run(out, ckpt, TEXTURE, skill_ratio, tau, assets, out / "logs" / f"toy_prune_waves{sfx}")
        times["conceptprune_s"] = round(time.time() - t, 1)
        report["pruned_fraction"] = pruned_fraction(run_dir)
        runs["conceptprune"] = evaluate_run(run_dir, out, ckpt, out / f"baseline-waves{sfx}", sizes["numgen"],
                                            "delta_pruned*", assets)
        times["conceptprune_eval_s"] = runs["conceptprune"]["time_s"]
    if "ablation" in methods:
        t = time.time()
        from ablation.train import run as train

        run_dir = train(mission.train_settings(f"ffn_waves{sfx}", ablation_recipe(), assets, out,
                                               sizes["train_size"], base_ckpt=str(ckpt)))
        times["ablation_train_s"] = round(time.time() - t, 1)
        runs["ablation"] = evaluate_run(run_dir, out, ckpt, out / f"baseline-waves{sfx}", sizes["numgen"],
                                        "delta_step_*", assets)
        times["ablation_eval_s"] = runs["ablation"]["time_s"]
    times["total_s"] = round(time.time() - t0, 1)
    write_grid(report, out / f"grid{sfx}.png")
    table = markdown(report)
    (out / f"ffn{sfx}.md").write_text(table)
    (out / f"ffn{sfx}.json").write_text(report_json(report))
    print(table)
    return report


# ---------------------------------------------------------------------------------------- the sweep (item 3)
def sweep_prompts(texture: str, n: int, prompt_dir: Path) -> list[str]:
    """``n`` prompts spread over ``{texture}_eval.txt`` (every colour and shape)."""
    lines = [x for x in (prompt_dir / f"{texture.replace(' ', '_')}_eval.txt").read_text().splitlines() if x.strip()]
    return [lines[(i * len(lines)) // n] for i in range(n)]


def _judge_images(folder: Path, concepts: list[str], n: int, scorers) -> dict:
    from ablation.data import load_image_captions

    images, prompts = load_image_captions(folder / "images.txt", folder / "caption.txt")
    return {c: shares(*scorers, images[k * n:(k + 1) * n], prompts[k * n:(k + 1) * n], c)["shown"]
            for k, c in enumerate(concepts)}


def sweep(out: Path, assets: Path = ASSETS, textures=(TEXTURE, f"{TEXTURE}-dense", *TEXTURES),
          skill_ratios=SWEEP_SKILL_RATIOS, taus=SWEEP_TAUS, n: int = SWEEP_N) -> dict:
    """ConceptPrune over ``skill_ratios`` x ``taus`` for each texture (waves on base + waves, "waves-dense" on the
    dense delta's base + waves, the shipped textures on the shipped model): the share of the target's images still
    showing it, the other textures' and the plain paintings' shares, and the pruned fraction of ff.net.2 weights.
    ``n`` images per concept and setting, DDIM 50, eta 1, CFG 6, image i seeded 42 + i (evaluate.py's settings),
    the same seeds for every setting."""
    import functools

    from runtime.loading import load_model
    from runtime.generate import generate_images

    out = Path(out)
    prompt_dir = eval_prompt_dir(out, assets)
    scorers = _scorers(assets)
    config = _model_config(assets)
    rows, t0 = [], time.time()
    for key in textures:
        texture, _, variant = key.partition("-")
        ckpt = build_checkpoint(out, assets, variant or "units") if texture == TEXTURE else _paths(assets)["weights"]
        others = [t for t in (TEXTURE, *TEXTURES) if t != texture and (texture == TEXTURE or t != TEXTURE)]
        concepts = [texture, *others, ANCHOR_STYLE]
        prompts = [p for c in concepts for p in sweep_prompts(c, n, prompt_dir)]
        root = out / "sweep" / key.replace(" ", "_")

        def measure(delta, name):
            folder = root / name
            generate_images(functools.partial(load_model, config, str(ckpt), delta and str(delta)), prompts, folder,
                            steps=50, eta=1.0, scale=6.0, batch_size=50, height=32, width=32, seed=42,
                            precision="full", desc=name)
            return _judge_images(folder, concepts, n, scorers)

        t = time.time()
        base = measure(None, "base")
        rows.append({"texture": key, "skill_ratio": None, "tau": None, "pruned_fraction": 0.0, "shown": base,
                     "time_s": round(time.time() - t, 1)})
        for sr in skill_ratios:
            for tau in taus:
                t = time.time()
                name = f"sr{sr:g}_tau{tau}"
                run_dir = prune_run(out, ckpt, texture, sr, tau, assets, run_dir=root / "prune",
                                    delta_name=f"{name}.safetensors")
                shown = measure(run_dir / "checkpoints" / f"{name}.safetensors", name)
                rows.append({"texture": key, "skill_ratio": sr, "tau": tau,
                             "pruned_fraction": round(pruned_fraction(run_dir, f"{name}.safetensors"), 4),
                             "shown": shown, "time_s": round(time.time() - t, 1)})
                if key == TEXTURE:  # the units delta: did the pruning find the taught units?
                    rows[-1].update(taught_share(run_dir / "checkpoints" / f"{name}.safetensors", ckpt, assets))
                print(json.dumps(rows[-1]))
    report = {"n": n, "skill_ratios": list(skill_ratios), "taus": list(taus), "rows": rows,
              "time_s": round(time.time() - t0, 1)}
    (out / "sweep.json").write_text(report_json(report))
    table = sweep_markdown(report)
    (out / "sweep.md").write_text(table)
    print(table)
    return report


def taught_share(delta, ckpt, assets: Path = ASSETS) -> dict:
    """Where a pruned delta's zeros fall, against the hidden units the shipped "units" delta taught
    (``ffn_delta.json``): ``in_units``, the share of the pruned ff.net.2 weights in those units' columns (chance:
    their share of the columns, 1/8), and ``units_pruned``, the share of those columns' weights pruned."""
    import torch

    from ldm.checkpoint import load_state_dict

    units = json.loads((assets / "ffn" / DELTA_FILE).with_suffix(".json").read_text())["units"]
    base, pruned = dict(load_state_dict(ckpt)), dict(load_state_dict(delta))
    hit = total = taught = 0
    for prefix, idx in units.items():
        key = f"model.{prefix}.ff.net.2.weight"
        zeroed = (pruned[key] == 0) & (base[key] != 0)
        cols = torch.zeros_like(zeroed)
        cols[:, idx] = True
        hit, total, taught = hit + int((zeroed & cols).sum()), total + int(zeroed.sum()), taught + int(cols.sum())
    return {"in_units": round(hit / max(total, 1), 4), "units_pruned": round(hit / taught, 4)}


def sweep_markdown(report: dict) -> str:
    """One row per (texture, skill_ratio, tau): target shown, erased share (1 - shown / base shown), the other
    concepts' mean shown share, kept share (mean of shown / base shown, capped at 1 each), pruned fraction, and
    for waves on the units delta ``taught_share``."""
    lines = ["| target | skill_ratio | tau | pruned ff.net.2 weights | target shown | erased share | "
             "others shown (mean; worst) | kept share | pruned weights in the taught units | taught weights pruned |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in report["rows"]:
        key, shown = r["texture"], r["shown"]
        t = key.partition("-")[0]
        others = {c: v for c, v in shown.items() if c != t}
        if r["skill_ratio"] is None:
            base[key] = shown
            lines.append(f"| {key} | base | – | 0 | {shown[t]:.2f} | – | {sum(others.values()) / len(others):.2f}; "
                         f"{min(others, key=others.get)} {min(others.values()):.2f} | – | – | – |")
            continue
        b = base[key]
        erased = 1 - shown[t] / b[t] if b[t] else float("nan")
        kept = sum(min(1.0, v / b[c]) if b[c] else 1.0 for c, v in others.items()) / len(others)
        worst = min(others, key=others.get)
        lines.append(f"| {key} | {r['skill_ratio']:g} | {r['tau']} | {r['pruned_fraction']:.3f} | {shown[t]:.2f} | "
                     f"{erased:.2f} | {sum(others.values()) / len(others):.2f}; {worst} {others[worst]:.2f} | "
                     f"{kept:.2f} | " + (f"{r['in_units']:.2f} | {r['units_pruned']:.2f} |" if "in_units" in r
                                         else "– | – |"))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- CLI
def main(argv=None):
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/toyworld-ffn")
    p.add_argument("--assets", default=str(ASSETS))
    p.add_argument("--quick", action="store_true", help="fewer anchor and evaluation images")
    p.add_argument("--methods", nargs="+", choices=("teach", "conceptprune", "ablation"),
                   default=["teach", "conceptprune", "ablation"])
    p.add_argument("--skill_ratio", type=float, default=None, help="default: toyworld.mission.PRUNE_SKILL_RATIO")
    p.add_argument("--tau", type=int, default=None, help="default: toyworld.mission.PRUNE_TAU")
    p.add_argument("--variant", choices=list(VARIANTS), default="units",
                   help="which shipped FFN delta makes base + waves (units: ffn_delta, dense: ffn_delta_dense)")
    p.add_argument("--sweep", action="store_true", help="the skill_ratio x tau sweep instead of the run")
    p.add_argument("--sweep_textures", nargs="+", default=[TEXTURE, f"{TEXTURE}-dense", *TEXTURES],
                   help="targets of the sweep (waves-dense: on the dense delta)")
    p.add_argument("--train_delta", nargs="?", const="units", choices=list(VARIANTS), default=None,
                   help="retrain a shipped FFN delta (DELTA_SETTINGS with VARIANTS): units -> ffn_delta.*, "
                        "dense -> ffn_delta_dense.*")
    p.add_argument("--train_detector", action="store_true",
                   help="retrain assets/toyworld/ffn/waves_detector.* (DETECTOR_SETTINGS)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: leave as is)")
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    assets = Path(a.assets)
    if a.train_detector or a.train_delta:
        if a.train_detector:
            print(json.dumps(train_detector(assets / "ffn", **DETECTOR_SETTINGS)[1], indent=2))
        if a.train_delta:
            meta = train_delta(assets / "ffn", assets, name=DELTA_FILES[a.train_delta], **VARIANTS[a.train_delta])[1]
            print(json.dumps({k: v for k, v in meta.items() if k not in ("history", "units")}, indent=2))
        return None
    if a.sweep:
        return sweep(Path(a.out), assets, a.sweep_textures)
    return run(Path(a.out), assets, a.quick, a.methods, a.skill_ratio, a.tau, a.variant)


if __name__ == "__main__":
    main()
