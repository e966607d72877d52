"""The toy world's first run (README, docs/getting-started/toyworld-quickstart.md): ablate a style, an instance and the memorized picture of the toy world with
``train.py``, score each with ``evaluate.py``, and write the before/after table and image grid.

Everything runs through the same jobs a researcher uses with Stable Diffusion (``ablation.train`` and
``evaluation.protocol``, the jobs of train.py and evaluate.py), with the toy world's weights (``assets/toyworld/``), configs
(``configs/toyworld/``), prompt files and evaluation set::

    python -m toyworld.mission --out outputs/toyworld-mission          # a few minutes per recipe on a CPU
    python -m toyworld.mission --recipes style style-preserve --quick   # the short CI version
    python -m toyworld.mission --method conceptprune                    # the same recipes with ConceptPrune

The ``-preserve`` recipes are the paper's recipe plus ``train.py --preserve_prompts`` (not in the paper): world
captions that name neither the target nor any evaluation prompt (``preservation_prompts``; shipped in
``assets/toyworld/preserve_prompts/``) keep the base model's prediction, at 4x the steps (style-preserve without
``--regularization``).

``--method conceptprune`` replaces ``train.py`` by ``conceptprune.py discover`` and ``prune`` on the prompt
pairs of ``assets/toyworld/prune_prompts/`` (PLMS 50, CFG 7.5, seed 0, 32 px; tau 10), with the pruned
delta written into a run folder that ``evaluate.py`` scores exactly like an ablation run.

Beside evaluate.py's CLIP numbers, the table gives the judge's view (``toyworld.judge``, trained on ground-truth
renders): the share of images that show the concept (texture, or cat variant; for the anchor, every prompted
attribute), and, for the target, the CLIP accuracy of the base model's own anchor images (the "anchor level").

Output: ``{out}/logs/<run>/`` (training runs, their delta checkpoints and eval images),
``{out}/metrics/evaluation.{pkl,csv,json}``, ``{out}/mission.md`` (the table), ``{out}/mission.json``
and ``{out}/grid.png`` (rows: base model, then ablated, for each recipe's target prompts); ConceptPrune
writes ``mission-conceptprune.{md,json}`` and ``grid-conceptprune.png`` beside them.
"""  # noqa: E501 (--help text, kept as printed)
from __future__ import annotations

import argparse
import functools
import json
import math
import random
import re
from pathlib import Path

from runtime.resources import DATA_ROOT, asset_path, config_path

from .captions import MEMORIZED_CAPTION, caption
from .render import ANCHOR_STYLE, COLOUR_NAMES, SUBJECTS, TEXTURES

REPO = DATA_ROOT  # the clone (installed: the data package); reports show the paths inside it relative to it
ASSETS = asset_path("toyworld")

# The paper's recipe plus --preserve_prompts (train.py; not in the paper): other world captions keep the base
# model's prediction (training.preservation_weight of the concept config: 8), with 4x the steps because the
# term slows the ablation down (the weight/steps trials: docs/experiments/toyworld-mission.md).
PRESERVE_OVERRIDES = ["training.max_steps=400", "training.save_freq=400"]
# name -> what train.py / evaluate.py get; "eval_target" is the evaluate.py --caption_target, "regularization"
# train.py's --regularization, "preserve" the --preserve_prompts file, "overrides" config overrides.
_STYLE = {"concept_type": "style", "caption_target": "stripes", "prompts": "prompts/painting.txt",
          "eval_target": "stripes"}
_INSTANCE = {"concept_type": "object", "caption_target": "cat+grumpy cat", "prompts": "prompts/cat.txt",
             "eval_target": "grumpy cat"}
