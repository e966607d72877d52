"""A wider toy UNet (issue 21, item 4): with two transformer blocks per attention level, do the textures live
in the FFNs, where ConceptPrune looks for them?

Train the variant with the shipped recipe, autoencoder and CLIP, then measure it::

    python -m toyworld.ldm --clip assets/toyworld/clip --vae_from assets/toyworld/ldm --transformer_depth 2 \\
        --out outputs/toyworld-wide/ldm --threads 1
    python -m experiments.wide --ldm outputs/toyworld-wide/ldm --out outputs/toyworld-wide/measure

Three measurements, all with the existing tools pointed at the wide UNet (``assets_view``):

* ``quality``: ``toyworld.quality.measure`` (the shipped model's quality table);
* ``zero``: every concept of ``experiments.matrix`` (50 images each, the matrix's prompts, seeds and sampler) from
  the model with every ``ff.net.2`` weight zeroed (all, then each transformer block's alone where there are
  two), and, as the control, every cross-attention value weight (``attn2.to_v``), judged like the matrix; the
  base images are the matrix's own;
* ``prune``: ``experiments.matrix`` with ConceptPrune (unchanged ``conceptprune.py``, the toy settings) on
  ``PRUNE_TARGETS``, the same paired images before and after.

``--ldm assets/toyworld/ldm --parts zero`` runs the zeroing on the shipped UNet, for the comparison.
Output: ``{out}/wide.json`` and ``{out}/wide.md`` (plus the tools' own folders).
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from experiments import matrix
from runtime.files import read_json
from toyworld import mission

RESTORE = "restore it (it holds the results of earlier runs), or use another --out"  # a damaged study record
ASSETS = mission.ASSETS
# name -> state-dict keys whose tensors are set to zero (weights only; biases stay, as ConceptPrune's masks). The
# per-block rows zero as many weights in the wide UNet as "ff.net.2" does in the shipped one; a row that matches
# nothing, or the same keys as an earlier row (one block per level), is skipped.
ZEROED = {"ff.net.2": r"\.ff\.net\.2\.weight$", "ff.net.2, first block": r"transformer_blocks\.0\.ff\.net\.2\.weight$",
          "ff.net.2, second block": r"transformer_blocks\.1\.ff\.net\.2\.weight$",
          "attn2.to_v": r"\.attn2\.to_v\.weight$"}
PRUNE_TARGETS = ("stripes", "checkerboard")
PARTS = ("quality", "zero", "prune")
GRID_CONCEPTS, GRID_IMAGES = ("stripes", "polka dots", "checkerboard"), 8


def assets_view(ldm_dir: Path, folder: Path, assets: Path = ASSETS) -> Path:
    """``assets`` with its ``ldm/`` replaced by ``ldm_dir``, as a folder of symlinks: the mission, matrix and
    quality tools read their model from ``{assets}/ldm/`` and everything else (judge, CLIP, prompts) beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    for src in sorted(assets.iterdir()):
        link = folder / src.name
        target = (Path(ldm_dir) if src.name == "ldm" else src).resolve()
        if link.is_symlink() and link.resolve() != target:
            link.unlink()
        if not link.is_symlink():
            link.symlink_to(target, target_is_directory=target.is_dir())
    return folder


