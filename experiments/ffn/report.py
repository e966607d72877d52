"""The tables and the image grid of the waves runs and of the sweep (``experiments.ffn``)."""
from __future__ import annotations

import json
from pathlib import Path

from toyworld import mission
from toyworld.mission import REPO
from toyworld.render import ANCHOR_STYLE

from .data import TEXTURE


def report_json(report: dict) -> str:
    """``report`` as JSON, with paths inside the repository written relative to it."""
    return json.dumps(report, indent=2).replace(str(REPO) + "/", "") + "\n"


def _pair(p) -> str:
    return f"{p[0]:.2f} → {p[1]:.2f}"


ROLES = {TEXTURE: "target", ANCHOR_STYLE: "anchor"}


def markdown(report: dict) -> str:
    """The study's table (docs/experiments/ffn-waves.md): the judge's share of images showing each concept, per
    model (in brackets, for the shipped textures: the shipped judge alone, without the waves detector)."""
    runs = report["runs"]
    cols = [("teach", "shipped → base + waves (FFN fine-tune)"),
            ("conceptprune", "ConceptPrune: base + waves → pruned"),
            ("ablation", "Concept Ablation: base + waves → ablated")]
    cols = [(k, t) for k, t in cols if k in runs]
    lines = ["| concept | " + " | ".join(t for _, t in cols) + " |", "|---|" + "---|" * len(cols)]
    for c in runs[cols[0][0]]["concepts"]:
        role = ROLES.get(c, "hard negative")
        cells = []
        for k, _ in cols:
            v = runs[k]["concepts"][c]
            cell = _pair((v["base"]["shown"], v["edited"]["shown"]))
            if "judge_alone" in v["base"]:
                cell += f" ({_pair((v['base']['judge_alone'], v['edited']['judge_alone']))})"
            cells.append(cell)
        lines.append(f"| {c} ({role}) | " + " | ".join(cells) + " |")
    kid = [f"{k}: " + ", ".join(f"{c} {v['kid']:.3f}" for c, v in runs[k]["concepts"].items() if v["kid"] is not None)
           for k, _ in cols]
    notes = [f"Pruned: {report['pruned_fraction']:.3f} of the ff.net.2 weights "
             f"(skill_ratio {report['skill_ratio']:g}, "
             f"tau {report['tau']})." if "pruned_fraction" in report else "",
             "KID (judge features) of each edited model against its base: " + "; ".join(kid) + "."]
    return "\n".join(lines) + "\n\n" + "\n".join(n for n in notes if n) + "\n"


def write_grid(report: dict, path: Path, concepts=(TEXTURE, "polka dots"), n: int = 8, scale: int = 2) -> Path:
    """The image grid of a ``run`` report: per concept, rows shipped / base + waves / pruned / ablated, ``n``
    images spread over its evaluation folder (every colour), the same prompts and seeds in each row."""
    runs, rows = report["runs"], []
    first = runs[next(iter(runs))]["concepts"]

    def pick(folder):
        paths = sorted((Path(folder) / "samples").glob("*.png"))
        return [paths[i * len(paths) // n] for i in range(n)]

    for c in concepts:
        if "teach" in runs:
            rows.append((f"shipped: {c}", pick(runs["teach"]["concepts"][c]["folders"][0])))
        rows.append((f"base+waves: {c}", pick(first[c]["folders"][1 if "teach" in runs else 0])))
        for k, label in (("conceptprune", "pruned"), ("ablation", "ablated")):
            if k in runs:
                rows.append((f"{label}: {c}", pick(runs[k]["concepts"][c]["folders"][1])))
    return mission.image_grid(rows, Path(path), scale=scale)


def sweep_markdown(report: dict) -> str:
    """One row per (texture, skill_ratio, tau): target shown, erased share (1 - shown / base shown), the other
    concepts' mean shown share, kept share (mean of shown / base shown, capped at 1 each), pruned fraction, and
    for waves on the units delta ``taught_share``."""
    lines = ["| target | skill_ratio | tau | pruned ff.net.2 weights | target shown | erased share | "
             "others shown (mean; worst) | kept share | pruned weights in the taught units | taught weights pruned |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in report["rows"]:
        key, shown = r["texture"], r["shown"]
        t = key.partition("-")[0]
        others = {c: v for c, v in shown.items() if c != t}
        if r["skill_ratio"] is None:
            base[key] = shown
            lines.append(f"| {key} | base | – | 0 | {shown[t]:.2f} | – | {sum(others.values()) / len(others):.2f}; "
                         f"{min(others, key=others.get)} {min(others.values()):.2f} | – | – | – |")
            continue
        b = base[key]
        erased = 1 - shown[t] / b[t] if b[t] else float("nan")
        kept = sum(min(1.0, v / b[c]) if b[c] else 1.0 for c, v in others.items()) / len(others)
        worst = min(others, key=others.get)
        lines.append(f"| {key} | {r['skill_ratio']:g} | {r['tau']} | {r['pruned_fraction']:.3f} | {shown[t]:.2f} | "
                     f"{erased:.2f} | {sum(others.values()) / len(others):.2f}; {worst} {others[worst]:.2f} | "
                     f"{kept:.2f} | " + (f"{r['in_units']:.2f} | {r['units_pruned']:.2f} |" if "in_units" in r
                                         else "– | – |"))
    return "\n".join(lines) + "\n"