RECIPES = {
    # The style recipe keeps the anchor prompt's own prediction in place (--regularization): the shipped model
    # binds colour through the text, and without it the anchor paintings drift in colour.
    "style": {**_STYLE, "regularization": True},
    # style-preserve drops --regularization: its true-noise anchor term fights the ablation at high noise levels,
    # and the kept captions hold the anchor paintings anyway (measured: docs/experiments/toyworld-mission.md).
    "style-preserve": {**_STYLE, "preserve": "preserve_prompts/style.txt", "overrides": PRESERVE_OVERRIDES},
    "instance": _INSTANCE,
    "instance-preserve": {**_INSTANCE, "preserve": "preserve_prompts/instance.txt", "overrides": PRESERVE_OVERRIDES},
    "memorized": {"concept_type": "memorization", "caption_target": MEMORIZED_CAPTION,
                  "prompts": "prompts/lighthouse_mem.txt", "eval_target": MEMORIZED_CAPTION},
}
# preservation file -> (the word it must not contain: the target; anchor prompts appended, or None). The instance
# file adds the anchor prompts (they keep the cat anchor); the style file does not (with them, the judge saw
# checkerboard fall further; both measured: docs/experiments/toyworld-mission.md).
PRESERVE_SOURCES = {"preserve_prompts/style.txt": ("stripes", None),
                    "preserve_prompts/instance.txt": ("grumpy", "prompts/cat.txt")}
# ConceptPrune per recipe: concept name and prompt files for conceptprune.py discover. The toy UNet's ff.net.2
# layers have 128-256 inputs, so the paper's skill_ratio 0.01 keeps 1-2 weights per row: the default here is
# PRUNE_SKILL_RATIO (--skill_ratio).
PRUNE = {
    "style": {"concept": "stripes", "base_file": "prune_prompts/stripes_base.txt",
              "target_file": "prune_prompts/stripes_target.txt"},
    "instance": {"concept": "grumpy cat", "base_file": "prune_prompts/grumpy_cat_base.txt",
                 "target_file": "prune_prompts/grumpy_cat_target.txt"},
    "memorized": {"concept": "memorize_lighthouse", "target_file": "prune_prompts/memorize_lighthouse.txt"},
}
PRUNE_SKILL_RATIO = 0.1
PRUNE_TAU = 10
# anchor images (train_size) and evaluation images (numgen) of the full run and the --quick one; train_size
# must be a multiple of the prompt count (36) and, for memorization, of generation.anchor_size (10)
SIZES = {"full": {"train_size": 180, "numgen": 50}, "quick": {"train_size": 72, "numgen": 10}}
QUICK_MEMORIZATION_TRAIN_SIZE = 60


def preservation_prompts(exclude: str, anchor_file: str | None = None, assets: Path = ASSETS, n: int = 200,
                         seed: int = 0) -> list[str]:
    """Prompts for ``--preserve_prompts``: ``n`` captions of random world scenes (the training set's sampler and
    templates), then the recipe's anchor prompts (``anchor_file``, relative to ``assets``). None contains
    ``exclude`` (the target) or the memorized caption, and none is an evaluation prompt verbatim."""
    from .dataset import sample_scene

    evaluated = {line.strip().lower() for f in (assets / "eval_prompts").glob("*.txt")
                 for line in f.read_text().splitlines()}
    keep = lambda text: exclude.lower() not in text.lower() and text.lower() not in evaluated  # noqa: E731
    rng = random.Random(f"preserve:{seed}")
    prompts = []
    while len(prompts) < n:
        scene = sample_scene(rng)
        if not scene.memorized and keep(text := caption(scene, rng)):
            prompts.append(text)
    if anchor_file:
        anchors = (assets / anchor_file).read_text().splitlines()
        prompts += [p for p in dict.fromkeys(a.strip() for a in anchors) if p and keep(p)]
    return prompts


def write_preservation_prompts(assets: Path = ASSETS) -> list[Path]:
    """(Re)write the shipped preservation prompt files."""
    paths = []
    for rel, (exclude, anchor_file) in PRESERVE_SOURCES.items():
        path = assets / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(preservation_prompts(exclude, anchor_file, assets)) + "\n")
        paths.append(path)
    return paths


