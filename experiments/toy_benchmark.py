"""benchmark.py's erasure suites on the toy world: base, our ablation deltas and our pruned deltas, one table.

The four suites the toy world can host run with the toy world's own scorers in place of the real ones:

============  =====================================================  ======================================
suite         rows                                                   scorer (stands in for)
============  =====================================================  ======================================
artist        each texture's evaluation prompts (stripes, polka       toy CLIP (CLIP ViT-B/32)
              dots, checkerboard), seed 0 each, as the original
objects       the 10 subjects (6 shapes, 4 cats) x N rows,            the ground-truth judge's subject head
              "an image of a {colour} {subject}", one seed per row    (ImageNet ResNet-50)
coco          world captions of random scenes                         toy CLIP; judge features for FID/KID
memorization  the memorized caption, seeds 0..9, its render as the    copy descriptor (SSCD), toy CLIP
              ground truth (Wen et al.'s jsonl + gt_images layout)
============  =====================================================  ======================================

::

    python -m experiments.toy_benchmark --out outputs/toyworld-benchmark            # trains and prunes, then scores
    python -m experiments.toy_benchmark --recipes style --methods conceptprune --limit 8 --steps 10   # a quick look

The deltas come from ``toyworld.mission``'s recipes (``train.py`` for Concept Ablation, ``conceptprune.py``
discover + prune for ConceptPrune) and are scored by the unchanged ``benchmark.py`` (``evaluation.benchmark``);
``--delta NAME=PATH`` adds any other delta. Output: ``{out}/benchmark/`` (benchmark.py's layout), ``{out}/benchmark.md`` and
``{out}/benchmark.json`` (the table of docs/experiments/toy-benchmark.md).
"""  # noqa: E501 (--help text, kept as printed)
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from toyworld.captions import MEMORIZED_CAPTION, caption
from toyworld.mission import (
    ASSETS,
    QUICK_MEMORIZATION_TRAIN_SIZE,
    RECIPES,
    SIZES,
    asset_paths,
    prune_run,
    train_settings,
)
from toyworld.render import CAT_CLASSES, COLOUR_NAMES, SHAPES, SUBJECTS, TEXTURES

SUITES = ("artist", "objects", "coco", "memorization")
RECIPE_NAMES = ("style", "instance", "memorized")  # mission recipes whose deltas are benchmarked
TARGET_CLASS = "grumpy cat"  # the objects suite's erase class: the instance recipe's target
ROWS_PER_CLASS, N_CAPTIONS, MEM_SEEDS = 50, 100, 10


class JudgeClassifier:
    """The objects suite's classifier protocol (``.classify(paths) -> names``) over the judge's subject head."""

    def __init__(self, path: Path):
        from toyworld.judge import load_judge

        self.judge = load_judge(path)

    def classify(self, paths, batch_size: int = 64) -> list[str]:
        from toyworld.judge import classify

        return [row["subject"].lower() for row in classify(self.judge, list(paths), batch_size)]


def write_prompt_sets(folder: Path, assets: Path = ASSETS, rows_per_class: int = ROWS_PER_CLASS,
                      n_captions: int = N_CAPTIONS) -> dict:
    """The toy prompt sets in the real suites' formats (deterministic): artist .txt files, an imagenette.csv-format
    object CSV, a captions file, and Wen et al.'s jsonl + gt_images layout."""
    import csv

    from toyworld.dataset import sample_scene
    from toyworld.render import render_memorized

    folder.mkdir(parents=True, exist_ok=True)
    artists = []
    for t in TEXTURES:
        src = assets / "eval_prompts" / f"{t.replace(' ', '_')}_eval.txt"
        dst = folder / "artist" / f"{t}.txt"  # the stem names the concept ("polka dots")
        dst.parent.mkdir(exist_ok=True)
        dst.write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
        artists.append(dst)
    rng = random.Random("objects:0")
    objects = folder / "objects.csv"
    with objects.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["case_number", "prompt", "class", "evaluation_seed"])
        case = 0
        for subject in SHAPES + CAT_CLASSES:
            for i in range(rows_per_class):
                colour = COLOUR_NAMES[i % len(COLOUR_NAMES)]
                w.writerow([case, f"an image of a {colour} {subject}", subject, rng.randrange(10000)])
                case += 1
    rng = random.Random("coco:0")
    lines = []
    while len(lines) < n_captions:
        scene = sample_scene(rng)
        if not scene.memorized:
            lines.append(caption(scene, rng))
    captions = folder / "captions.txt"
    captions.write_text("\n".join(lines) + "\n", encoding="utf-8")
    mem = folder / "memorization" / "memorized.jsonl"
    (mem.parent / "gt_images" / "0").mkdir(parents=True, exist_ok=True)
    render_memorized(32).save(mem.parent / "gt_images" / "0" / "0.png")
    mem.write_text(json.dumps({"caption": MEMORIZED_CAPTION, "index": 0, "url": ""}) + "\n", encoding="utf-8")
    assert set(SHAPES + CAT_CLASSES) <= set(SUBJECTS)
    return {"artists": artists, "objects": objects, "captions": captions, "mem_jsonl": mem}


def make_deltas(out: Path, recipes, methods, assets: Path = ASSETS, quick: bool = False) -> list[str]:
    """``NAME=PATH`` of every delta: Concept Ablation (``ca-{recipe}``) and ConceptPrune (``cp-{recipe}``)."""
    from ablation.train import run as train

    specs = []
    for method in methods:
        for name in recipes:
            if method == "ablation":
                recipe = RECIPES[name]
                size = SIZES["quick" if quick else "full"]["train_size"]
                if quick and recipe["concept_type"] == "memorization":
                    size = QUICK_MEMORIZATION_TRAIN_SIZE
                run_dir = train(train_settings(name, recipe, assets, out, size))
                delta = sorted((run_dir / "checkpoints").glob("delta_step_*"),
                               key=lambda p: int(p.stem.rsplit("_", 1)[1]))[-1]
                specs.append(f"ca-{name}={delta}")
            else:
                run_dir = prune_run(name, assets, out)
                specs.append(f"cp-{name}={run_dir / 'checkpoints' / 'delta_pruned.safetensors'}")
    return specs


