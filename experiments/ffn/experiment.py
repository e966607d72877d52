"""The waves runs and the ConceptPrune sweep, and the command line (``experiments.ffn``; ``python -m
experiments.ffn --help``).

The run, on base + waves (the shipped checkpoint with a shipped FFN delta written in, built in the output
folder): the fine-tune itself scored as a run (``teach``), ConceptPrune with the unchanged ``prune.jobs`` and the
toy settings of ``toyworld.mission``, and Concept Ablation with the mission's ``style`` recipe on the same
concept, all scored by the mission's ``evaluation.protocol`` settings and by the judge plus the waves detector.
The sweep: ConceptPrune at every ``SWEEP_SKILL_RATIOS`` x ``SWEEP_TAUS``, judged on ``SWEEP_N`` images per concept.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from toyworld import mission
from toyworld.render import ANCHOR_STYLE, TEXTURES

from .data import ASSETS, FFN_ASSETS, TEXTURE
from .detector import DETECTOR_FILE, DETECTOR_SETTINGS, load_detector, style_of, train_detector
from .report import markdown, report_json, sweep_markdown, write_grid
from .teach import DELTA_FILE, DELTA_FILES, VARIANTS, build_checkpoint, suffix, train_delta

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


def teach_run(out: Path, assets: Path = ASSETS, variant: str = "units") -> Path:
    """The FFN delta as a run folder (``{out}/logs/toy_ffn_teach{suffix}/checkpoints/delta_waves.safetensors``
    and its config), so that evaluate.py scores shipped vs shipped + delta like any ablation."""
    from omegaconf import OmegaConf

    from ldm.util import load_model_config

    run_dir = Path(out) / "logs" / f"toy_ffn_teach{suffix(variant)}"
    ckpt = run_dir / "checkpoints" / "delta_waves.safetensors"
    if not ckpt.is_file():
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.write_bytes((assets / "ffn" / DELTA_FILES[variant]).read_bytes())
        (run_dir / "configs").mkdir(exist_ok=True)
        model = load_model_config(mission.asset_paths(assets)["config"])
        OmegaConf.save(OmegaConf.create({"model": model}),
                       run_dir / "configs" / "delta_waves-project.yaml")
    return run_dir


def prune_run(out: Path, ckpt: Path, texture: str = TEXTURE, skill_ratio: float | None = None,
              tau: int | None = None, assets: Path = ASSETS, run_dir: Path | None = None, n_pairs: int | None = None,
              delta_name: str = "delta_pruned.safetensors") -> Path:
    """ConceptPrune's discover + prune (unchanged, :func:`toyworld.mission.prune`) on ``ckpt`` for ``texture``, with
    the toy settings of ``toyworld.mission`` (PLMS 50, CFG 7.5, seed 0, 32 px; tau and skill_ratio from there unless
    given; no images saved); the pruned delta goes to ``{run_dir}/checkpoints/{delta_name}``. ``n_pairs``: only the
    first prompt pairs (CI)."""
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
    mission.prune(ckpt, mission.asset_paths(assets)["config"], texture, target_file, run_dir, base_file=base_file,
                  skill_ratio=skill_ratio, tau=tau, save_images=0, delta_name=delta_name)
    return run_dir


def pruned_fraction(run_dir: Path, delta_name: str = "delta_pruned.safetensors") -> float:
    return mission.pruned_fraction(Path(run_dir) / "checkpoints" / delta_name)


def ablation_recipe() -> dict:
    """The mission's ``style`` recipe (train.py, cross-attention K/V, --regularization) with target waves."""
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
    from toyworld.judge import classify
    from toyworld.mission import prompt_attributes

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


def scorers(assets: Path = ASSETS):
    """``(judge, detector)``: the shipped judge and the waves detector of ``assets`` (fresh copies)."""
    from toyworld.judge import load_judge

    return load_judge(assets / "judge" / "judge.safetensors"), load_detector(assets / "ffn" / DETECTOR_FILE)


def evaluate_settings(run_dir: Path, out: Path, base_ckpt: Path, base_outpath: Path, numgen: int, pattern: str,
                      assets: Path = ASSETS):
    """The mission's ``evaluation.protocol`` settings (``mission.evaluate_settings``) for ``run_dir`` with target
    waves, anchor painting and the three shipped textures as hard negatives (``ffn/eval.json``), the prompt
    folder of :func:`eval_prompt_dir`, base ``base_ckpt`` and its image cache ``base_outpath``."""
    import dataclasses

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
    judge, detector = scorers(assets)
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


def run(out: Path, assets: Path = ASSETS, quick: bool = False, methods=("teach", "conceptprune", "ablation"),
        skill_ratio: float | None = None, tau: int | None = None, variant: str = "units") -> dict:
    """Build base + waves (the ``variant``'s delta), then evaluate.py + judge on: the fine-tune itself
    (``teach``), ConceptPrune and Concept Ablation on waves. Writes ``{out}/ffn{suffix}.{md,json}`` and
    ``{out}/grid{suffix}.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = SIZES["quick" if quick else "full"]
    skill_ratio = mission.PRUNE_SKILL_RATIO if skill_ratio is None else skill_ratio
    tau = mission.PRUNE_TAU if tau is None else tau
    times, runs = {}, {}
    t0 = time.time()
    sfx = suffix(variant)
    ckpt = build_checkpoint(out, assets, variant)
    shipped = mission.asset_paths(assets)["weights"]
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

    from ldm.util import load_model_config
    from runtime.generate import Sampling, generate_images
    from runtime.loading import load_model

    out = Path(out)
    prompt_dir = eval_prompt_dir(out, assets)
    judges = scorers(assets)
    config = load_model_config(mission.asset_paths(assets)["config"])
    rows, t0 = [], time.time()
    for key in textures:
        texture, _, variant = key.partition("-")
        ckpt = (build_checkpoint(out, assets, variant or "units") if texture == TEXTURE
                else mission.asset_paths(assets)["weights"])
        others = [t for t in (TEXTURE, *TEXTURES) if t != texture and (texture == TEXTURE or t != TEXTURE)]
        concepts = [texture, *others, ANCHOR_STYLE]
        prompts = [p for c in concepts for p in sweep_prompts(c, n, prompt_dir)]
        root = out / "sweep" / key.replace(" ", "_")

        def measure(delta, name):
            folder = root / name
            generate_images(functools.partial(load_model, config, str(ckpt), delta and str(delta)), prompts, folder,
                            Sampling(steps=50, eta=1.0, scale=6.0, batch_size=50, height=32, width=32, seed=42,
                                     precision="full"), desc=name)
            return _judge_images(folder, concepts, n, judges)

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


def main(argv=None):
    """``python -m experiments.ffn``: parse ``argv`` (default ``sys.argv[1:]``; argparse exits 2 on a bad one),
    then retrain the shipped files (``--train_detector``, ``--train_delta``; returns None), run the sweep
    (``--sweep``) or the run; returns that report."""
    import torch

    from experiments import ffn  # the package's docstring is the command's help

    p = argparse.ArgumentParser(prog="python -m experiments.ffn", description=ffn.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