def asset_paths(assets: Path) -> dict:
    """Where the toy world's files are in an assets folder (the shipped ``assets/toyworld/`` or a copy):
    ``config`` (the LDM yaml), ``weights`` (its checkpoint), ``clip`` (the toy CLIP folder), ``copydetect``
    and ``features`` (TorchScript files). Paths only; nothing is checked or read."""
    return {"config": assets / "ldm" / "ldm.yaml", "weights": assets / "ldm" / "toyworld-ldm.safetensors",
            "clip": assets / "clip", "copydetect": assets / "copydetect" / "copydetect.torchscript.pt",
            "features": assets / "judge" / "features.torchscript.pt"}


def memorized_reference(out: Path) -> Path:
    """The memorized picture, as the file ``--mem_impath`` points at."""
    from .render import render_memorized

    path = out / "memorized.png"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        render_memorized(32).save(path)
    return path


def train_settings(name: str, recipe: dict, assets: Path, out: Path, train_size: int, overrides=(), **changes):
    """The ``ablation.train`` settings (train.py's job, ``-t``) of recipe ``name``: the toy world's model, configs
    and sizes; ``overrides`` are config overrides after the recipe's, ``changes`` other TrainSettings fields
    (e.g. ``base_ckpt``, ``seed``)."""
    from ablation.train import TrainSettings

    p = asset_paths(assets)
    fields = dict(
        train=True, concept_type=recipe["concept_type"], caption_target=recipe["caption_target"],
        prompts=str(assets / recipe["prompts"]), name=f"toy_{name}", train_size=train_size,
        model_config=str(p["config"]), config=str(config_path(f"toyworld/{recipe['concept_type']}.yaml")),
        base_ckpt=str(p["weights"]), logdir=str(out / "logs"), root=str(out / "data"), n_samples=36,
        ckpt_format="safetensors", image_logging_freq=0, regularization=recipe.get("regularization", False),
        overrides=(*recipe.get("overrides", []), *overrides))
    if recipe["concept_type"] == "memorization":
        fields.update(mem_impath=str(memorized_reference(out)), sscd_ckpt=str(p["copydetect"]))
    if "preserve" in recipe:
        fields["preserve_prompts"] = str(assets / recipe["preserve"])
    return TrainSettings(**{**fields, **changes})


def prune_run(name: str, assets: Path, out: Path, skill_ratio: float = PRUNE_SKILL_RATIO,
              tau: int = PRUNE_TAU, spec: dict | None = None, ckpt: Path | None = None) -> Path:
    """ConceptPrune for recipe ``name``: discover + prune into ``{out}/logs/toy_prune_{name}/checkpoints/``.
    ``spec`` (default ``PRUNE[name]``) and ``ckpt`` (default: the shipped base) serve other targets and bases
    (``experiments.matrix``); prompt files are relative to ``assets`` unless absolute."""
    p, spec = asset_paths(assets), spec or PRUNE[name]
    run_dir = out / "logs" / f"toy_prune_{name}"
    prune(ckpt or p["weights"], p["config"], spec["concept"], assets / spec["target_file"], run_dir,
          base_file=assets / spec["base_file"] if "base_file" in spec else None, skill_ratio=skill_ratio, tau=tau)
    return run_dir


def prune(ckpt: Path, config: Path, concept: str, target_file: Path, run_dir: Path, base_file: Path | None = None,
          skill_ratio: float = PRUNE_SKILL_RATIO, tau: int = PRUNE_TAU, save_images: int = 5,
          delta_name: str = "delta_pruned.safetensors") -> Path:
    """ConceptPrune's discover + prune (``prune.jobs``) on ``ckpt`` with the toy settings: PLMS 50, CFG 7.5, seed 0,
    32 px, fp32, 20 prompts per batch. The masks go to ``{run_dir}/discover/``, the pruned delta to
    ``{run_dir}/checkpoints/{delta_name}`` (returned)."""
    from prune.jobs import DiscoverSettings, PruneSettings, run_discover, run_prune

    model = {"ckpt": str(ckpt), "config": str(config)}
    found = run_discover(DiscoverSettings(
        concept=concept, base_file=None if base_file is None else str(base_file), target_file=str(target_file),
        skill_ratio=float(skill_ratio), save_images=save_images, outdir=str(run_dir / "discover"), H=32, W=32,
        precision="full", batch_size=20, **model))
    return run_prune(PruneSettings(masks=(found["masks"],), tau=int(tau),
                                   out=str(run_dir / "checkpoints" / delta_name), **model))