def benchmark_settings(out: Path, sets: dict, deltas, assets: Path = ASSETS, steps: int = 50,
                       limit: int | None = None, suites=SUITES):
    """``evaluation.benchmark``'s settings for the toy world: its model, scorers and prompt sets (``sets``:
    :func:`write_prompt_sets`), the deltas ``NAME=PATH``, output under ``{out}/benchmark``."""
    from evaluation.benchmark import BenchmarkSettings

    p = asset_paths(assets)
    return BenchmarkSettings(
        suites=tuple(suites), base=str(p["weights"]), config=str(p["config"]), outdir=str(out / "benchmark"),
        H=32, W=32, steps=int(steps), batch_size=50, precision="full", clip_model=str(p["clip"]),
        mem_clip_model=str(p["clip"]), feature_model=str(p["features"]), feature_size=32,
        sscd_ckpt=str(p["copydetect"]), object_prompts=str(sets["objects"]), target_class=TARGET_CLASS,
        captions=str(sets["captions"]), mem_jsonl=str(sets["mem_jsonl"]), mem_seeds=MEM_SEEDS, score_device="cpu",
        artist=tuple(str(a) for a in sets["artists"]), delta=tuple(deltas),
        limit=int(limit) if limit else None, rows_per_class=int(limit) if limit else None)


def table(results: dict) -> tuple[str, dict]:
    """The study's table: per model, each texture's share of prompts below the base (artist), the erased and kept
    classes' accuracy (objects), COCO CLIP score and FID vs base, and the share of copies (memorization)."""
    models = list(next(iter(results.values())))
    cols: list[tuple[str, callable]] = []
    if "artist" in results:
        for t in TEXTURES:
            cols.append((f"artist: {t} CLIP sim",
                         lambda m, t=t: results["artist"][m]["per_artist"][t]["avg_similarity"]))
            cols.append((f"artist: {t} below base",
                         lambda m, t=t: results["artist"][m]["per_artist"][t]["avg_score"]))
    if "objects" in results:
        cols += [(f"objects: {TARGET_CLASS} acc", lambda m: results["objects"][m].get("accuracy_erase")),
                 ("objects: other classes acc", lambda m: results["objects"][m].get("accuracy_keep"))]
    if "coco" in results:
        cols += [("coco: CLIP", lambda m: results["coco"][m]["clip_score"]),
                 ("coco: FID vs base", lambda m: results["coco"][m].get("fid_vs_base"))]
    if "memorization" in results:
        cols += [("memorization: copies (SSCD > 0.5)", lambda m: results["memorization"][m]["share_above_0.5"])]
    data = {m: {name: fn(m) for name, fn in cols} for m in models}
    fmt = lambda v: "–" if v is None else (f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}")  # noqa: E731
    lines = ["| model | " + " | ".join(n for n, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {m} | " + " | ".join(fmt(v) for v in data[m].values()) + " |" for m in models]
    return "\n".join(lines) + "\n", data


def run(out: Path, recipes=RECIPE_NAMES, methods=("ablation", "conceptprune"), assets: Path = ASSETS,
        quick: bool = False, steps: int = 50, limit: int | None = None, extra_deltas=(), suites=SUITES) -> dict:
    import time

    from evaluation import benchmark as bench

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    sets = write_prompt_sets(out / "prompt_sets", assets)
    judge = asset_paths(assets)["features"].parent / "judge.safetensors"
    # inputs first
    bench.check(benchmark_settings(out, sets, [], assets, steps, limit, suites), JudgeClassifier(judge))
    deltas = make_deltas(out, recipes, methods, assets, quick) + list(extra_deltas)
    results = bench.run(benchmark_settings(out, sets, deltas, assets, steps, limit, suites), JudgeClassifier(judge))
    md, data = table(results)
    settings = {"recipes": list(recipes), "methods": list(methods), "quick": quick, "steps": steps, "limit": limit,
                "deltas": deltas, "wall_s": round(time.perf_counter() - start, 1)}
    (out / "benchmark.json").write_text(json.dumps({"settings": settings, "table": data, "summaries": results},
                                                   indent=1) + "\n")
    (out / "benchmark.md").write_text(md)
    print(md)
    return {"table": data, "summaries": results, "deltas": deltas, "wall_s": settings["wall_s"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/toyworld-benchmark")
    p.add_argument("--assets", default=str(ASSETS))
    p.add_argument("--recipes", nargs="*", choices=RECIPE_NAMES, default=list(RECIPE_NAMES))
    p.add_argument("--methods", nargs="*", choices=("ablation", "conceptprune"), default=["ablation", "conceptprune"])
    p.add_argument("--delta", action="append", default=[], help="another delta to score, NAME=PATH")
    p.add_argument("--suites", nargs="+", choices=SUITES, default=list(SUITES))
    p.add_argument("--quick", action="store_true", help="mission's quick training sizes")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (PLMS)")
    p.add_argument("--limit", type=int, default=None, help="rows per prompt set (per texture / class)")
    a = p.parse_args(argv)
    return run(Path(a.out), a.recipes, a.methods, Path(a.assets), a.quick, a.steps, a.limit, a.delta, a.suites)


if __name__ == "__main__":
    main()
