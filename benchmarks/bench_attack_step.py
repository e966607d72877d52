"""Wall time of one optimisation step of the white-box attacks (UnlearnDiffAtk, P4D-N, P4D-K) on random weights.

    python benchmarks/bench_attack_step.py                       # SD-v1 size (v1-inference.yaml), 512 px, CPU
    python benchmarks/bench_attack_step.py --size 256 --steps 4 --json out.json
    python benchmarks/bench_attack_step.py --config assets/toyworld/ldm/ldm.yaml --weights \\
        assets/toyworld/ldm/toyworld-ldm.safetensors --size 32 --steps 20     # the toy world

The model is built from ``--config`` with random weights (seed 0), or loaded from ``--weights``; P4D uses the
same model as its base (a step costs the same: the teacher is its own forward pass), so one model is resident.
Each attack runs ``--steps`` optimisation steps on one prompt with a random target image; the Checker here
judges without generating (always "no"), so the numbers are the optimisation alone, not the checks.

Reported per attack: ``step_s``, the median wall time between consecutive steps after the first (the
steady-state step), and ``per_step_s``, the attack call's whole wall time over the steps (including the target
latent, the templates and, for P4D, the teacher predictions). P4D is measured twice: ``teacher_batch=steps``
(ours: the base model's predictions for the next steps in one batched call, the same values) and
``teacher_batch=1`` (the original's way: one teacher call per step).

Measured 2026-12-07 (commit 4ad2ba7) on a shared 2-core CPU VM (load 4-8 from other jobs: noisy), seconds:

    toy world, 32 px, 1 thread, 20 steps   steady step   call / steps
      unlearndiff                             0.09          0.09
      p4d-n (teacher batched)                 0.07          0.08
      p4d-k                                   0.07          0.07
      p4d-n, one teacher call per step        0.09          0.09
    SD-v1 size, 512 px, 2 threads, 3 steps
      unlearndiff                            44.5          50.8
      p4d-n (teacher batched)                51.3          67.2
      p4d-k                                  53.5          72.3
      p4d-n, one teacher call per step       70.2          77.5

On a CPU the batched teacher does the same arithmetic; the SD-size difference above is within this machine's
noise (an earlier run under heavier load: 164.1 s against 164.1 s per step). RSS seen by ps at SD size: 5.8 GB.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONFIG = REPO / "configs/stable-diffusion/v1-inference.yaml"
PROMPT = "a photo of a church on a hill at dawn"


def build(config: Path, weights: Path | None):
    import torch

    from ldm.util import instantiate_from_config, load_model_config

    model_config = load_model_config(config)
    if weights is not None:
        from runtime.loading import load_model

        return load_model(model_config, weights).eval()
    torch.manual_seed(0)
    return instantiate_from_config(model_config).eval()


def time_attack(attack, model, size: int, steps: int) -> dict:
    import numpy as np
    import torch

    cuda = next(model.parameters()).device.type == "cuda"

    def stamp(step, best):  # on CUDA the step's kernels must finish before its time is read
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    from attacks.base import Check, Concept

    rng = np.random.default_rng(0)
    concept = Concept("bench", targets=rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8))
    blank = np.zeros((size, size, 3), np.uint8)
    stamps = []
    start = time.perf_counter()
    attack.attack(model, PROMPT, concept=concept, check=lambda cond, step: Check(False, blank), index=0,
                  base=model, generator=torch.Generator().manual_seed(0),
                  progress=stamp)
    total = time.perf_counter() - start
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    row = {"attack": attack.name, "steps": len(stamps), "per_step_s": total / len(stamps),
           "step_s": statistics.median(gaps) if gaps else None}
    if cuda:
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    return row


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--weights", type=Path, default=None, help="load these weights instead of random ones")
    p.add_argument("--size", type=int, default=512, help="image size in pixels")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda (fp32 weights; peak memory reported on CUDA)")
    p.add_argument("--attacks", nargs="+", default=["unlearndiff", "p4d-n", "p4d-k", "p4d-n-original"])
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    from attacks.p4d import P4DK, P4DN, P4DSettings
    from attacks.unlearndiff import UnlearnDiffAtk, UnlearnDiffSettings

    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.steps
    no_check = n + 1  # P4D checks at step 0 only (cheap here: the Checker does not generate)
    attacks = {
        "unlearndiff": lambda: UnlearnDiffAtk(UnlearnDiffSettings(iterations=n, n_timesteps=1)),
        "p4d-n": lambda: P4DN(P4DSettings(variant="n", iterations=n, eval_step=no_check, teacher_batch=n)),
        "p4d-k": lambda: P4DK(P4DSettings(variant="k", iterations=n, eval_step=no_check, teacher_batch=n)),
        "p4d-n-original": lambda: P4DN(P4DSettings(variant="n", iterations=n, eval_step=no_check, teacher_batch=1)),
    }
    t0 = time.perf_counter()
    model = build(args.config, args.weights).to(args.device)
    print(f"model built in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for name in args.attacks:
        row = time_attack(attacks[name](), model, args.size, n)
        row["name"] = name
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"config": str(args.config), "size": args.size, "threads": torch.get_num_threads(), "device": args.device,
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    print("| attack | steps | steady step (s) | whole call / steps (s) |\n|---|---|---|---|")
    for r in rows:
        step = f"{r['step_s']:.2f}" if r["step_s"] is not None else "-"
        print(f"| {r['name']} | {r['steps']} | {step} | {r['per_step_s']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
