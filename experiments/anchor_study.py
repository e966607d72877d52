"""Does a cheaper anchor sampler give the same ablation? The toy-world measurement of issue 23.

For every anchor setting (``ddim-200``: the paper's DDIM 200 steps, eta 1; ``dpmpp_2m-20``: DPM-Solver++(2M)
20 steps; any ``{sampler}-{steps}``), seed and recipe of ``toyworld.mission`` (the held-fixed recipes, full
sizes: 180 anchor images, 200 evaluation images per target and anchor, 50 per hard negative), it runs the
mission's ``train.py`` + ``evaluate.py`` with the anchors made by that setting and records the ablated model's
numbers (CLIP and judge, target and every neighbour), the anchor generation's UNet calls and the wall times.
Seed ``s`` sets both ``generation.seed`` (42 + s) and the training ``--seed`` (23 + s): seed 0 is the mission's
own run. The evaluation images are DDIM 50 from seed 42 for every run, and the base model's are made once and
shared (``{out}/baseline``)::

    OMP_NUM_THREADS=1 python -m experiments.anchor_study --out outputs/anchor-study        # all runs, then the table
    python -m experiments.anchor_study --out outputs/anchor-study --report                 # the table from study.json

Runs are recorded one by one in ``{out}/study.json`` (a rerun skips those done); the table, mean and standard
error over seeds per setting, goes to ``{out}/study.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

from runtime.files import read_json
from toyworld import mission

RESTORE = "restore it (it holds the results of earlier runs), or use another --out"  # a damaged study record
SETTINGS = ["ddim-200", "dpmpp_2m-20", "dpmpp_2m-10"]
RECIPES = ["style", "instance"]
SEEDS = [0, 1, 2]
GEN_SEED, TRAIN_SEED = 42, 23  # the configs' generation.seed and train.py's --seed default


def parse_setting(setting: str) -> tuple[str, int]:
    """``"dpmpp_2m-20"`` -> ``("dpmpp_2m", 20)``."""
    sampler, _, steps = setting.rpartition("-")
    if sampler not in ("ddim", "plms", "dpmpp_2m") or not steps.isdigit() or int(steps) < 1:
        raise ValueError(f"anchor setting {setting!r}: expected {{ddim,plms,dpmpp_2m}}-{{steps}}, e.g. dpmpp_2m-20")
    return sampler, int(steps)


class Meter:
    """UNet calls (``LatentDiffusion.apply_model``; one call holds both CFG halves) and wall time of the anchor
    generation (``generate_images`` into ``{out}/data``), of the rest of ``train.py`` and of ``evaluate.py``."""

    def __init__(self):
        import ablation.train as train
        import runtime.generate as generate
        from ldm.models.diffusion.ddpm import LatentDiffusion

        self.calls = self.rows = 0
        self.data_root: Path | None = None
        self.log: dict = {}
        apply, gen, train_run = LatentDiffusion.apply_model, generate.generate_images, train.run

        def counted(model, x, *a, **k):
            self.calls += 1
            self.rows += x.shape[0]
            return apply(model, x, *a, **k)

        def timed_generate(factory, prompts, outdir, *a, **kw):
            anchors = self.data_root is not None and Path(outdir).resolve().is_relative_to(self.data_root)
            c, r, t = self.calls, self.rows, time.perf_counter()
            try:
                return gen(factory, prompts, outdir, *a, **kw)
            finally:
                if anchors:
                    self.log.update(anchor_unet_calls=self.calls - c, anchor_unet_rows=self.rows - r,
                                    anchor_s=time.perf_counter() - t, anchor_images=len(prompts))

        def timed_train(settings):
            t = time.perf_counter()
            try:
                return train_run(settings)
            finally:
                self.log["train_total_s"] = time.perf_counter() - t  # anchors included

        LatentDiffusion.apply_model, generate.generate_images, train.run = counted, timed_generate, timed_train


def run_study(out: Path, settings=SETTINGS, seeds=SEEDS, recipes=RECIPES, quick: bool = False) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out.mkdir(parents=True, exist_ok=True)
    record = out / "study.json"
    study = read_json(record, "the study record", RESTORE) if record.is_file() else {"runs": []}
    done = {(r["setting"], r["seed"], r["recipe"]) for r in study["runs"]}
    meter = Meter()
    (out / "baseline").mkdir(exist_ok=True)
    for seed in seeds:  # seed by seed, so that a cut-short study holds whole seeds of every setting
        for setting in settings:
            sampler, steps = parse_setting(setting)
            run_out = out / f"{setting}-s{seed}"
            run_out.mkdir(exist_ok=True)
            if not (run_out / "baseline").exists():  # the base model's evaluation images: made once, shared
                (run_out / "baseline").symlink_to(out.resolve() / "baseline", target_is_directory=True)
            meter.data_root = (run_out / "data").resolve()
            overrides = [f"generation.sampler={sampler}", f"generation.steps={steps}",
                         f"generation.seed={GEN_SEED + seed}"]
            for name in recipes:
                if (setting, seed, name) in done:
                    continue
                meter.log = {}
                t0 = time.perf_counter()
                report = mission.run([name], run_out, quick=quick, train_extra=overrides,
                                     train_changes={"seed": TRAIN_SEED + seed})
                total = time.perf_counter() - t0
                log = dict(meter.log, total_s=total)
                log["eval_s"] = total - log.get("train_total_s", 0.0)
                study["runs"].append({"setting": setting, "sampler": sampler, "steps": steps, "seed": seed,
                                      "recipe": name, "summary": report["summaries"][0], "cost": log})
                record.write_text(json.dumps(study, indent=1) + "\n")
                print(f"[study] {setting} seed {seed} {name}: {json.dumps(log)}", flush=True)
    (out / "study.md").write_text(table(study))
    return study


# ----------------------------------------------------------------------------------------- the table
def _mean_se(values: list[float]) -> tuple[float, float]:
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan"))


def _measures(summary: dict) -> dict[str, float]:
    """The ablated model's numbers of one run: (concept, measure) -> value."""
    t, a = summary["target"], summary["anchor"]
    m = {f"{t} (target) | CLIP acc": summary["target_accuracy"][1]}
    m.update({f"{h} (hard neg.) | CLIP acc": v[1] for h, v in summary["hard_negative_accuracy"].items()})
    m[f"{a} (anchor) | CLIP score"] = summary["anchor_clip_score"][1]
    for c, (_, v) in summary.get("judge", {}).items():
        role = "target" if c == t else "anchor" if c == a else "hard neg."
        m[f"{c} ({role}) | judge"] = v
    return m