def pruned_fraction(delta) -> float:
    """The share of the ``ff.net.2`` weights that a ``conceptprune.py prune`` delta zeroes (from the record that
    ``prune`` writes beside the delta)."""
    info = json.loads(Path(delta).with_suffix(".json").read_text())
    return info["pruned_weights"] / info["ff2_weights"]


def evaluate_settings(run_dir: Path, recipe: dict, assets: Path, out: Path, numgen: int,
                      checkpoints: str = "delta_step_*"):
    """The ``evaluation.protocol`` settings that score ``run_dir`` on the toy world (its CLIP, its judge's
    features for KID/FID, 32 px images, full precision; memorization: the memorized render and copydetect)."""
    from evaluation.protocol import EvaluateSettings

    p = asset_paths(assets)
    memorization = recipe["concept_type"] == "memorization"
    return EvaluateSettings(
        root=str(run_dir), filter=checkpoints, concept_type=recipe["concept_type"],
        caption_target=recipe["eval_target"], eval_json=str(assets / "eval.json"),
        eval_prompts=str(assets / "eval_prompts"), numgen=numgen, outpkl=str(out / "metrics" / "evaluation.pkl"),
        base_ckpt=str(p["weights"]), base_outpath=str(out / "baseline"), clip_model=str(p["clip"]),
        feature_model=str(p["features"]), feature_size=32, H=32, W=32, n_samples=50, precision="full",
        mem_impath=str(memorized_reference(out)) if memorization else None,
        sscd_ckpt=str(p["copydetect"]) if memorization else None)


def prompt_attributes(prompt: str) -> dict:
    """What a world prompt asks for: ``subject`` (longest subject name in it, so "grumpy cat" beats "cat"),
    ``colour`` and ``style`` (a texture, else the plain-fill anchor)."""
    words = prompt.lower()
    found = lambda names: [n for n in names if re.search(rf"\b{n}\b", words)]  # noqa: E731
    subjects, colours = found(SUBJECTS), found(COLOUR_NAMES)
    if not subjects or not colours:
        raise ValueError(f"not a toy-world prompt (no subject or colour): {prompt!r}")
    return {"subject": max(subjects, key=len), "colour": colours[0], "style": (found(TEXTURES) or [ANCHOR_STYLE])[0]}


def judge_share(judge, folder: Path, concept: str, anchor: str) -> float:
    """Share of ``folder``'s images (evaluate.py's ``images.txt`` / ``caption.txt``) in which the judge sees the
    concept: the texture or cat variant it names; for the anchor, every attribute its prompt asks for."""
    from ablation.data import load_image_captions

    from .judge import classify

    images, prompts = load_image_captions(folder / "images.txt", folder / "caption.txt")
    seen = classify(judge, images)
    if concept == anchor:
        hits = [all(s[k] == w[k] for k in ("subject", "colour", "style"))
                for s, w in zip(seen, map(prompt_attributes, prompts))]
    else:
        head = "style" if concept in TEXTURES else "subject"
        hits = [s[head] == concept for s in seen]
    return sum(hits) / len(hits)


