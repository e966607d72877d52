"""Time one concept-ablation training step and one anchor-generation batch, with peak memory.

    python benchmarks/bench_train.py                      # tiny model on CPU
    python benchmarks/bench_train.py --model sd --device cuda --gen-batch 10 --train-batch 4

``--model sd`` builds the SD-v1 layout (configs/stable-diffusion/v1-inference.yaml) with random
weights (no download); ``--ckpt`` loads real weights instead. The training step is the real one
(``ConceptAblation.training_step`` + AdamW, model-based loss, ``--group`` parameters) at 512x512
(64x64 latents) for SD, 16x16 for tiny. Generation is one DDIM batch with CFG at the recipe's
settings (``--gen-steps``, default 200 for SD). On CUDA the training step runs in fp32 like the
reference (``--train-precision bf16`` for autocast) and generation under fp16 autocast; peak
memory is ``torch.cuda.max_memory_allocated``. On CPU peak memory is the process's max RSS.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ablation.module import ConceptAblation  # noqa: E402
from ldm.checkpoint import load_model_from_config, skip_init  # noqa: E402
from ldm.models.diffusion.ddim import DDIMSampler  # noqa: E402
from ldm.util import instantiate_from_config, load_model_config  # noqa: E402

CONFIGS = {"tiny": REPO / "configs/tiny/v1-tiny.yaml", "sd": REPO / "configs/stable-diffusion/v1-inference.yaml"}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, device, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(CONFIGS), default="tiny")
    p.add_argument("--ckpt", default=None, help="real weights for --model sd (optional)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--group", default="cross-attn", choices=["cross-attn", "full-weight", "attn"])
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--gen-batch", type=int, default=10)
    p.add_argument("--gen-steps", type=int, default=None, help="default: 200 for sd, 10 for tiny")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-checkpointing", action="store_true", help="disable UNet gradient checkpointing")
    p.add_argument("--size", type=int, default=None, help="image side (default 512 for sd, 16 for tiny)")
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args()
    device = torch.device(args.device)
    cfg = load_model_config(CONFIGS[args.model])
    if args.no_checkpointing:
        cfg["params"]["unet_config"]["params"]["use_checkpoint"] = False
    if args.ckpt:
        model = load_model_from_config(cfg, args.ckpt, verbose=False)
    else:
        with skip_init():  # random (uninitialised) weights: timing does not depend on values
            model = instantiate_from_config(cfg)
        with torch.no_grad():
            for t in model.parameters():
                t.normal_(0, 0.02)
    model = model.to(device)
    size = args.size or (512 if args.model == "sd" else 16)
    lf = 2 ** (len(cfg["params"]["first_stage_config"]["params"]["ddconfig"]["ch_mult"]) - 1)
    steps = args.gen_steps or (200 if args.model == "sd" else 10)
    print(f"{args.model} on {device}: training step (batch {args.train_batch}, {size}x{size}, {args.group}, "
          f"{args.train_precision}), generation (batch {args.gen_batch}, {steps} DDIM steps, CFG 6)")

    # ---- generation batch
    gen_amp = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else nullcontext()
    model.eval()
    prompts = ["a photo of a cat sitting on a sofa"] * args.gen_batch

    @torch.no_grad()
    def generate():
        with gen_amp:
            c = model.get_learned_conditioning(prompts)
            uc = model.get_learned_conditioning([""] * len(prompts))
            z, _ = DDIMSampler(model).sample(S=steps, batch_size=len(prompts), shape=[4, size // lf, size // lf],
                                             conditioning=c, unconditional_conditioning=uc,
                                             unconditional_guidance_scale=6.0, eta=1.0, verbose=False, progress=False)
            return model.decode_first_stage(z)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gen_times = timed(generate, device, max(1, args.repeats // 2), warmup=0 if args.model == "sd" else 1)
    gen_peak = peak_mib(device)

    # ---- training step
    module = ConceptAblation(model, args.group, "model-based", learning_rate=1e-5).to(device).train()
    opt = module.configure_optimizers()
    batch = {"image": torch.rand(args.train_batch, 3, size, size, device=device) * 2 - 1,
             "mask": torch.ones(args.train_batch, 1, size // lf, size // lf, device=device),
             "caption": ["a photo of a grumpy cat"] * args.train_batch,
             "caption_anchor": ["a photo of a cat"] * args.train_batch}
    train_amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.train_precision == "bf16"
                 else nullcontext())

    def step():
        with train_amp:
            loss = module.training_step(batch, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        train_times = timed(step, device, args.repeats)
    train_peak = peak_mib(device)

    print(f"  trainable parameters: {module.n_trainable():,}")
    print(f"  training step : median {statistics.median(train_times):.3f} s  (min {min(train_times):.3f}), "
          f"peak {train_peak:,.0f} MiB")
    print(f"  generation    : median {statistics.median(gen_times):.3f} s per batch of {args.gen_batch} "
          f"({statistics.median(gen_times) / args.gen_batch:.3f} s/image), peak {gen_peak:,.0f} MiB")
    note = "process max RSS" if device.type == "cpu" else "max_memory_allocated"
    print(f"  (peak memory: {note})")
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({
            "model": args.model, "device": str(device), "size": size, "group": args.group,
            "trainable": module.n_trainable(), "peak_memory": note,
            "train": {"batch": args.train_batch, "precision": args.train_precision, "steps": len(train_times),
                      "median_s": statistics.median(train_times), "min_s": min(train_times), "peak_mib": train_peak},
            "generation": {"batch": args.gen_batch, "ddim_steps": steps, "median_s": statistics.median(gen_times),
                           "images_per_s": args.gen_batch / statistics.median(gen_times), "peak_mib": gen_peak},
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
