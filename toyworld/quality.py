"""Measure the toy world's models against their quality bars (docs/experiments/toyworld-models.md).

* CLIP: zero-shot accuracy on fresh renders (``toyworld.clip.zero_shot_accuracy``);
* diffusion model: samples for prompts with known attributes (DDIM, eta 1, CFG 6, image ``i`` seeded
  ``seed + i``, written with ``runtime.generate.generate_images``), judged by the ground-truth
  classifier (``toyworld.judge``): share of samples that show the prompted subject, colour and style;
  the memorized caption's samples are scored with the copy-detection descriptor through the SSCD code
  path (``ablation.memorization``; similarity > 0.5 = copy), as is a control set of ordinary prompts.

    python -m toyworld.quality --assets assets/toyworld --out outputs/toyworld-quality
"""
from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch

from runtime.resources import asset_path

from .captions import MEMORIZED_CAPTION
from .render import ANCHOR_STYLE, CAT_CLASSES, COLOUR_NAMES, SHAPES, SUBJECTS, TEXTURES

__all__ = ["quality_prompts", "score_samples", "colour_by_seed", "start_noise", "measure", "main"]


def _art(w: str) -> str:
    return ("an " if w[0] in "aeiou" else "a ") + w


def quality_prompts() -> list[dict]:
    """Prompts with the attributes they ask for: every subject in every colour (plain fill), every
    texture on every shape (colours rotating), and the memorized caption (``memorized: True``)."""
    items = [{"prompt": f"a photo of {_art(c + ' ' + s)}", "subject": s, "colour": c, "style": ANCHOR_STYLE}
             for s in SUBJECTS for c in COLOUR_NAMES]
    for i, t in enumerate(TEXTURES):
        for j, s in enumerate(SHAPES):
            for k in range(2):
                c = COLOUR_NAMES[(i + 2 * j + 3 * k) % len(COLOUR_NAMES)]
                items.append({"prompt": f"a painting of {_art(c + ' ' + s)} in the style of {t}", "subject": s,
                              "colour": c, "style": t})
    return items


def score_samples(wanted: list[dict], predicted: list[dict]) -> dict:
    """Shares of samples whose predicted attribute equals the prompted one: ``subject`` (the 10 classes,
    cat variants distinct), ``shape`` (cat variants merged into "cat"), ``colour``, ``style`` (textured
    prompts only), ``cat_variant`` (cat prompts only) and ``all`` (subject, colour and style at once)."""
    def share(rows):
        return sum(rows) / len(rows) if rows else float("nan")

    def family(s):
        return "cat" if s in CAT_CLASSES else s

    pairs = list(zip(wanted, predicted))
    return {
        "subject": share([p["subject"] == w["subject"] for w, p in pairs]),
        "shape": share([family(p["subject"]) == family(w["subject"]) for w, p in pairs]),
        "colour": share([p["colour"] == w["colour"] for w, p in pairs]),
        "style": share([p["style"] == w["style"] for w, p in pairs if w["style"] != ANCHOR_STYLE]),
        "plain_fill": share([p["style"] == w["style"] for w, p in pairs if w["style"] == ANCHOR_STYLE]),
        "cat_variant": share([p["subject"] == w["subject"] for w, p in pairs if w["subject"] in CAT_CLASSES]),
        "all": share([all(p[k] == w[k] for k in ("subject", "colour", "style")) for w, p in pairs]),
        "n": len(pairs),
    }


def start_noise(seeds, shape, zero_mean: bool = False) -> torch.Tensor:
    """One standard normal ``shape`` per seed, stacked; ``zero_mean`` removes each channel's spatial mean."""
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    return x - x.mean(dim=(2, 3), keepdim=True) if zero_mean else x


@torch.no_grad()
def colour_by_seed(model, judge, seeds=range(8), shapes=("circle", "star"), steps: int = 25, scale: float = 6.0,
                   zero_mean_start: bool = False) -> dict:
    """Does the prompt or the seed pick the colour? Every colour prompt (``a photo of a <colour> <shape>``) is
    sampled from the same start noises (one per seed; DDIM, eta 0, so nothing else is random) and judged.

    ``accuracy``: share of samples in the prompted colour; ``distinct_per_seed``: mean number of different
    colours one start noise gives over the six colour prompts (6 when the prompt decides, 1 when the seed
    does). ``zero_mean_start`` removes each channel's spatial mean from the start noise: a diagnostic, not a
    way to sample (the samplers never do it); a large gain over the plain start noise shows that the UNet
    reads the colour from the start noise's mean."""
    from PIL import Image

    from ldm.models.diffusion.ddim import DDIMSampler

    from .judge import classify
    from .ldm import decode_u8

    seeds = list(seeds)
    shape = (model.channels, model.image_size, model.image_size)
    x_T = start_noise(seeds, shape, zero_mean_start)
    sampler = DDIMSampler(model)
    uc = model.get_learned_conditioning([""] * len(seeds))
    right, distinct = 0, []
    for subject in shapes:
        per_colour = {}
        for colour in COLOUR_NAMES:
            c = model.get_learned_conditioning([f"a photo of {_art(colour + ' ' + subject)}"] * len(seeds))
            z, _ = sampler.sample(steps, len(seeds), shape, conditioning=c, eta=0.0, x_T=x_T.clone(),
                                  unconditional_guidance_scale=scale, unconditional_conditioning=uc,
                                  verbose=False, progress=False)
            images = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in decode_u8(model, z)]
            per_colour[colour] = [r["colour"] for r in classify(judge, images)]
            right += sum(p == colour for p in per_colour[colour])
        distinct += [len({per_colour[c][i] for c in COLOUR_NAMES}) for i in range(len(seeds))]
    n = len(seeds) * len(shapes) * len(COLOUR_NAMES)
    return {"accuracy": right / n, "distinct_per_seed": sum(distinct) / len(distinct), "n": n}