def table(study: dict) -> str:
    runs = study["runs"]
    settings = list(dict.fromkeys(r["setting"] for r in runs))
    recipes = list(dict.fromkeys(r["recipe"] for r in runs))
    ref = settings[0]

    def cell(vals):
        if not vals:
            return "—"
        m, se = _mean_se(vals)
        return f"{m:.3f} ± {se:.3f}" if len(vals) > 1 else f"{m:.3f}"

    head = "| recipe | concept | measure | " + " | ".join(
        f"{s} (n={len({r['seed'] for r in runs if r['setting'] == s})})" for s in settings) + " |"
    lines = [head, "|---|---|---|" + "---|" * len(settings)]
    for rec in recipes:
        by = {s: [_measures(r["summary"]) for r in runs if r["recipe"] == rec and r["setting"] == s]
              for s in settings}
        keys = list(dict.fromkeys(k for ms in by.values() for m in ms for k in m))
        for k in keys:
            concept, measure = k.split(" | ")
            cells = []
            for s in settings:
                vals = [m[k] for m in by[s] if k in m]
                txt = cell(vals)
                if s != ref and vals and len(by[ref]) > 1 and len(vals) > 1:
                    (m0, se0), (m1, se1) = _mean_se([m[k] for m in by[ref]]), _mean_se(vals)
                    txt += f" (Δ {m1 - m0:+.3f} ± {math.hypot(se0, se1):.3f})"
                cells.append(txt)
            lines.append(f"| {rec} | {concept} | {measure} | " + " | ".join(cells) + " |")
    lines += ["", "| setting | anchor UNet calls per recipe (rows of each: 2 x batch) | anchor generation s | "
              "training s (no anchors) | evaluation s | total s per recipe |", "|---|---|---|---|---|---|"]
    for s in settings:
        costs = [r["cost"] for r in runs if r["setting"] == s]
        avg = lambda k: statistics.fmean(c.get(k, float("nan")) for c in costs)  # noqa: E731
        calls = sorted({c.get("anchor_unet_calls") for c in costs})
        rows = sorted({c.get("anchor_unet_rows") for c in costs})
        lines.append(f"| {s} | {'/'.join(map(str, calls))} ({'/'.join(map(str, rows))} image evaluations) | "
                     f"{avg('anchor_s'):.1f} | {avg('train_total_s') - avg('anchor_s'):.1f} | {avg('eval_s'):.1f} | "
                     f"{avg('total_s'):.1f} |")
    lines += ["", "Means over seeds ± one standard error (ablated model; Δ: minus the first setting, with the "
              "two standard errors combined). Times: mean per recipe run, this machine."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/anchor-study")
    p.add_argument("--settings", nargs="+", default=SETTINGS, help="{sampler}-{steps}; the first is the reference")
    p.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    p.add_argument("--recipes", nargs="+", choices=[r for r in mission.RECIPES if r != "memorized"],
                   default=RECIPES)
    p.add_argument("--quick", action="store_true",
                   help="the mission's --quick sizes (a smoke test, not a measurement)")
    p.add_argument("--report", action="store_true", help="only rewrite the table from {out}/study.json")
    args = p.parse_args(argv)
    for s in args.settings:
        try:
            parse_setting(s)
        except ValueError as e:
            p.error(str(e))
    if any(s < 0 for s in args.seeds):
        p.error("seeds must be >= 0")
    out = Path(args.out)
    if args.report:
        study = read_json(out / "study.json", "the study record", RESTORE)
        (out / "study.md").write_text(table(study))
    else:
        study = run_study(out, args.settings, args.seeds, args.recipes, args.quick)
    print(table(study))


if __name__ == "__main__":
    main()
