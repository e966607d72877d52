#!/usr/bin/env python
"""Sample images from Stable Diffusion v1, optionally with an ablation (or pruning) delta on top.

    python sample.py --ckpt assets/pretrained_models/sd-v1-4.ckpt \\
        --delta_ckpt logs/<run>/checkpoints/delta_step_100.ckpt --prompt "a painting in the style of van gogh"

Output: ``{outdir}/samples/NNNNN.png`` (numbering continues after existing files), a grid image
``{outdir}/{prompt}_{ckpt}_{scale}_{sampler}_{steps}_{eta}.jpg`` and, with ``--metadata``,
``images.txt``/``caption.txt`` lines appended in ``{outdir}``. A checkpoint inside a training run
(``{run}/checkpoints/``) uses that run's saved config; ``--outdir`` defaults to that run's folder.
Image ``i`` of a call is seeded ``seed + i`` (noise per image): a rerun with the same ``--n_samples`` is
bit-identical, and another ``--n_samples`` or number of GPUs changes pixels only by float rounding
(kernels depend on the batch shape: some pixels move by one 1/255 step).

Images are generated into ``{outdir}/.staging-{request hash}/`` (an interrupted call resumes there) and
then moved into ``samples/`` following a journal (``handover.json``) written before the first move, so a
call killed during the move finishes the same move when run again: no image is lost or duplicated.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent
DEFAULT_CONFIG = REPO / "configs/stable-diffusion/v1-inference.yaml"


def get_parser() -> argparse.ArgumentParser:
    from runtime import cli

    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--prompt", default="a painting of a virus monster playing guitar")
    p.add_argument("--from-file", dest="from_file", default=None, help="one prompt per line (overrides --prompt)")
    p.add_argument("--outdir", default=None, help="default: the training run's folder, else outputs/txt2img-samples")
    p.add_argument("--skip_grid", action="store_true")
    p.add_argument("--skip_save", action="store_true", help="keep only the grid")
    p.add_argument("--ddim_steps", type=cli.positive_int, default=100)
    p.add_argument("--plms", action="store_true", help="PLMS sampler (deterministic: eta is 0)")
    p.add_argument("--fixed_code", action="store_true", help="same start noise for every image")
    p.add_argument("--ddim_eta", type=cli.nonnegative_float, default=1.0)
    p.add_argument("--n_iter", type=cli.positive_int, default=1, help="repeat the whole prompt list this many times")
    p.add_argument("--H", type=cli.image_side, default=512)
    p.add_argument("--W", type=cli.image_side, default=512)
    p.add_argument("--n_samples", type=cli.positive_int, default=10, help="batch size (and copies of --prompt)")
    p.add_argument("--n_rows", type=cli.nonnegative_int, default=0, help="grid columns (default n_samples)")
    p.add_argument("--n_copies", type=cli.positive_int, default=1, help="images per prompt of --from-file")
    p.add_argument("--scale", type=cli.finite_float, default=6.0, help="classifier-free guidance scale")
    p.add_argument("--config", default=None, help=f"model config (default: the run's, else {DEFAULT_CONFIG.name})")
    p.add_argument("--ckpt", default=None,
                   help="full or base checkpoint (.ckpt / .safetensors, or a diffusers pipeline folder); default: the "
                        "base recorded in --delta_ckpt's training run, else assets/pretrained_models/sd-v1-4.ckpt")
    p.add_argument("--delta_ckpt", default=None, help="delta checkpoint applied on top of --ckpt")
    p.add_argument("--seed", type=cli.nonnegative_int, default=42)
    p.add_argument("--precision", choices=["full", "autocast"], default="autocast", help="autocast: fp16 on CUDA")
    p.add_argument("--metadata", action="store_true", help="append images.txt / caption.txt in outdir")
    p.add_argument("--gpus", default=None, help=cli.GPUS_HELP)
    return p


def resolve(argv=None):
    """Parse and check everything cheap. Returns (args, model_config, per-image prompts, outdir, devices)."""
    from omegaconf import OmegaConf

    from runtime.cli import check_output, parse_devices
    from runtime.loading import check_checkpoints, find_run_config
    from runtime.generate import validate_generation_args
    from runtime.files import read_prompts

    args = get_parser().parse_args(argv)
    from runtime.loading import run_base_ckpt
    from ldm.diffusers_format import checkpoint_exists

    if args.ckpt is None:  # the run's own base model, not a fixed path
        args.ckpt = run_base_ckpt(args.delta_ckpt) or str(REPO / "assets/pretrained_models/sd-v1-4.ckpt")
    if not checkpoint_exists(args.ckpt):
        raise FileNotFoundError(f"--ckpt not found: {args.ckpt} (a checkpoint file or a diffusers pipeline folder)")
    if args.delta_ckpt is not None and not Path(args.delta_ckpt).is_file():
        raise FileNotFoundError(f"--delta_ckpt not found: {args.delta_ckpt}")
    validate_generation_args(["x"], steps=args.ddim_steps, eta=args.ddim_eta, scale=args.scale,
                             batch_size=args.n_samples, height=args.H, width=args.W, seed=args.seed)
    run_config = find_run_config(args.delta_ckpt) or find_run_config(args.ckpt)
    config_path = Path(args.config) if args.config else (run_config or DEFAULT_CONFIG)
    if not config_path.is_file():
        raise FileNotFoundError(f"config not found: {config_path}")
    config = OmegaConf.load(config_path)
    if "model" not in config:
        raise ValueError(f"{config_path} has no 'model:' section")
    model_config = OmegaConf.to_container(config.model, resolve=True)
    check_checkpoints(model_config, args.ckpt, args.delta_ckpt)
    if args.outdir:
        outdir = Path(args.outdir)
    elif run_config is not None:
        outdir = run_config.parent.parent
    else:
        outdir = Path("outputs/txt2img-samples")
    check_output(outdir, "--outdir", kind="dir")

    if args.from_file:
        prompts = [p for p in read_prompts(args.from_file) for _ in range(args.n_copies)]
    else:
        if not args.prompt.strip():
            raise ValueError("--prompt is empty")
        prompts = [args.prompt] * (args.n_copies if args.n_copies > 1 else args.n_samples)
    prompts = prompts * args.n_iter

    devices = parse_devices(args.gpus)
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


HANDOVER = "handover.json"
METADATA = ("images.txt", "caption.txt")


def hand_over(staged: list[Path], outdir: Path, journal: Path, metadata: list[str] | None) -> list[Path]:
    """Move the staged images to the next free numbers of ``outdir/samples/`` and, with ``metadata`` (their
    prompts), append them to ``images.txt`` / ``caption.txt``; resumable.

    Where the images go and how long the two lists were is decided once and written to ``journal``
    before anything moves. A call killed midway finds the journal and completes the same moves (a staged
    file already moved is skipped) and rewrites the lists to their recorded length plus the new lines,
    so nothing is lost or appended twice."""
    from runtime.files import read_text_lines, write_text_atomic

    samples = outdir / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    if journal.is_file():
        plan = json.loads(journal.read_text(encoding="utf-8"))
    else:
        base = _next_index(samples)
        plan = {"targets": [f"{base + i:05}.png" for i in range(len(staged))],
                "lines_before": {n: len(read_text_lines(outdir / n)) if (outdir / n).is_file() else 0
                                 for n in METADATA}}
        write_text_atomic(journal, json.dumps(plan) + "\n")
    written = []
    for src, name in zip(staged, plan["targets"]):
        dst = samples / name
        if src.exists():
            os.replace(src, dst)
        elif not dst.is_file():
            raise RuntimeError(f"{src} and {dst} are both missing: the staging folder {journal.parent} was "
                               f"changed by hand; delete it and sample again")
        written.append(dst)
    if metadata is not None:
        new = {"images.txt": [f"samples/{p.name}" for p in written], "caption.txt": list(metadata)}
        for name in METADATA:
            path = outdir / name
            old = read_text_lines(path)[: plan["lines_before"][name]] if path.is_file() else []
            write_text_atomic(path, "".join(line + "\n" for line in old + new[name]))
    return written


def run(args, model_config, prompts, outdir: Path, devices) -> list[Path]:
    from runtime.loading import load_model
    from runtime.dist import init_from_launcher, local_devices
    from runtime.generate import generate_images

    shard = init_from_launcher()  # torchrun & co.: every rank makes its share, rank 0 hands them over
    samples = outdir / "samples"
    # A staging folder named after the request: an interrupted call resumes where it stopped.
    request = {"prompts": prompts, "ckpt": str(Path(args.ckpt).resolve()), "seed": args.seed,
               "delta": str(Path(args.delta_ckpt).resolve()) if args.delta_ckpt else None,
               "steps": args.ddim_steps, "eta": args.ddim_eta, "scale": args.scale, "plms": args.plms,
               "fixed_code": args.fixed_code, "H": args.H, "W": args.W}
    key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:12]
    staging = outdir / f".staging-{key}"
    journal = staging / HANDOVER
    if not journal.is_file():  # else a killed call was moving these images already: finish that
        factory = functools.partial(load_model, model_config, args.ckpt, args.delta_ckpt)
        generate_images(factory, prompts, staging, steps=args.ddim_steps, eta=args.ddim_eta, scale=args.scale,
                        batch_size=args.n_samples, height=args.H, width=args.W, seed=args.seed,
                        devices=local_devices(devices), precision=args.precision,
                        sampler="plms" if args.plms else "ddim", fixed_code=args.fixed_code, desc="sampling",
                        shard=shard)
    if shard is not None and shard[0] != 0:
        return []
    staged = [staging / "samples" / f"{i:05}.png" for i in range(len(prompts))]
    written = [] if args.skip_save else hand_over(staged, outdir, journal, prompts if args.metadata else None)
    if not args.skip_grid:
        save_grid(written or staged, args.n_rows or args.n_samples, outdir / grid_name(prompts[0], args))
    shutil.rmtree(staging)
    print(f"{len(prompts)} images -> {samples if written else outdir}")
    return written


def main(argv=None):
    return run(*resolve(argv))


if __name__ == "__main__":
    from runtime.cli import exit_on_usage_error

    run(*exit_on_usage_error(resolve))
