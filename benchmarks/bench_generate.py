"""Anchor-generation throughput (images/s): ours against diffusers' StableDiffusionPipeline, side by side.

Both sides generate the same batch from the SAME weights (diffusers' pipeline is built from our model by
``runtime.export.build_pipeline``), the same scheduler and step count, CFG 6, the same per-image seeds
(``torch.Generator().manual_seed(seed + i)`` for image i: identical start noise, and for DDIM eta 1 the
same per-step noise streams), from prompts to uint8 pixels (text encoding, sampling, VAE decode, pixel
conversion; no PNG writing). Ours is the code ``generate_images`` runs (``runtime.generate.Runner.sample_batch``:
both CFG halves in one UNet call, the decode batched, DDIM's per-step noise drawn ahead and moved in one copy).

Samplers (``--sampler``, comma-separated ``{sampler}-{steps}``; a bare name takes ``--steps``)
  ddim       ours: DDIMSampler (eta ``--eta``, 1 as the paper); diffusers: DDIMScheduler (leading + offset 1,
             the CompVis grid)
  dpmpp_2m   ours: ldm/models/diffusion/dpmpp.py; diffusers: DPMSolverMultistepScheduler (dpmsolver++,
             order 2, linspace spacing, final sigma 0)
  lms        ours: ldm/models/diffusion/lms.py; diffusers: LMSDiscreteScheduler (order 4, linspace spacing:
             UnlearnDiffAtk's checker)
Models (``--model``)
  toy        the shipped toy-world model (assets/toyworld/ldm, its config beside it), 32x32 images
  sd         the SD-v1 layout (configs/stable-diffusion/v1-inference.yaml) with random weights (seeded;
             ``--ckpt`` for real ones), ``--size`` 256 by default on CPU, 512 on CUDA
Precision (``--dtype``)
  fp32       both in float32 (CPU default)
  fp16       CUDA only: ours as generate_images runs it (fp32 weights, fp16 autocast), diffusers with fp16
             weights (its usual ``torch_dtype=torch.float16``)

Time: median over ``--repeats`` timed batches after one warm-up batch each, ours and diffusers alternating
(the order swaps every repeat); CUDA timings synchronised. max|Δpix|: largest uint8 difference between the two
sides' images (same seeds).

    python benchmarks/bench_generate.py --model toy --batch 36 --sampler ddim-20,dpmpp_2m-20
    python benchmarks/bench_generate.py --model toy --batch 1 --scale 7.5 --sampler lms-50,dpmpp_2m-50
    python benchmarks/bench_generate.py --model sd --size 256 --batch 1 --sampler ddim-4,dpmpp_2m-4 --repeats 1
    python benchmarks/bench_generate.py --model sd --device cuda --dtype fp16 --size 512 --batch 8 \\
        --sampler ddim-50,dpmpp_2m-20 --json gen.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS = {"toy": ROOT / "assets/toyworld/ldm/ldm.yaml", "sd": ROOT / "configs/stable-diffusion/v1-inference.yaml"}
TOY_WEIGHTS = ROOT / "assets/toyworld/ldm/toyworld-ldm.safetensors"
PROMPTS = {"toy": ["a painting of a red star in a grassy field", "a photo of a grumpy cat on the grass"],
           "sd": ["a painting of a cat in the style of van gogh", "a photo of a dog on a beach"]}


def parse_settings(text: str, steps: int) -> list[tuple[str, int]]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, n = item.partition("-")
        if name not in ("ddim", "dpmpp_2m", "lms") or (n and not n.isdigit()):
            raise ValueError(f"--sampler {item!r}: expected ddim, dpmpp_2m or lms, optionally -STEPS (ddim-50)")
        out.append((name, int(n) if n else steps))
    if not out:
        raise ValueError("--sampler is empty")
    return out


def build_model(args):
    import torch

    from ldm.checkpoint import load_model_from_config, skip_init
    from ldm.util import instantiate_from_config, load_model_config

    cfg = load_model_config(CONFIGS[args.model])
    ckpt = args.ckpt or (TOY_WEIGHTS if args.model == "toy" else None)
    if ckpt:
        model = load_model_from_config(cfg, str(ckpt), verbose=False)
    else:
        with skip_init():
            model = instantiate_from_config(cfg)
        g = torch.Generator().manual_seed(0)
        # random weights: timing does not depend on values, the side-by-side check does not either
        with torch.no_grad():
            for t in model.parameters():
                t.copy_(torch.randn(t.shape, generator=g) * 0.02)
    return model.eval(), cfg


def build_diffusers(model, cfg, sampler: str, device, dtype):
    import diffusers

    from runtime.export import build_pipeline

    pipe = build_pipeline(model, cfg, scheduler="ddim")
    if sampler == "dpmpp_2m":
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="linspace",
            final_sigmas_type="zero", use_karras_sigmas=False)
    elif sampler == "lms":  # UnlearnDiffAtk's LMSDiscreteScheduler(scaled_linear, 0.00085, 0.012): linspace
        pipe.scheduler = diffusers.LMSDiscreteScheduler.from_config(pipe.scheduler.config,
                                                                    timestep_spacing="linspace")
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    return pipe if dtype is None else pipe.to(dtype=dtype)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(CONFIGS), default="toy")
    ap.add_argument("--ckpt", default=None, help="weights (default: the toy model's; random for sd)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=["fp32", "fp16"], help="default fp32 on cpu, fp16 on cuda")
    ap.add_argument("--size", type=int, default=None, help="image side (default: 32 toy; sd 256 cpu, 512 cuda)")
    ap.add_argument("--batch", type=int, default=None, help="images per batch (default: 36 toy, 1 sd cpu, 8 cuda)")
    ap.add_argument("--sampler", default="ddim,dpmpp_2m", help="comma-separated {sampler}[-{steps}]")
    ap.add_argument("--steps", type=int, default=20, help="steps of a --sampler given without -STEPS")
    ap.add_argument("--eta", type=float, default=1.0, help="DDIM eta (both sides)")
    ap.add_argument("--scale", type=float, default=6.0)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all usable cores)")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    args = ap.parse_args(argv)
    try:
        settings = parse_settings(args.sampler, args.steps)
    except ValueError as e:
        ap.error(str(e))
    args.dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    if args.dtype == "fp16" and args.device != "cuda":
        ap.error("--dtype fp16 needs --device cuda (fp16 on CPU is neither supported by autocast nor fast)")
    if args.size is None:
        args.size = 32 if args.model == "toy" else (512 if args.device == "cuda" else 256)
    if args.batch is None:
        args.batch = 36 if args.model == "toy" else (8 if args.device == "cuda" else 1)
    for name in ("size", "batch", "repeats", "steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if args.size % 8:
        ap.error("--size must be a multiple of 8")

    import numpy as np
    import torch

    try:
        import diffusers
    except ImportError as e:
        sys.exit(f"diffusers is needed for the comparison (pip install -r requirements-dev.txt): {e}")
    from runtime.generate import Runner, Sampling, validate_generation_args

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    base = PROMPTS[args.model]
    prompts = [base[i % len(base)] for i in range(args.batch)]
    indices = list(range(args.batch))
    def sampling(name: str, steps: int) -> Sampling:
        return Sampling(sampler=name, steps=steps, eta=args.eta if name == "ddim" else 0.0, scale=args.scale,
                        height=args.size, width=args.size, batch_size=args.batch, seed=args.seed,
                        precision="autocast" if args.dtype == "fp16" else "full")

    for name, steps in settings:
        validate_generation_args(prompts, sampling(name, steps))

    t0 = time.perf_counter()
    model, cfg = build_model(args)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, python {platform.python_version()}; "
          f"{args.model} model ({time.perf_counter() - t0:.1f} s to build), device {args.device}, {args.dtype}, "
          f"threads {threads}, batch {args.batch}, {args.size}x{args.size}, CFG {args.scale}", flush=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, steps in settings:
            eta = args.eta if name == "ddim" else 0.0
            ours = Runner(lambda d: model, args.device, prompts, Path(tmp), sampling(name, steps))
            pipe = build_diffusers(model, cfg, name, device, torch.float16 if args.dtype == "fp16" else None)

            @torch.no_grad()
            def theirs(pipe=pipe, steps=steps, eta=eta):
                gens = [torch.Generator().manual_seed(args.seed + i) for i in indices]
                out = pipe(prompt=prompts, height=args.size, width=args.size, num_inference_steps=steps,
                           guidance_scale=args.scale, eta=eta, generator=gens, output_type="np")
                return (255.0 * out.images).astype(np.uint8)

            run = {"ours": lambda ours=ours: ours.sample_batch(indices), "diffusers": theirs}
            times, images = {"ours": [], "diffusers": []}, {}
            for impl in run:  # warm-up (and the images compared)
                images[impl] = run[impl]()
            for r in range(args.repeats):
                for impl in ("ours", "diffusers") if r % 2 == 0 else ("diffusers", "ours"):
                    sync()
                    t = time.perf_counter()
                    run[impl]()
                    sync()
                    times[impl].append(time.perf_counter() - t)
            diff = int(np.abs(images["ours"].astype(np.int16) - images["diffusers"].astype(np.int16)).max())
            row = {"sampler": name, "steps": steps, "eta": eta, "max_abs_pixel_diff": diff}
            for impl in run:
                med = statistics.median(times[impl])
                row[impl] = {"times_s": times[impl], "median_s": med, "images_per_s": args.batch / med}
            rows.append(row)
            print(f"  {name}-{steps}: ours {row['ours']['images_per_s']:.3f} img/s, diffusers "
                  f"{row['diffusers']['images_per_s']:.3f} img/s, max|Δpix| {diff}", flush=True)
            del pipe, ours, theirs, run  # the defaults of run's functions hold the pipelines too
            if device.type == "cuda":
                torch.cuda.empty_cache()

    head = ["sampler", "steps", "UNet calls", "ours img/s", "diffusers img/s", "ours/diffusers", "max|Δpix|"]
    lines = [head] + [[r["sampler"], str(r["steps"]), str(r["steps"]), f"{r['ours']['images_per_s']:.3f}",
                       f"{r['diffusers']['images_per_s']:.3f}",
                       f"{r['ours']['images_per_s'] / r['diffusers']['images_per_s']:.2f}",
                       str(r["max_abs_pixel_diff"])] for r in rows]
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    table = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in lines]
    table.insert(1, "  ".join("-" * w for w in widths))
    print("\n" + "\n".join(table))
    print(f"\nimg/s: batch {args.batch} / median time of a batch (prompts -> uint8 pixels), {args.repeats} repeats; "
          f"ours/diffusers > 1 favours ours; UNet calls per batch (each holds both CFG halves).")
    if args.json:
        meta = dict(torch=torch.__version__, diffusers=diffusers.__version__, model=args.model, device=args.device,
                    dtype=args.dtype, batch=args.batch, size=args.size, scale=args.scale, threads=threads,
                    repeats=args.repeats, platform=platform.platform(),
                    gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
        Path(args.json).write_text(json.dumps(dict(meta=meta, results=rows), indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
