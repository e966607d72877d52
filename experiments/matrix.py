"""Every concept of the toy world as the target in turn, every other concept measured: the honest summary of
what each method does on this world (issue 21, item 5).

For each method (Concept Ablation with the paper's recipe, ``ablation``; with ``--preserve_prompts``,
``ablation-preserve``; ``conceptprune``) and each target (the textures with the style recipe, anchor
"painting"; the cat variants with the instance recipe, anchor "cat"), one run edits the shipped base model, and
the judge (``toyworld.judge``, trained on ground-truth renders) reads the base and the edited model's images of
EVERY concept: each texture on prompts of that texture, each cat variant on its prompts, and the two anchors
(plain paintings and plain cats: the share that shows everything the prompt asks for)::

    python -m experiments.matrix --out outputs/toyworld-matrix                 # the whole matrix, CPU
    python -m experiments.matrix --methods ablation --targets checkerboard --quick
    python -m experiments.matrix --out outputs/toyworld-matrix-waves --ffn_base units   # on base + waves, 21 runs

One recipe per concept type, never tuned per target: the target's run is ``toyworld.mission``'s tuned recipe
("style", "style-preserve", "instance", "instance-preserve"; ConceptPrune's "style" / "instance" settings)
with the tuned target's name replaced by the new one (``recipe``); the prompt files a recipe needs are derived
by the rules the shipped files follow (``eval_lines``, ``prune_pairs``, ``preserve_exclude``; for the tuned
targets they reproduce the shipped files exactly, tests/test_experiments_matrix.py) and written into
``{out}/prompts/``.

Evaluation: ``numgen`` images per concept (50, ``--quick`` 10), image ``i`` from line ``i % n`` of the concept's
evaluation prompts and seed ``42 + i``, with evaluate.py's sampler settings (DDIM 50, eta 1, CFG 6); the base
model's images are made once per concept (``{out}/baseline/``) and every edited model's images use the very same
prompts and seeds (``{out}/logs/<run>/matrix_eval/``).

Textures outside the shipped world (``render.FFN_TEXTURES``, e.g. "waves") join as targets and columns with
``--extra_textures`` (by default all of them when ``--ckpt`` names a base that learned them; none with the shipped
base); where the judge's style head has no class for one, ``experiments.ffn.style_of`` (its detector) reads
the styles (``style_reader``).

Output, rewritten after every run (a rerun with the same ``--out`` skips the runs already there):
``{out}/matrix.json`` (every share, base and edited, CLIP accuracies, run times, settings), ``{out}/matrix.md``
(the judge's table, base row first, and the CLIP accuracies) and ``{out}/grid.png`` (per target: base, then
each method's images).
"""
from __future__ import annotations

import argparse
import functools
import json
import re
import time
from pathlib import Path

from runtime.files import read_json
from toyworld import mission
from toyworld.render import ANCHOR_CLASS, ANCHOR_STYLE, CAT_CLASSES, TEXTURES

RESTORE = "restore it (it holds the results of earlier runs), or use another --out"  # a damaged study record
METHODS = ("ablation", "ablation-preserve", "conceptprune")
CAT_TARGETS = tuple(c for c in CAT_CLASSES if c != ANCHOR_CLASS)
ANCHORS = (ANCHOR_STYLE, ANCHOR_CLASS)
# method -> the mission recipe per concept type ("style": textures, "instance": cat variants)
_MISSION_RECIPE = {"ablation": "{kind}", "ablation-preserve": "{kind}-preserve", "conceptprune": "{kind}"}
GRID_IMAGES = 6


