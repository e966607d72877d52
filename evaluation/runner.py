"""Run benchmark suites on several models: vet everything, generate every model's images from the same rows and
seeds (cached, resumable), score them, write records and summaries.

Layout under ``--outdir``::

    images/{suite}/{model}/{key}/            one generate_images folder per (model, suite, settings, rows)
                                             (samples/, images.txt, caption.txt, plan.json, cache.json)
    {suite}/records/{model}.jsonl            one JSON record per image: id, prompt, seed, image, scores
    {suite}/summary.json, summary.csv        every model's summary (the models of the latest run of the suite)
    {suite}/summary.png                      the suite's headline metrics per model
    results.md, results.json                 one table: rows the models, columns every suite's headline metrics

``key`` hashes the model's identity (kind, files, their sizes and mtimes), the sampling settings and the rows'
prompts and seeds, so changing any of them starts a new folder while an interrupted run resumes in its own: only
missing images are made (``runtime.generate``'s rules).
"""
from __future__ import annotations

import csv
import gc
import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .prompt_sets import Row
from .suites import SUITES, Context, Suite, headline

if TYPE_CHECKING:
    from .settings import BenchmarkSettings


@dataclass
class Plan:
    """What ``evaluation.benchmark.check`` found: the checked settings, the suites' rows, the models, the devices;
    ``preloaded``: scorers already loaded (the objects classifier), which the suites' ``load`` uses."""
    settings: BenchmarkSettings
    suites: list[Suite]
    rows: dict[str, list[Row]]  # suite -> rows
    models: list  # evaluation.models.ModelSpec, base first
    model_config: dict
    devices: tuple[str, ...]
    outdir: Path
    preloaded: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- settings
def sampling(settings: BenchmarkSettings) -> dict:
    s = settings
    return {"sampler": s.sampler, "steps": s.steps, "eta": s.eta if s.sampler == "ddim" else 0.0,
            "precision": s.precision}


def groups(rows: list[Row], settings: BenchmarkSettings) -> dict[tuple[float, int, int], list[int]]:
    """Row indices by (guidance, height, width): each group is one generation folder."""
    s = settings
    out: dict = {}
    for i, r in enumerate(rows):
        g = (float(s.scale if r.guidance is None else r.guidance), int(r.height or s.H), int(r.width or s.W))
        out.setdefault(g, []).append(i)
    return out


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def folder_for(plan: Plan, suite: str, spec, group: tuple, rows: list[Row]) -> tuple[Path, dict]:
    from .models import model_identity

    scale, h, w = group
    ident = {"model": model_identity(spec, plan.settings.base), "model_config": _digest(plan.model_config),
             "suite": suite, **sampling(plan.settings), "scale": scale, "height": h, "width": w,
             "rows": _digest([(r.prompt, r.seed) for r in rows])}
    name = f"cfg{scale:g}-{h}x{w}-{_digest(ident)}"
    return plan.outdir / "images" / suite / spec.name / name, ident


def _image_rows(plan: Plan, suite: str, spec) -> list[tuple[Path, dict, list[int]]]:
    rows = plan.rows[suite]
    out = []
    for group, idx in groups(rows, plan.settings).items():
        folder, ident = folder_for(plan, suite, spec, group, [rows[i] for i in idx])
        out.append((folder, ident, idx))
    return out


# ---------------------------------------------------------------------------------------------------- generation
class OnceFactory:
    """The model factory of one model for every suite of a run: built once per device in this process (an SD
    checkpoint takes tens of seconds to load), dropped by ``clear``; pickled without the model (workers)."""

    def __init__(self, factory):
        self.factory, self.models = factory, {}

    def __call__(self, device):
        key = str(device)
        if key not in self.models:
            self.models[key] = self.factory(device)
        return self.models[key]

    def clear(self):
        self.models.clear()
        gc.collect()

    def __getstate__(self):
        return {"factory": self.factory, "models": {}}


def generate(plan: Plan) -> None:
    from runtime.dist import local_devices
    from runtime.generate import GenerationPlanError, generate_images
    from runtime.files import write_text_atomic

    from .models import model_factory

    a = plan.settings
    shard = plan.extras.get("shard")
    for spec in plan.models:
        factory = OnceFactory(model_factory(spec, plan.model_config, a.base))
        try:
            for suite in plan.suites:
                rows = plan.rows[suite.name]
                for folder, ident, idx in _image_rows(plan, suite.name, spec):
                    folder.mkdir(parents=True, exist_ok=True)
                    write_text_atomic(folder / "cache.json", json.dumps(ident, indent=1, default=str) + "\n")
                    scale, h, w = ident["scale"], ident["height"], ident["width"]
                    try:
                        generate_images(factory, [rows[i].prompt for i in idx], folder,
                                        a.sampling(scale=scale, height=h, width=w), seeds=[rows[i].seed for i in idx],
                                        devices=local_devices(plan.devices), desc=f"{suite.name} {spec.name}",
                                        shard=shard)
                    except GenerationPlanError as e:
                        raise GenerationPlanError(f"{e} (the benchmark cache {folder} does not match its own "
                                                  f"key: delete the folder)") from e
        finally:
            factory.clear()