def measure(assets: Path, out: Path, n_per_prompt: int = 2, n_memorized: int = 40, steps: int = 50,
            scale: float = 6.0, seed: int = 0, batch_size: int = 32, clip_n: int = 1000) -> dict:
    from ldm.util import load_model_config
    from runtime.generate import Sampling, generate_images
    from runtime.loading import load_model
    from scoring.sscd import load_sscd, similarities

    from .judge import classify, load_judge
    from .render import render_memorized

    config = load_model_config(assets / "ldm" / "ldm.yaml")
    factory = functools.partial(load_model, config, str(assets / "ldm" / "toyworld-ldm.safetensors"), None)
    size = int(config["params"]["first_stage_config"]["params"]["ddconfig"]["resolution"])
    gen = Sampling(steps=steps, eta=1.0, scale=scale, batch_size=batch_size, height=size, width=size, seed=seed,
                   precision="full")
    report: dict = {"settings": {"steps": steps, "eta": 1.0, "scale": scale, "seed": seed,
                                 "n_per_prompt": n_per_prompt, "n_memorized": n_memorized}}

    wanted = [w for w in quality_prompts() for _ in range(n_per_prompt)]
    folder = generate_images(factory, [w["prompt"] for w in wanted], out / "attributes", gen, desc="attributes")
    paths = [folder / line for line in (folder / "images.txt").read_text().splitlines()]
    judge = load_judge(assets / "judge")
    report["diffusion"] = score_samples(wanted, classify(judge, paths))

    mem_folder = generate_images(factory, [MEMORIZED_CAPTION] * n_memorized, out / "memorized", gen,
                                 desc="memorized")
    mem_paths = [mem_folder / line for line in (mem_folder / "images.txt").read_text().splitlines()]
    ref = out / "memorized_reference.png"
    render_memorized(size).save(ref)
    sscd = load_sscd(assets / "copydetect" / "copydetect.torchscript.pt")
    mem_sims = similarities(sscd, mem_paths, ref)
    ctl_sims = similarities(sscd, paths, ref)
    report["memorization"] = {"copy_rate_memorized_caption": float((mem_sims > 0.5).float().mean()),
                              "copy_rate_other_prompts": float((ctl_sims > 0.5).float().mean()),
                              "judge_memorized_rate":
                                  sum(p["memorized"] for p in classify(judge, mem_paths)) / len(mem_paths)}

    model = factory().eval()
    report["colour_by_seed"] = {"start_noise": colour_by_seed(model, judge),
                                "zero_mean_start_noise": colour_by_seed(model, judge, zero_mean_start=True)}
    if clip_n:
        from scoring.metrics import load_clip

        from .clip import zero_shot_accuracy

        report["clip_zero_shot"] = zero_shot_accuracy(load_clip(str(assets / "clip")), n=clip_n, size=size)
    return report


def markdown(report: dict) -> str:
    d, m = report["diffusion"], report["memorization"]
    rows = ["| measure | value |", "|---|---|"]
    for k in ("subject", "shape", "colour", "style", "plain_fill", "cat_variant", "all"):
        rows.append(f"| samples showing the prompted {k.replace('_', ' ')} | {d[k]:.2f} |")
    rows.append(f"| memorized caption -> copy of the memorized picture | {m['copy_rate_memorized_caption']:.2f} |")
    rows.append(f"| other prompts -> copy of the memorized picture | {m['copy_rate_other_prompts']:.2f} |")
    for k, label in (("start_noise", ""), ("zero_mean_start_noise", ", start noise without its mean (diagnostic)")):
        if k in report.get("colour_by_seed", {}):
            c = report["colour_by_seed"][k]
            rows.append(f"| colour prompts from shared seeds{label}: right colour / colours per seed | "
                        f"{c['accuracy']:.2f} / {c['distinct_per_seed']:.1f} of 6 |")
    for k, v in report.get("clip_zero_shot", {}).items():
        rows.append(f"| CLIP zero-shot accuracy, {k} | {v:.2f} |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="Measure the toy world's CLIP and diffusion model (quality bars).")
    p.add_argument("--assets", default=str(asset_path("toyworld")),
                   help="folder with clip/, ldm/, judge/, copydetect/")
    p.add_argument("--out", default="outputs/toyworld-quality")
    p.add_argument("--n_per_prompt", type=int, default=2)
    p.add_argument("--n_memorized", type=int, default=40)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scale", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip_n", type=int, default=1000, help="fresh renders for CLIP zero-shot (0: skip)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = measure(Path(args.assets), out, args.n_per_prompt, args.n_memorized, args.steps, args.scale, args.seed,
                     clip_n=args.clip_n)
    (out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "quality.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