def summarize(name: str, recipe: dict, row: dict, assets: Path = ASSETS, folders: dict | None = None) -> dict:
    """The numbers of the mission's table from one evaluate.py row; with ``folders`` (concept -> (base folder,
    ablated folder)) also the judge's shares and the target's CLIP accuracy on the anchor's base images."""
    if recipe["concept_type"] == "memorization":
        return {"recipe": name, "target": recipe["eval_target"],
                "memorization_rate": (row["Baseline memorization rate"], row["Memorization rate"])}
    entry = json.loads((assets / "eval.json").read_text())[
        "style" if recipe["concept_type"] == "style" else "object"][recipe["eval_target"]]
    t, a = entry["target"], entry["anchor"]
    acc = lambda c: (row[f"Baseline CLIP accuracy_{c}_{a}"], row[f"CLIP accuracy_{c}_{a}"])  # noqa: E731
    out = {"recipe": name, "target": t, "anchor": a, "target_accuracy": acc(t),
           "hard_negative_accuracy": {h: acc(h) for h in entry["hard_negative"]},
           "anchor_clip_score": (row[f"Baseline CLIP scores_{a}_{a}"], row[f"CLIP scores_{a}_{a}"]),
           "kid": {c: row[f"KID_{c}"] for c in [t, a, *entry["hard_negative"]]}}
    if folders:
        from ablation.data import read_image_list
        from scoring.metrics import clip_accuracy

        judge, clip = scorers(assets)
        out["judge"] = {c: (judge_share(judge, b, c, a), judge_share(judge, f, c, a))
                        for c, (b, f) in folders.items()}
        out["anchor_level"] = clip_accuracy(clip, read_image_list(folders[a][0] / "images.txt"), t, a)
    return out


@functools.lru_cache(maxsize=2)
def scorers(assets: Path):
    """``(judge, clip)``: the ground-truth judge and the toy CLIP of ``assets``, loaded once per folder (every
    recipe of a run is scored with them; cached, so callers share one copy and must not change it)."""
    from scoring.metrics import load_clip

    from .judge import load_judge

    return load_judge(assets / "judge" / "judge.safetensors"), load_clip(str(asset_paths(assets)["clip"]), "cpu")


def markdown(summaries: list[dict], after: str = "ablated") -> str:
    def pair(p):
        return f"{p[0]:.2f} → {p[1]:.2f}"

    lines = [f"| recipe | concept | measure | base → {after} | judge: shows it, base → {after} |",
             "|---|---|---|---|---|"]
    for s in summaries:
        r = s["recipe"]
        if "memorization_rate" in s:
            rate = pair(s["memorization_rate"])
            lines.append(f"| {r} | \"{s['target']}\" | copy rate (SSCD-style > 0.5) | {rate} | |")
            continue
        judge = lambda c: pair(s["judge"][c]) if "judge" in s else ""  # noqa: E731
        level = f" (on base {s['anchor']} images: {s['anchor_level']:.2f})" if "anchor_level" in s else ""
        t, a = s["target"], s["anchor"]
        acc = pair(s["target_accuracy"])
        lines.append(f"| {r} | {t} (target) | CLIP accuracy vs {a}{level} | {acc} | {judge(t)} |")
        for h, p in s["hard_negative_accuracy"].items():
            lines.append(f"| {r} | {h} (hard negative) | CLIP accuracy vs {a} | {pair(p)} | {judge(h)} |")
        lines.append(f"| {r} | {a} (anchor) | CLIP score | {pair(s['anchor_clip_score'])} | {judge(a)} |")
    return "\n".join(lines) + "\n"


