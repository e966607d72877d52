"""The waves detector (``experiments.ffn``): a small binary CNN that says whether an image shows waves.

The shipped judge (``toyworld.judge``) has no "waves" class, and its files also feed KID/FID, so they stay
untouched: this detector, trained on ground-truth renders with and without waves (half of them through the
shipped autoencoder, which softens them like generated images), decides "waves"; where it does not fire, the
shipped judge's style head decides as before (``style_of``).
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

from toyworld.dataset import sample_scene

from .data import ASSETS, FFN_ASSETS, TEXTURE, chw, load_base, texture_scene

DETECTOR_FILE = "waves_detector.safetensors"
EVAL_SEED = 20_011  # fresh renders for the detector's accuracy (toyworld.judge.EVAL_SEED)
DETECTOR_SETTINGS = {"pool": 8000, "texture_frac": 0.3, "steps": 500, "batch_size": 128, "lr": 3e-3, "seed": 0}


def _detector_net(width: int = 16):
    import torch.nn as nn

    from toyworld.judge import conv_block

    w = width
    return nn.Sequential(conv_block(3, w), nn.MaxPool2d(2), conv_block(w, 2 * w), conv_block(2 * w, 2 * w),
                         nn.MaxPool2d(2), conv_block(2 * w, 4 * w))


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
    from toyworld.judge import perturb

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

    from toyworld.judge import JUDGE_MIXTURE
    from toyworld.render import render

    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    labels = torch.empty(n)
    for i in range(n):
        rng = random.Random(f"toyworld-ffn-detector:{seed}:{i}")
        waves = rng.random() < texture_frac
        scene = texture_scene(rng) if waves else sample_scene(rng, JUDGE_MIXTURE)
        images[i] = chw(render(scene, size))
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

    from toyworld.judge import round_fp16_
    from toyworld.training import adamw, lr_at

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
    round_fp16_(model)
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
    from toyworld.judge import load_configured

    return load_configured(path, DETECTOR_FILE, _make_detector)


def detector_accuracy(model, n: int = 2000, seed: int = EVAL_SEED, texture_frac: float = 0.3) -> dict:
    """Share of fresh renders the detector gets right, overall and per true style (waves recall, and for
    each shipped style the share *not* called waves)."""

    from toyworld.judge import JUDGE_MIXTURE
    from toyworld.render import render

    images, truth = [], []
    for i in range(n):
        rng = random.Random(f"toyworld-ffn-detector:{seed}:{i}")
        scene = texture_scene(rng) if rng.random() < texture_frac else sample_scene(rng, JUDGE_MIXTURE)
        images.append(render(scene, 32))
        truth.append("memorized" if scene.memorized else scene.style)
    called = detect(model, images)
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

    from toyworld.judge import JUDGE_MIXTURE
    from toyworld.render import render

    vae = load_base(assets).first_stage_model
    waves = [texture_scene(random.Random(f"toyworld-ffn-recon:{seed}:w{i}")) for i in range(n)]
    other = [sample_scene(random.Random(f"toyworld-ffn-recon:{seed}:o{i}"), JUDGE_MIXTURE) for i in range(2 * n)]
    x = torch.stack([chw(render(sc, 32)) for sc in waves + other])
    called = detect(model, [Image.fromarray(t.permute(1, 2, 0).numpy()) for t in _reconstruct(vae, x)])
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
            out.append(chw(im))
        else:
            with Image.open(im) as f:
                out.append(chw(f))
    return out


def detect(model, images, batch_size: int = 128) -> list[bool]:
    """Does the detector ``model`` (``load_detector``) see waves in each of ``images`` (PIL images or paths,
    any size: resized to the detector's)? One bool per image, in order; batches of ``batch_size``."""
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
    from toyworld.judge import classify

    seen = classify(judge, images) if seen is None else seen
    return [TEXTURE if w else s["style"] for w, s in zip(detect(detector, images), seen)]
