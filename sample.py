#!/usr/bin/env python
"""Sample images from Stable Diffusion v1, optionally with an ablation (or pruning) delta on top.

    python sample.py --ckpt assets/pretrained_models/sd-v1-4.ckpt \
        --delta_ckpt logs/<run>/checkpoints/delta_step_100.ckpt --prompt "a painting in the style of van gogh"

Output: ``{outdir}/samples/NNNNN.png`` (numbering continues after existing files), a grid image
``{outdir}/{prompt}_{ckpt}_{scale}_{sampler}_{steps}_{eta}.jpg`` and, with ``--metadata``,
``images.txt``/``caption.txt`` lines appended in ``{outdir}``. A checkpoint inside a training run
(``{run}/checkpoints/``) uses that run's saved config; ``--outdir`` defaults to that run's folder.
Image ``i`` of a call is seeded ``seed + i`` (noise per image), so results do not depend on
``--n_samples`` or on the number of GPUs.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent
DEFAULT_CONFIG = REPO / "configs/stable-diffusion/v1-inference.yaml"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default="a painting of a virus monster playing guitar")
    p.add_argument("--from-file", dest="from_file", default=None, help="one prompt per line (overrides --prompt)")
    p.add_argument("--outdir", default=None, help="default: the training run's folder, else outputs/txt2img-samples")
    p.add_argument("--skip_grid", action="store_true")
    p.add_argument("--skip_save", action="store_true", help="keep only the grid")
    p.add_argument("--ddim_steps", type=int, default=100)
    p.add_argument("--plms", action="store_true", help="PLMS sampler (deterministic: eta is 0)")
    p.add_argument("--fixed_code", action="store_true", help="same start noise for every image")
    p.add_argument("--ddim_eta", type=float, default=1.0)
    p.add_argument("--n_iter", type=int, default=1, help="repeat the whole prompt list this many times")
    p.add_argument("--H", type=int, default=512)
    p.add_argument("--W", type=int, default=512)
    p.add_argument("--n_samples", type=int, default=10, help="batch size (and copies of --prompt)")
    p.add_argument("--n_rows", type=int, default=0, help="grid columns (default n_samples)")
    p.add_argument("--n_copies", type=int, default=1, help="images per prompt of --from-file")
    p.add_argument("--scale", type=float, default=6.0, help="classifier-free guidance scale")
    p.add_argument("--config", default=None, help=f"model config (default: the run's, else {DEFAULT_CONFIG.name})")
    p.add_argument("--ckpt", default=str(REPO / "assets/pretrained_models/sd-v1-4.ckpt"),
                   help="full or base checkpoint (.ckpt / .safetensors)")
    p.add_argument("--delta_ckpt", default=None, help="delta checkpoint applied on top of --ckpt")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--precision", choices=["full", "autocast"], default="autocast", help="autocast: fp16 on CUDA")
    p.add_argument("--metadata", action="store_true", help="append images.txt / caption.txt in outdir")
    p.add_argument("--gpus", default=None, help="comma-separated CUDA ids, one process each; omit for one device")
    return p


def resolve(argv=None):
    """Parse and check everything cheap. Returns (args, model_config, per-image prompts, outdir, devices)."""
    import torch
    from omegaconf import OmegaConf

    from ablation.delta import check_delta, find_run_config
    from ablation.prompts import read_prompts

    args = get_parser().parse_args(argv)
    for what, path in (("--ckpt", args.ckpt), ("--delta_ckpt", args.delta_ckpt)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{what} not found: {path}")
    for name in ("ddim_steps", "n_iter", "n_samples", "n_copies", "H", "W"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1")
    run_config = find_run_config(args.delta_ckpt) or find_run_config(args.ckpt)
    config_path = Path(args.config) if args.config else (run_config or DEFAULT_CONFIG)
    if not config_path.is_file():
        raise FileNotFoundError(f"config not found: {config_path}")
    config = OmegaConf.load(config_path)
    if "model" not in config:
        raise ValueError(f"{config_path} has no 'model:' section")
    model_config = OmegaConf.to_container(config.model, resolve=True)
    if args.delta_ckpt:
        check_delta(model_config, args.delta_ckpt)
    if args.outdir:
        outdir = Path(args.outdir)
    elif run_config is not None:
        outdir = run_config.parent.parent
    else:
        outdir = Path("outputs/txt2img-samples")

    if args.from_file:
        prompts = [p for p in read_prompts(args.from_file) for _ in range(args.n_copies)]
    else:
        if not args.prompt.strip():
            raise ValueError("--prompt is empty")
        prompts = [args.prompt] * (args.n_copies if args.n_copies > 1 else args.n_samples)
    prompts = prompts * args.n_iter

    devices = ("cuda",) if torch.cuda.is_available() else ("cpu",)
    if args.gpus is not None:
        ids = [int(g) for g in args.gpus.split(",") if g.strip()]
        if not torch.cuda.is_available() or not ids or max(ids) >= torch.cuda.device_count():
            raise RuntimeError(f"--gpus {args.gpus}: {torch.cuda.device_count()} CUDA device(s) available")
        devices = tuple(f"cuda:{i}" for i in ids)
    if args.plms and args.ddim_eta != 0:
        print("note: PLMS is deterministic; --ddim_eta is ignored")
        args.ddim_eta = 0.0
    return args, model_config, prompts, outdir, devices


def _next_index(samples: Path) -> int:
    nums = [int(p.stem) for p in samples.glob("*.png") if p.stem.isdigit()]
    return max(nums) + 1 if nums else 0


def grid_name(prompt: str, args) -> str:
    words = re.sub(r"[^a-zA-Z ]", "", prompt[:60]).strip().replace(" ", "-") or "prompts"
    ckpt = Path(args.delta_ckpt or args.ckpt).stem
    return f"{words}_{ckpt}_{args.scale}_{'plms' if args.plms else 'ddim'}_{args.ddim_steps}_{args.ddim_eta}.jpg"


def save_grid(paths: list[Path], columns: int, out: Path) -> None:
    from PIL import Image

    first = Image.open(paths[0])
    w, h = first.size
    rows = (len(paths) + columns - 1) // columns
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, p in enumerate(paths):
        grid.paste(Image.open(p).convert("RGB"), ((i % columns) * w, (i // columns) * h))
    grid.save(out, quality=70)


def run(args, model_config, prompts, outdir: Path, devices) -> list[Path]:
    from ablation.delta import load_model
    from ablation.generate import generate_images

    samples = outdir / "samples"
    # A staging folder named after the request: an interrupted call resumes where it stopped.
    request = {"prompts": prompts, "ckpt": str(Path(args.ckpt).resolve()), "seed": args.seed,
               "delta": str(Path(args.delta_ckpt).resolve()) if args.delta_ckpt else None,
               "steps": args.ddim_steps, "eta": args.ddim_eta, "scale": args.scale, "plms": args.plms,
               "fixed_code": args.fixed_code, "H": args.H, "W": args.W}
    key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:12]
    staging = outdir / f".staging-{key}"
    factory = functools.partial(load_model, model_config, args.ckpt, args.delta_ckpt)
    generate_images(factory, prompts, staging, steps=args.ddim_steps, eta=args.ddim_eta, scale=args.scale,
                    batch_size=args.n_samples, height=args.H, width=args.W, seed=args.seed, devices=devices,
                    precision=args.precision, sampler="plms" if args.plms else "ddim", fixed_code=args.fixed_code,
                    desc="sampling")
    staged = [staging / "samples" / f"{i:05}.png" for i in range(len(prompts))]
    if not args.skip_grid:
        save_grid(staged, args.n_rows or args.n_samples, outdir / grid_name(prompts[0], args))
    written = []
    if not args.skip_save:
        samples.mkdir(parents=True, exist_ok=True)
        base = _next_index(samples)
        for i, src in enumerate(staged):
            dst = samples / f"{base + i:05}.png"
            os.replace(src, dst)
            written.append(dst)
        if args.metadata:
            with open(outdir / "images.txt", "a") as f:
                f.writelines(f"samples/{p.name}\n" for p in written)
            with open(outdir / "caption.txt", "a") as f:
                f.writelines(p + "\n" for p in prompts)
    shutil.rmtree(staging)
    print(f"{len(prompts)} images -> {samples if written else outdir}")
    return written


def main(argv=None):
    return run(*resolve(argv))


if __name__ == "__main__":
    try:
        checked = resolve()
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # CheckpointError is a RuntimeError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    run(*checked)
