"""Time and peak memory of ConceptPrune's ``discover`` step (``prune.jobs``, conceptprune.py) for one concept.

``discover`` samples every base and every target prompt (PLMS, CFG, seed 0) while the ff.net.2 inputs are
recorded, then scores and masks. This script runs that work for one concept and, in the same process, the
same sampling without the recording hooks, so the cost of recording is measured beside the sampling it
rides on:

  sample     PLMS sampling of the base + target prompts, no hooks (what any sampler would cost)
  discover   the same with the ActivationRecorder on every ff.net.2 (what conceptprune.py discover does),
             plus computing the per-(call, layer) masks
Reported: seconds, seconds per UNet call (one call = one CFG batch), recording overhead in %, mask time,
and peak memory (CUDA: torch.cuda.max_memory_allocated; CPU: the process's resident high-water mark,
VmHWM, which includes the weights).

Models
  toy  the shipped toy-world LDM (assets/toyworld/ldm, 32 px), its "stripes" prompt pairs (20)
  sd   the SD-v1 inference config with random weights (timing does not depend on them) and the
       CLIP-L-sized text tower, 512 px, the "Van Gogh" prompt pairs (20); fp16 autocast on CUDA

  python benchmarks/bench_discover.py                                   # toy on CPU
  python benchmarks/bench_discover.py --model sd --device cuda          # the issue's goal: minutes for 20 pairs
  python benchmarks/bench_discover.py --model sd --pairs 1 --steps 3    # a CPU smoke run of the SD size
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_unet import status_kb  # noqa: E402  (the /proc/self/status reader of the UNet benchmark)


def _hwm_mib() -> float | None:
    kb = status_kb("VmHWM")
    return None if kb is None else round(kb / 1024, 1)


def build(model: str, device: str):
    """(LatentDiffusion in eval mode on ``device``, base prompts, target prompts, image side)."""
    import torch

    from ldm.util import load_model_config
    from prune.prompts import build_pairs

    if model == "toy":
        from runtime.loading import load_model

        assets = REPO / "assets/toyworld"
        config = load_model_config(assets / "ldm/ldm.yaml")
        ldm = load_model(config, str(assets / "ldm/toyworld-ldm.safetensors"), None, device)
        pairs = build_pairs("stripes", assets / "prune_prompts/stripes_base.txt",
                            assets / "prune_prompts/stripes_target.txt")
        return ldm.eval(), pairs.base, pairs.target, 32
    from ldm.util import instantiate_from_config

    config = load_model_config(REPO / "configs/stable-diffusion/v1-inference.yaml")
    torch.manual_seed(0)
    ldm = instantiate_from_config(config).to(device)
    pairs = build_pairs("Van Gogh")
    return ldm.eval(), pairs.base, pairs.target, 512


def main(argv=None) -> dict:
    import torch

    from prune.hooks import ActivationRecorder, ff2_layers
    from prune.jobs import SamplingSettings, sample_prompts
    from prune.wanda import compute_masks

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("toy", "sd"), default="toy")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pairs", type=int, default=None, help="first N prompt pairs (default: all, 20)")
    ap.add_argument("--steps", type=int, default=50, help="PLMS steps (steps + 1 UNet calls per generation)")
    ap.add_argument("--batch_size", type=int, default=None, help="prompts per batch (default: toy 20, sd 4)")
    ap.add_argument("--skill_ratio", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")

    t0 = time.perf_counter()
    ldm, base, target, side = build(args.model, args.device)
    build_s = time.perf_counter() - t0
    if args.pairs:
        base, target = base[: args.pairs], target[: args.pairs]
    batch = args.batch_size or (20 if args.model == "toy" else 4)
    precision = "autocast" if args.device.startswith("cuda") else "full"
    sargs = SamplingSettings(H=side, W=side, seed=0, steps=args.steps, scale=7.5, batch_size=batch,
                             precision=precision, device=args.device)
    cuda = args.device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    layers = ff2_layers(ldm)
    sample_prompts(ldm, base[:1], dataclasses.replace(sargs, steps=1))  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    for prompts in (base, target):
        sample_prompts(ldm, prompts, sargs)
    sync()
    plain_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    norms = []
    for prompts in (base, target):
        rec = ActivationRecorder(layers)
        with rec:
            sample_prompts(ldm, prompts, sargs, hooks=rec)
        norms.append(rec.norms())
    sync()
    record_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    weights = [x.module.weight.detach() for x in layers]
    masks = compute_masks(weights, norms[0], norms[1], args.skill_ratio)
    sync()
    mask_s = time.perf_counter() - t0

    calls = 2 * -(-len(base) // batch) * (args.steps + 1)  # UNet calls (each a CFG batch of 2 x batch)
    result = {
        "model": args.model, "device": args.device, "precision": precision, "pairs": len(base), "batch_size": batch,
        "steps": args.steps, "unet_calls": calls, "layers": len(layers), "masks": len(masks),
        "build_s": round(build_s, 2), "sample_s": round(plain_s, 2), "discover_s": round(record_s + mask_s, 2),
        "record_overhead_pct": round(100 * (record_s / plain_s - 1), 1), "mask_s": round(mask_s, 3),
        "ms_per_call_sample": round(1000 * plain_s / calls, 2),
        "ms_per_call_discover": round(1000 * record_s / calls, 2),
        "peak_mib": round(torch.cuda.max_memory_allocated() / 2 ** 20, 1) if cuda else _hwm_mib(),
        "peak_kind": "cuda max_memory_allocated" if cuda else "process VmHWM (weights included)",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