def zero_delta(ckpt: Path, pattern: str, path: Path) -> dict:
    """A delta that sets every tensor of ``ckpt`` whose key matches ``pattern`` to zero; returns its size."""
    import torch

    from ldm.checkpoint import load_state_dict
    from runtime.delta import save_delta

    sd = {k: torch.zeros_like(v.float()) for k, v in load_state_dict(ckpt).items() if re.search(pattern, k)}
    if not sd:
        raise ValueError(f"no tensor of {ckpt} matches {pattern!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_delta(path, sd)
    return {"tensors": len(sd), "weights": sum(v.numel() for v in sd.values())}


def unet_size(ckpt: Path) -> dict:
    """Parameters of the UNet and of its ``ff.net.2`` weights."""
    from ldm.checkpoint import load_state_dict

    sd = {k: v for k, v in load_state_dict(ckpt).items() if k.startswith("model.diffusion_model.")}
    return {"unet": sum(v.numel() for v in sd.values()),
            "ff_net_2": sum(v.numel() for k, v in sd.items() if re.search(ZEROED["ff.net.2"], k))}


def zeroed(view: Path, out: Path, numgen: int) -> dict:
    """The judge's share per concept for the base model and for each ``ZEROED`` variant (same prompts, seeds)."""
    weights = mission.asset_paths(view)["weights"]
    concepts = matrix.world_concepts()
    report = {"concepts": concepts, "base": {}, "variants": {}}
    for c in concepts:  # the matrix's base folders: made once, reused by the prune part and by reruns
        folder = matrix.generate(weights, None, c, numgen, out / "matrix" / "baseline" / matrix.slug(c), view)
        report["base"][c] = matrix.judge_share(folder, c, view)
    from ldm.checkpoint import load_state_dict

    names = list(load_state_dict(weights))
    seen = []
    for name, pattern in ZEROED.items():
        keys = sorted(k for k in names if re.search(pattern, k))
        if not keys or keys in seen:
            continue
        seen.append(keys)
        t0 = time.perf_counter()
        delta = out / "zero" / f"{matrix.slug(name)}.safetensors"
        entry = {"zeroed": zero_delta(weights, pattern, delta), "shares": {}}
        for c in concepts:
            folder = matrix.generate(weights, delta, c, numgen, out / "zero" / matrix.slug(name) / matrix.slug(c),
                                     view)
            entry["shares"][c] = matrix.judge_share(folder, c, view)
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        report["variants"][name] = entry
    write_grid(out, report)
    return report


def write_grid(out: Path, report: dict) -> Path:
    """``{out}/zero/grid.png``: per texture, the first images of the base model, then of each zeroed one."""
    pick = lambda folder: sorted((folder / "samples").glob("*.png"))[:GRID_IMAGES]  # noqa: E731
    rows = []
    for c in GRID_CONCEPTS:
        rows.append((f"{c}: base", pick(out / "matrix" / "baseline" / matrix.slug(c))))
        rows += [(f"{name} = 0", pick(out / "zero" / matrix.slug(name) / matrix.slug(c)))
                 for name in report["variants"]]
    return mission.image_grid(rows, out / "zero" / "grid.png", scale=2)


def markdown(report: dict) -> str:
    out = [f"UNet: {report['ldm']} ({report['size']['unet'] / 1e6:.2f} M parameters, "
           f"{report['size']['ff_net_2'] / 1e3:.0f} k of them in ff.net.2); "
           f"{report['numgen']} images per concept.", ""]
    if "quality" in report:
        d = report["quality"]["diffusion"]
        m = report["quality"]["memorization"]
        s = report["quality"]["colour_by_seed"]
        out += ["| colour | shape | style | plain fill | cat variant | all three | memorized copy | "
                "seeds: right colour / colours per seed (mean removed) |", "|---|---|---|---|---|---|---|---|",
                f"| {d['colour']:.2f} | {d['shape']:.2f} | {d['style']:.2f} | {d['plain_fill']:.2f} | "
                f"{d['cat_variant']:.2f} | {d['all']:.2f} | {m['copy_rate_memorized_caption']:.2f} | "
                f"{s['start_noise']['accuracy']:.2f} / {s['start_noise']['distinct_per_seed']:.1f} "
                f"({s['zero_mean_start_noise']['accuracy']:.2f} / "
                f"{s['zero_mean_start_noise']['distinct_per_seed']:.1f}) |", ""]
    if "zero" in report:
        z = report["zero"]
        cs = z["concepts"]
        out += ["Judge: share of images that show the concept (an anchor: everything its prompt asks for).", "",
                "| model | " + " | ".join(cs) + " |", "|---|" + "---|" * len(cs),
                "| base | " + " | ".join(f"{z['base'][c]:.2f}" for c in cs) + " |"]
        for name, v in z["variants"].items():
            out.append(f"| {name} weights zeroed ({v['zeroed']['weights'] / 1e3:.0f} k) | " +
                       " | ".join(f"{v['shares'][c]:.2f}" for c in cs) + " |")
        out.append("")
    if "prune" in report:
        fractions = ", ".join(f"{c['target']} {c['pruned_fraction']:.3f}" for c in report["prune"]["cells"])
        out += [f"ConceptPrune (toy settings; pruned share of the ff.net.2 weights: {fractions}):", "",
                matrix.markdown(report["prune"])]
    return "\n".join(out) + "\n"


def run(ldm_dir: Path, out: Path, parts=PARTS, numgen: int = 50, targets=PRUNE_TARGETS) -> dict:
    from toyworld import quality

    out.mkdir(parents=True, exist_ok=True)
    view = assets_view(ldm_dir, out / "assets")
    path = out / "wide.json"
    report = read_json(path, "the study record", RESTORE) if path.is_file() else {}
    weights = mission.asset_paths(view)["weights"]
    report.update({"ldm": matrix.shown_path(ldm_dir), "numgen": numgen, "size": unet_size(weights)})
    report.setdefault("seconds", {})
    for part in parts:
        t0 = time.perf_counter()
        if part == "quality":
            report["quality"] = quality.measure(view, out / "quality")
        elif part == "zero":
            report["zero"] = zeroed(view, out, numgen)
        elif part == "prune":
            report["prune"] = matrix.run(["conceptprune"], list(targets), out / "matrix", assets=view, numgen=numgen)
            for cell in report["prune"]["cells"]:
                cell["pruned_fraction"] = mission.pruned_fraction(cell["delta"])
        report["seconds"][part] = round(time.perf_counter() - t0, 1)
        path.write_text(json.dumps(report, indent=1) + "\n")
        (out / "wide.md").write_text(markdown(report))
    print(markdown(report))
    return report


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ldm", default="outputs/toyworld-wide/ldm",
                   help="folder with ldm.yaml + toyworld-ldm.safetensors")
    p.add_argument("--out", default="outputs/toyworld-wide/measure")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--numgen", type=int, default=50, help="images per concept (zero and prune parts)")
    p.add_argument("--targets", nargs="+", default=list(PRUNE_TARGETS), help="ConceptPrune targets")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return run(Path(args.ldm), Path(args.out), args.parts, args.numgen, args.targets)


if __name__ == "__main__":
    main()