def images_of(plan: Plan, suite: str, spec) -> list[Path]:
    """Every row's image, in row order."""
    from runtime.files import image_is_complete, read_text_lines

    out: list[Path | None] = [None] * len(plan.rows[suite])
    for folder, _, idx in _image_rows(plan, suite, spec):
        listing = folder / "images.txt"
        if not listing.is_file():
            raise FileNotFoundError(f"{listing} not found: generate first (run without --score_only)")
        names = read_text_lines(listing)
        if len(names) != len(idx):
            raise ValueError(f"{folder} lists {len(names)} images, expected {len(idx)}")
        for i, name in zip(idx, names):
            p = folder / name
            if not image_is_complete(p):
                raise FileNotFoundError(f"{p} is missing or damaged: run without --score_only to remake it")
            out[i] = p
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------- scoring
def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy / torch scalars
        return _json_safe(x.item())
    return x


def score(plan: Plan) -> dict[str, dict[str, dict]]:
    """``{suite: {model: summary}}``; writes every suite's records and summary files."""
    import torch

    from runtime.files import write_text_atomic

    device = plan.settings.score_device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = {}
    for suite in plan.suites:
        scorers = suite.load(plan.settings, device, plan.preloaded)
        cache: dict = {}
        rows = plan.rows[suite.name]
        base_images = images_of(plan, suite.name, plan.models[0])
        summaries = {}
        for spec in plan.models:
            ctx = Context(plan.settings, scorers, spec.name, spec.kind == "base", cache)
            images = base_images if ctx.is_base else images_of(plan, suite.name, spec)
            records, summary = suite.score(ctx, rows, images, base_images)
            summaries[spec.name] = _json_safe(summary)
            lines = "".join(json.dumps(_json_safe(r), ensure_ascii=False) + "\n" for r in records)
            path = plan.outdir / suite.name / "records" / f"{spec.name}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, lines)
        del scorers
        gc.collect()
        write_suite(plan, suite, summaries)
        results[suite.name] = summaries
    write_results(plan.outdir)
    return results


def _settings(plan: Plan) -> dict:
    a = plan.settings
    return {**sampling(a), "scale": a.scale, "H": a.H, "W": a.W, "base": a.base,
            "models": {m.name: {"kind": m.kind, "path": m.path} for m in plan.models}}


def write_suite(plan: Plan, suite: Suite, summaries: dict) -> None:
    from runtime.files import write_text_atomic

    d = plan.outdir / suite.name
    d.mkdir(parents=True, exist_ok=True)
    doc = {"suite": suite.name, "description": suite.doc, "n_rows": len(plan.rows[suite.name]),
           "settings": _settings(plan), "metrics": [m.__dict__ for m in suite.metrics], "models": summaries}
    write_text_atomic(d / "summary.json", json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    write_text_atomic(d / "summary.csv", summary_csv(summaries))
    plot_suite(suite, summaries, d / "summary.png")


def _flat(summary: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in summary.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif not isinstance(v, list):
            out[prefix + k] = v
    return out


def summary_csv(summaries: dict) -> str:
    flats = {m: _flat(s) for m, s in summaries.items()}
    cols = list(dict.fromkeys(k for f in flats.values() for k in f))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", *cols])
    for m, f in flats.items():
        w.writerow([m, *("" if f.get(c) is None else f.get(c) for c in cols)])
    return buf.getvalue()


def plot_suite(suite: Suite, summaries: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = [m for m in suite.metrics if any(headline(s, m) is not None for s in summaries.values())]
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(3.2 * max(1, len(metrics)) + 1, 3.4), squeeze=False)
    models = list(summaries)
    for ax, m in zip(axes[0], metrics):
        vals = [headline(summaries[n], m) for n in models]
        x = np.arange(len(models))
        ax.bar(x, [np.nan if v is None else v for v in vals], color=[f"C{i}" for i in range(len(models))])
        ax.set_xticks(x, models, rotation=30, ha="right", fontsize="small")
        ax.set_title(m.label + (f" ({m.better} is better)" if m.better else ""), fontsize="small")
    fig.suptitle(suite.name)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def results_table(outdir: Path) -> tuple[str, dict]:
    """The markdown table over every suite found under ``outdir`` (its latest summary), and the same as JSON."""
    docs = []
    for name in SUITES:
        f = outdir / name / "summary.json"
        if f.is_file():
            docs.append(json.loads(f.read_text(encoding="utf-8")))
    models = list(dict.fromkeys(m for d in docs for m in d["models"]))
    cols = [(d, m) for d in docs for m in d["metrics"]]
    table = {model: {f"{d['suite']}: {m['label']}": (d["models"].get(model) or {}).get(m["key"]) for d, m in cols}
             for model in models}
    lines = ["| model | " + " | ".join(f"{d['suite']}: {m['label']}" + {"lower": " ↓", "higher": " ↑"}.get(m["better"], "")
                                       for d, m in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for model in models:
        lines.append(f"| {model} | " + " | ".join(_fmt(v) for v in table[model].values()) + " |")
    return "\n".join(lines) + "\n", table


def write_results(outdir: Path) -> Path:
    from runtime.files import write_text_atomic

    md, table = results_table(outdir)
    write_text_atomic(outdir / "results.md", md)
    write_text_atomic(outdir / "results.json", json.dumps(_json_safe(table), indent=1, ensure_ascii=False) + "\n")
    return outdir / "results.md"