def slug(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def extra_textures_default(ckpt) -> tuple[str, ...]:
    """``render.FFN_TEXTURES`` (textures outside the shipped world) when another base (``ckpt``) is given."""
    from toyworld.render import FFN_TEXTURES

    return tuple(FFN_TEXTURES) if ckpt is not None else ()


@functools.lru_cache(maxsize=4)
def style_reader(assets: Path, extra_textures: tuple = ()):
    """``images -> [style]`` for the judge's style calls, or None where the shipped judge's style head knows every
    texture. A texture it has no class for needs a reader of its own: ``experiments.ffn.style_of`` (its
    detector decides that texture, the judge's head the rest) for the textures that module teaches."""
    from toyworld.judge import HEADS

    unknown = [t for t in extra_textures if t not in HEADS["style"]]
    if not unknown:
        return None
    try:
        from experiments import ffn
    except ImportError:
        ffn = None
    taught = getattr(ffn, "FFN_TEXTURES", ()) if hasattr(ffn, "style_of") else ()
    if set(unknown) - set(taught):
        raise ValueError(f"the judge has no class for {', '.join(sorted(set(unknown) - set(taught)))} and no "
                         f"detector reads it")
    judge, _ = mission.scorers(assets)
    detector = ffn.load_detector(assets / "ffn" / ffn.DETECTOR_FILE)
    return functools.partial(ffn.style_of, judge, detector)


def judge_share(folder: Path, concept: str, assets: Path, extra_textures=()) -> float:
    """``mission.judge_share`` for a matrix column: the share of ``folder``'s images that show ``concept`` (a
    texture or cat variant), or, for an anchor column, everything its prompt asks for; styles from
    ``style_reader`` where the shipped judge does not know every texture."""
    from ablation.data import load_image_captions
    from toyworld.judge import classify
    from toyworld.render import SUBJECTS

    judge, _ = mission.scorers(assets)
    images, prompts = load_image_captions(folder / "images.txt", folder / "caption.txt")
    seen = classify(judge, images)
    read = style_reader(assets, tuple(extra_textures))
    if read is not None:
        seen = [{**s, "style": style} for s, style in zip(seen, read(images))]
    if concept in ANCHORS:
        hits = [all(s[k] == w[k] for k in ("subject", "colour", "style"))
                for s, w in zip(seen, map(mission.prompt_attributes, prompts))]
    else:
        head = "subject" if concept in SUBJECTS else "style"
        hits = [s[head] == concept for s in seen]
    return sum(hits) / len(hits)


def world_concepts(extra_textures=()) -> list[str]:
    """The matrix's columns: the textures, plain paintings, the cat variants, plain cats."""
    return [*TEXTURES, *extra_textures, ANCHOR_STYLE, *CAT_TARGETS, ANCHOR_CLASS]


def kind(target: str, extra_textures=()) -> str:
    """``"style"`` for a texture, ``"instance"`` for a cat variant."""
    if target in (*TEXTURES, *extra_textures):
        return "style"
    if target in CAT_TARGETS:
        return "instance"
    raise ValueError(f"no recipe for target {target!r}: choose from "
                     f"{', '.join([*TEXTURES, *extra_textures, *CAT_TARGETS])}")


def anchor_of(target: str, extra_textures=()) -> str:
    return ANCHOR_STYLE if kind(target, extra_textures) == "style" else ANCHOR_CLASS


# ------------------------------------------------------------------------------------ prompt files
def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def texture_eval_lines(texture: str, assets: Path = mission.ASSETS) -> list[str]:
    """Evaluation prompts of a texture: the anchor's (plain painting) prompts with ``", in the style of
    <texture>"`` appended, the rule every shipped ``{texture}_eval.txt`` follows."""
    return [f"{line}, in the style of {texture}" for line in _lines(assets / "eval_prompts" / "painting_eval.txt")]


def eval_lines(concept: str, assets: Path = mission.ASSETS) -> list[str]:
    """A concept's evaluation prompts as evaluate.py builds them: textures and plain paintings read their shipped
    file (a texture without one: ``texture_eval_lines``), cat variants the anchor's file ``cat_eval.txt`` with
    the word "cat" replaced (evaluate.py's object rule)."""
    from evaluation.protocol import concept_lines

    prompt_dir = assets / "eval_prompts"
    if concept in CAT_CLASSES:
        return concept_lines("object", concept, ANCHOR_CLASS, prompt_dir)
    if (prompt_dir / f"{slug(concept)}_eval.txt").is_file():
        return concept_lines("style", concept, ANCHOR_STYLE, prompt_dir)
    return texture_eval_lines(concept, assets)


def prune_pairs(target: str, assets: Path = mission.ASSETS, extra_textures=()) -> tuple[list[str], list[str]]:
    """ConceptPrune's (base, target) prompt lists: the tuned recipe's base prompts, and each with the concept:
    a texture as ``"<object> in the style of <texture>"`` (the base's ``"a painting of "`` dropped), a cat
    variant with "cat" replaced by it; for stripes and grumpy cat these are the shipped files."""
    k = kind(target, extra_textures)
    base = _lines(assets / mission.PRUNE[k]["base_file"])
    if k == "style":
        return base, [f"{b.removeprefix('a painting of ')} in the style of {target}" for b in base]
    return base, [re.sub(rf"\b{ANCHOR_CLASS}\b", target, b) for b in base]


def preserve_exclude(target: str, extra_textures=()) -> str:
    """The word no ``--preserve_prompts`` caption may contain: the target without its anchor word ("grumpy" for
    grumpy cat, the texture itself); the shipped files' rule (``mission.PRESERVE_SOURCES``)."""
    anchor = anchor_of(target, extra_textures)
    return re.sub(rf"\s*\b{anchor}\b\s*", " ", target).strip()


def recipe(method: str, target: str, files: Path, assets: Path = mission.ASSETS, extra_textures=()) -> dict:
    """The mission recipe of the target's concept type with the tuned target replaced by ``target``; for
    ``ablation-preserve`` its preservation prompts are written to ``files``. ``conceptprune``: the ``PRUNE``
    spec with the pair files written to ``files``."""
    k = kind(target, extra_textures)
    name = _MISSION_RECIPE[method].format(kind=k)
    files = Path(files).resolve()  # absolute: mission's assets / path keeps it
    files.mkdir(parents=True, exist_ok=True)
    if method == "conceptprune":
        base, tgt = prune_pairs(target, assets, extra_textures)
        paths = {"base_file": files / f"prune_{slug(target)}_base.txt",
                 "target_file": files / f"prune_{slug(target)}_target.txt"}
        for key, lines in (("base_file", base), ("target_file", tgt)):
            paths[key].write_text("\n".join(lines) + "\n")
        return {"mission_recipe": name, "concept": target, **{k_: str(p) for k_, p in paths.items()}}
    tuned = mission.RECIPES[name]
    out = {**tuned, "mission_recipe": name, "eval_target": target,
           "caption_target": tuned["caption_target"].replace(tuned["eval_target"], target)}
    if "preserve" in tuned:
        _, anchor_file = mission.PRESERVE_SOURCES[tuned["preserve"]]
        path = files / f"preserve_{slug(target)}.txt"
        path.write_text("\n".join(mission.preservation_prompts(preserve_exclude(target, extra_textures),
                                                                anchor_file, assets)) + "\n")
        out["preserve"] = str(path)
    return out


# ------------------------------------------------------------------------------------ generation and scoring
@functools.lru_cache(maxsize=1)
def shown_path(path: Path) -> str:
    """``path`` as a report shows it: relative to the repository when inside it, else as given (the reports
    are shipped, so they must not carry this machine's absolute paths)."""
    try:
        return str(Path(path).resolve().relative_to(mission.REPO))
    except ValueError:
        return str(path)


def sampling() -> dict:
    """evaluate.py's default sampler settings (DDIM steps, eta, CFG scale, first seed)."""
    from evaluation.protocol import EvaluateSettings

    a = EvaluateSettings(root=".", concept_type="style", caption_target="x")
    return {"steps": a.steps, "eta": a.eta, "scale": a.scale, "seed": a.seed}


def generate(ckpt: Path, delta: Path | None, concept: str, n: int, folder: Path, assets: Path) -> Path:
    """``n`` images of ``concept`` (image ``i``: prompt line ``i % lines``, seed ``seed + i``) from base ``ckpt``
    plus ``delta``; an existing folder made with the same plan is reused."""
    from ldm.util import load_model_config
    from runtime.generate import Sampling, generate_images
    from runtime.loading import load_model

    config = load_model_config(mission.asset_paths(assets)["config"])
    lines = eval_lines(concept, assets)
    prompts = [lines[i % len(lines)] for i in range(n)]
    factory = functools.partial(load_model, config, str(ckpt), str(delta) if delta else None)
    return generate_images(factory, prompts, folder,
                           Sampling(**sampling(), height=32, width=32, batch_size=50, precision="full"),
                           desc=f"{folder.parent.parent.name} {concept}")


def score(folder: Path, concept: str, assets: Path, extra_textures=()) -> dict:
    """The judge's share of images that show ``concept`` (an anchor: everything its prompt asks for) and, for
    a texture or cat variant, the toy CLIP's accuracy against its anchor."""
    from ablation.data import read_image_list
    from scoring.metrics import clip_accuracy

    _, clip = mission.scorers(assets)
    out = {"judge": judge_share(folder, concept, assets, extra_textures)}
    if concept not in ANCHORS:
        out["clip_accuracy"] = clip_accuracy(clip, read_image_list(folder / "images.txt"), concept,
                                             anchor_of(concept, extra_textures))
    return out


# ------------------------------------------------------------------------------------ one run
def edit(method: str, target: str, spec: dict, ctx: dict) -> tuple[Path, Path]:
    """Train (Concept Ablation) or prune (ConceptPrune) one target; returns (run folder, delta checkpoint)."""
    from ablation.train import run as train

    name = f"{method.replace('-', '_')}_{slug(target)}"
    if method == "conceptprune":
        run_dir = mission.prune_run(f"matrix_{slug(target)}", ctx["assets"], ctx["out"], spec=spec,
                                    ckpt=ctx["ckpt"])
        return run_dir, run_dir / "checkpoints" / "delta_pruned.safetensors"
    base = {"base_ckpt": str(ctx["ckpt"])} if ctx["ckpt"] else {}
    run_dir = train(mission.train_settings(name, spec, ctx["assets"], ctx["out"], ctx["sizes"]["train_size"],
                                           ctx["train_extra"], **base))
    return run_dir, sorted((run_dir / "checkpoints").glob("delta_step_*"))[-1]


def run_cell(method: str, target: str, ctx: dict, base: dict) -> dict:
    t0 = time.perf_counter()
    spec = recipe(method, target, ctx["out"] / "prompts", ctx["assets"], ctx["extra"])
    run_dir, delta = edit(method, target, spec, ctx)
    t1 = time.perf_counter()
    cell = {"method": method, "target": target, "recipe": spec["mission_recipe"], "run": str(run_dir),
            "delta": str(delta), "scores": {}}
    for c in ctx["concepts"]:
        folder = generate(ctx["weights"], delta, c, ctx["sizes"]["numgen"], run_dir / "matrix_eval" / slug(c),
                          ctx["assets"])
        cell["scores"][c] = {k: (base[c][k], v) for k, v in score(folder, c, ctx["assets"], ctx["extra"]).items()}
    cell["seconds"] = {"edit": round(t1 - t0, 1), "evaluation": round(time.perf_counter() - t1, 1)}
    return cell


# ------------------------------------------------------------------------------------ report
def others_loss(cell: dict) -> float:
    """The judge's mean loss (base - edited share) over every concept but the target."""
    drops = [b - e for c, s in cell["scores"].items() if c != cell["target"] for b, e in [s["judge"]]]
    return sum(drops) / len(drops)


def markdown(report: dict) -> str:
    """The judge's table (base row first, then one row per method and target; the target's cell in bold) and
    the CLIP accuracies."""
    concepts = report["concepts"]
    base = report["base"]
    out = ["Judge: share of images that show the concept (an anchor: everything its prompt asks for); \"mean "
           "loss\": base minus edited, averaged over the other concepts.", "",
           "| method | target | " + " | ".join(concepts) + " | mean loss, the others | time |",
           "|---|---|" + "---|" * (len(concepts) + 2),
           "| base model | | " + " | ".join(f"{base[c]['judge']:.2f}" for c in concepts) + " | | |"]
    for cell in report["cells"]:
        vals = [f"{cell['scores'][c]['judge'][1]:.2f}" for c in concepts]
        vals = [f"**{v}**" if c == cell["target"] else v for c, v in zip(concepts, vals)]
        secs = cell["seconds"]["edit"] + cell["seconds"]["evaluation"]
        out.append(f"| {cell['method']} | {cell['target']} | " + " | ".join(vals) +
                   f" | {round(others_loss(cell), 2) + 0.0:.2f} | {secs / 60:.1f} min |")
    out.append("")
    clip_cols = [c for c in concepts if c not in ANCHORS]
    out += ["CLIP accuracy against the anchor (textures vs painting, cat variants vs cat), base model first:", "",
            "| method | target | " + " | ".join(clip_cols) + " |", "|---|---|" + "---|" * len(clip_cols),
            "| base model | | " + " | ".join(f"{base[c]['clip_accuracy']:.2f}" for c in clip_cols) + " |"]
    for cell in report["cells"]:
        vals = [f"{cell['scores'][c]['clip_accuracy'][1]:.2f}" for c in clip_cols]
        out.append(f"| {cell['method']} | {cell['target']} | " + " | ".join(vals) + " |")
    return "\n".join(out) + "\n"


def write_grid(report: dict, out: Path) -> Path | None:
    rows = []
    for target in report["targets"]:
        cells = [c for c in report["cells"] if c["target"] == target]
        if not cells:
            continue
        pick = lambda folder: sorted((Path(folder) / "samples").glob("*.png"))[:GRID_IMAGES]  # noqa: E731
        rows.append((f"{target}: base", pick(out / "baseline" / slug(target))))
        rows += [(f"{c['method']}", pick(Path(c["run"]) / "matrix_eval" / slug(target))) for c in cells]
    return mission.image_grid(rows, out / "grid.png", scale=2) if rows else None


def run(methods, targets, out: Path, assets: Path = mission.ASSETS, quick: bool = False, ckpt: Path | None = None,
        extra_textures=None, train_extra=(), numgen: int | None = None, train_size: int | None = None,
        ffn_base: str | None = None) -> dict:
    """The matrix for ``methods`` x ``targets`` into ``out`` (see the module docstring). ``numgen`` and
    ``train_size`` override the sizes (evaluation images per concept, anchor images), ``train_extra`` are
    config overrides (``key.sub=value``) of every training run: both for short test runs. ``ffn_base`` ("units" or
    "dense"): the base is the shipped model with ``experiments.ffn``'s FFN delta of that variant, built
    into ``out`` (instead of ``ckpt``)."""
    if ffn_base is not None and ckpt is not None:
        raise ValueError("ckpt and ffn_base name two base models; give one")
    extra = tuple(extra_textures_default(ckpt or ffn_base) if extra_textures is None else extra_textures)
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"no method {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    for t in targets:
        kind(t, extra)  # an unknown target fails before any work
    style_reader(assets, extra)  # and a texture nothing can read
    concepts = world_concepts(extra)
    sizes = dict(mission.SIZES["quick" if quick else "full"])
    sizes.update({k: v for k, v in (("numgen", numgen), ("train_size", train_size)) if v})
    if ffn_base is not None:
        from experiments.ffn import build_checkpoint

        ckpt = build_checkpoint(out, assets, ffn_base)  # after every check above: a bad call writes nothing
    weights = Path(ckpt) if ckpt else mission.asset_paths(assets)["weights"]
    out.mkdir(parents=True, exist_ok=True)
    ctx = {"assets": assets, "out": out, "ckpt": ckpt, "weights": weights, "sizes": sizes, "extra": extra,
           "concepts": concepts, "train_extra": list(train_extra)}
    settings = {"quick": quick, "sizes": sizes, "sampling": sampling(), "base_ckpt": shown_path(weights),
                "train_extra": list(train_extra), "conceptprune": {"skill_ratio": mission.PRUNE_SKILL_RATIO,
                                                                   "tau": mission.PRUNE_TAU}}
    path = out / "matrix.json"
    report = read_json(path, "the study record", RESTORE) if path.is_file() else {}
    if report and report.get("settings") != settings:
        raise ValueError(f"{path} was made with other settings ({report.get('settings')}); use another --out")
    t0 = time.perf_counter()
    base = {c: score(generate(weights, None, c, sizes["numgen"], out / "baseline" / slug(c), assets), c, assets,
                     extra) for c in concepts}
    done = {(c["method"], c["target"]): c for c in report.get("cells", [])}
    report = {"settings": settings, "concepts": concepts, "methods": list(dict.fromkeys(
        [*report.get("methods", []), *methods])), "targets": list(dict.fromkeys([*report.get("targets", []),
                                                                                  *targets])),
              "base": base, "base_seconds": report.get("base_seconds", round(time.perf_counter() - t0, 1)),
              "cells": list(done.values())}
    for method in methods:
        for target in targets:
            if (method, target) in done:
                continue
            cell = run_cell(method, target, ctx, base)
            report["cells"].append(cell)
            order = {(m, t): i for i, (m, t) in enumerate((m, t) for m in report["methods"]
                                                          for t in report["targets"])}
            report["cells"].sort(key=lambda c: order[c["method"], c["target"]])
            path.write_text(json.dumps(report, indent=1) + "\n")
            (out / "matrix.md").write_text(markdown(report))
            print(f"{method} / {target}: {cell['seconds']}", flush=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    (out / "matrix.md").write_text(markdown(report))
    write_grid(report, out)
    print(markdown(report))
    return report


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/toyworld-matrix")
    p.add_argument("--assets", default=str(mission.ASSETS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--targets", nargs="+", default=None,
                   help=f"default: every texture and cat variant ({', '.join([*TEXTURES, *CAT_TARGETS])})")
    p.add_argument("--quick", action="store_true", help="mission.py's quick sizes (fewer anchor and eval images)")
    p.add_argument("--numgen", type=int, default=None, help="evaluation images per concept (default: 50, quick 10)")
    p.add_argument("--ckpt", default=None, help="another base checkpoint (default: the shipped toy model)")
    p.add_argument("--ffn_base", choices=("units", "dense"), default=None,
                   help="the base is the shipped model plus experiments.ffn's FFN delta of this variant "
                        "(it knows 'waves'), built into --out")
    p.add_argument("--extra_textures", nargs="*", default=None,
                   help="textures outside the shipped world (default: render.FFN_TEXTURES "
                        "with --ckpt; none otherwise)")
    args = p.parse_args(argv)
    if args.ckpt and args.ffn_base:
        p.error("--ckpt and --ffn_base name two base models; give one")
    ckpt = Path(args.ckpt) if args.ckpt else None
    extra = tuple(extra_textures_default(ckpt or args.ffn_base) if args.extra_textures is None
                  else args.extra_textures)
    targets = args.targets or [*TEXTURES, *extra, *CAT_TARGETS]
    return run(args.methods, targets, Path(args.out), Path(args.assets), args.quick, ckpt, extra,
               numgen=args.numgen, ffn_base=args.ffn_base)


if __name__ == "__main__":
    main()