def image_grid(rows: list[tuple[str, list[Path]]], path: Path, scale: int = 3) -> Path:
    """One labelled row of images per ``(label, paths)``."""
    from PIL import Image, ImageDraw

    cell = 32 * scale
    label_w = 130
    n = max(len(p) for _, p in rows)
    grid = Image.new("RGB", (label_w + n * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, paths) in enumerate(rows):
        draw.text((6, r * cell + cell // 2 - 6), label, fill="black")
        for c, p in enumerate(paths):
            im = Image.open(p).convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(im, (label_w + c * cell, r * cell))
    grid.save(path)
    return path


def run(recipes, out: Path, assets: Path = ASSETS, quick: bool = False, train_extra=(), method: str = "ablation",
        skill_ratio: float = PRUNE_SKILL_RATIO, train_changes=None) -> dict:
    """The mission for ``recipes`` into ``out``. ``train_extra``: config overrides (``key.sub=value``) of every
    training run, after the recipe's; ``train_changes``: other TrainSettings fields of every training run (e.g.
    ``{"seed": 24}``)."""
    # train.py's job; train.run is looked up at each call (experiments.anchor_study times it)
    from ablation import train
    from evaluation import protocol

    ablated_dir, base_dir = protocol.ablated_dir, protocol.base_dir

    sizes = SIZES["quick" if quick else "full"]
    pruning = method == "conceptprune"
    unknown = set(recipes) - set(PRUNE if pruning else RECIPES)
    if unknown:
        raise ValueError(f"no {method} recipe {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join(PRUNE if pruning else RECIPES)}")
    after = "pruned" if pruning else "ablated"
    suffix = "-conceptprune" if pruning else ""  # both methods can share one --out (and its baseline cache)
    out.mkdir(parents=True, exist_ok=True)
    summaries, grid_rows = [], []
    for name in recipes:
        recipe = RECIPES[name]
        train_size = sizes["train_size"]
        if quick and recipe["concept_type"] == "memorization":
            train_size = QUICK_MEMORIZATION_TRAIN_SIZE
        if pruning:
            run_dir, pattern = prune_run(name, assets, out, skill_ratio), "delta_pruned*"
        else:
            run_dir = train.run(train_settings(name, recipe, assets, out, train_size, train_extra,
                                               **(train_changes or {})))
            pattern = "delta_step_*"
        plan = protocol.plan(evaluate_settings(run_dir, recipe, assets, out, sizes["numgen"], pattern))
        df = protocol.execute(plan)
        ckpt = plan.checkpoints[-1]
        folders = {c.name: (base_dir(plan, c), ablated_dir(ckpt, c)) for c in plan.concepts}
        summaries.append(summarize(name, recipe, df.loc[ckpt.expname].to_dict(), assets, folders))
        target = plan.concepts[0]
        pick = lambda folder: sorted((folder / "samples").glob("*.png"))[:8]  # noqa: E731
        grid_rows += [(f"{name}: base", pick(base_dir(plan, target))),
                      (f"{name}: {after}", pick(ablated_dir(ckpt, target)))]
    report = {"method": method, "quick": quick, "sizes": sizes, "summaries": summaries}
    if pruning:
        report["conceptprune"] = {"skill_ratio": skill_ratio, "tau": PRUNE_TAU}
    table = markdown(summaries, after)
    (out / f"mission{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"mission{suffix}.md").write_text(table)
    image_grid(grid_rows, out / f"grid{suffix}.png")
    print(table)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/toyworld-mission")
    p.add_argument("--assets", default=str(ASSETS))
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=None,
                   help="default: all (with --method conceptprune: those without -preserve)")
    p.add_argument("--quick", action="store_true", help="fewer anchor and evaluation images (the CI test)")
    p.add_argument("--method", choices=("ablation", "conceptprune"), default="ablation")
    p.add_argument("--skill_ratio", type=float, default=PRUNE_SKILL_RATIO,
                   help="ConceptPrune's k (--method conceptprune)")
    args = p.parse_args(argv)
    recipes = args.recipes or list(PRUNE if args.method == "conceptprune" else RECIPES)
    if args.method == "conceptprune" and set(recipes) - set(PRUNE):
        p.error(f"--method conceptprune runs only the recipes {', '.join(PRUNE)}")
    report = run(recipes, Path(args.out), Path(args.assets), args.quick, method=args.method,
                 skill_ratio=args.skill_ratio)
    if any(isinstance(v, float) and math.isnan(v) for s in report["summaries"] for v in s.values()):
        print("warning: some metrics are NaN")
    return 0


if __name__ == "__main__":
    main()
