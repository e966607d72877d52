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

That layout is the benchmark's :class:`Layout`; a job that keeps its images elsewhere (``evaluation.protocol``:
evaluate.py's ``base-{concept}`` and ``{run}/eval/`` folders) passes its own in ``Plan.layout`` and runs on the
same generation, reading and scoring steps.
"""
from __future__ import annotations

import csv
import dataclasses
import gc
import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

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
    layout: Layout = field(default_factory=lambda: Layout())  # where the images live (the benchmark's folders)
    configs: dict = field(default_factory=dict)  # model name -> its own model config (default: model_config)
    base_rows: dict = field(default_factory=dict)  # suite -> the base model's rows where they differ from rows

    def config_of(self, spec) -> dict:
        return self.configs.get(spec.name, self.model_config)

    def rows_of(self, suite: str, spec) -> list[Row]:
        """The rows ``spec`` generates for ``suite``: the suite's rows, or the base's own where it has them."""
        if spec.kind == "base" and suite in self.base_rows:
            return self.base_rows[suite]
        return self.rows[suite]


# ---------------------------------------------------------------------------------------------------- settings
def sampling(settings: BenchmarkSettings) -> dict:
    """The sampler settings shared by every folder of a run, for its cache identity (``Sampling``'s rules)."""
    s = settings.sampling()
    return {"sampler": s.sampler, "steps": s.steps, "eta": s.eta, "precision": s.precision}


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
    if suite in safety_suites(plan.settings):  # checked images are other images: their own folder
        from scoring.safety import identity

        ident["safety_checker"] = identity(plan.settings.safety_checker)
    name = f"cfg{scale:g}-{h}x{w}-{_digest(ident)}"
    return plan.outdir / "images" / suite / spec.name / name, ident


class Layout:
    """Where a run keeps each model's images of a suite, what it writes beside them, where the per-image records
    go and how the summaries become a table; this one is the benchmark's (``images/{suite}/{model}/{key}/`` with
    ``cache.json``, each row drawn from its own seed; the files of the module docstring). A job with other
    folders and another table (evaluate.py's) subclasses it and passes it in ``Plan.layout``; generation, the
    stale-folder check, reading, scoring and records stay the runner's."""

    per_row_seeds = True  # False: the rows' seeds run seed, seed + 1, ... and the folder's plan records ``seed``
    flag = "--score_only"  # the flag that skips generation, named when an image is missing

    def folders(self, plan: Plan, suite: str, spec) -> list[tuple[Path, dict, list[int]]]:
        """``(folder, identity, row indices)`` of every generation folder of ``spec``'s images of ``suite``."""
        rows = plan.rows_of(suite, spec)
        out = []
        for group, idx in groups(rows, plan.settings).items():
            folder, ident = folder_for(plan, suite, spec, group, [rows[i] for i in idx])
            out.append((folder, ident, idx))
        return out

    def prepare(self, plan: Plan, suite: str, spec, folder: Path, ident: dict) -> None:
        """Before ``folder`` is generated (it exists): record what it holds."""
        from runtime.files import write_text_atomic

        write_text_atomic(folder / "cache.json", json.dumps(ident, indent=1, default=str) + "\n")

    def finish(self, plan: Plan, suite: str, spec, folder: Path, prompts: list[str]) -> None:
        """After every image of ``folder`` exists."""

    def desc(self, suite: str, spec) -> str:
        return f"{suite} {spec.name}"

    def stale(self, folder: Path) -> str:
        """Why a folder whose plan differs from the requested one is there, and what to do."""
        return f"the benchmark cache {folder} does not match its own key: delete the folder"

    def remedy(self, spec) -> str:
        """What to do about ``spec``'s folder made with other settings (:func:`check_folders`)."""
        return "delete it"

    def records(self, plan: Plan, suite: str, spec) -> Path | None:
        """The JSON-lines file of ``spec``'s per-image records of ``suite``; None: not written."""
        return plan.outdir / suite / "records" / f"{spec.name}.jsonl"

    def table(self, plan: Plan, results: dict[str, dict[str, dict]]):
        """Write the run's summaries ``{suite: {model: summary}}``: every suite's summary files and the results
        table. Returns what :func:`score` returns: here the summaries, JSON-safe (non-finite numbers -> None)."""
        results = _json_safe(results)
        for suite in plan.suites:
            write_suite(plan, suite, results[suite.name])
        write_results(plan.outdir)
        return results


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


def _folders(plan: Plan, spec):
    """``(suite, folder, identity, prompts, sampling, seeds)`` of every generation folder of ``spec``: the
    ``generate_images`` arguments of the folder, with the rows' own ``seeds``, or None where the layout records
    one seed (``sampling.seed``, image i seeded ``seed + i``)."""
    for suite in plan.suites:
        rows = plan.rows_of(suite.name, spec)
        for folder, ident, idx in plan.layout.folders(plan, suite.name, spec):
            how = plan.settings.sampling(scale=ident["scale"], height=ident["height"], width=ident["width"])
            seeds = [rows[i].seed for i in idx]
            if not plan.layout.per_row_seeds:
                how, seeds = dataclasses.replace(how, seed=_first_seed(seeds, folder)), None
            yield suite.name, folder, ident, [rows[i].prompt for i in idx], how, seeds


def check_folders(plan: Plan) -> None:
    """Refuse now, before any model is built, a generation folder whose ``plan.json`` records other settings than
    this run asks of it (not hours into the generation). Raises ValueError naming the folder, the differing keys
    and the layout's remedy; a folder without a readable plan is left to ``generate_images``' own checks."""
    from runtime.generate import PLAN_FILE, plan_dict, plan_diff

    for spec in plan.models:
        for suite, folder, ident, prompts, how, seeds in _folders(plan, spec):
            try:
                old = json.loads((folder / PLAN_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            diff = plan_diff(old, plan_dict(how, prompts, seeds))
            if diff:
                raise ValueError(f"{folder} was generated with other settings (differs in: {', '.join(diff)}); "
                                 f"{plan.layout.remedy(spec)}")


def generate(plan: Plan) -> None:
    from runtime.dist import local_devices
    from runtime.generate import GenerationPlanError, generate_images

    from .models import model_factory

    a = plan.settings
    layout = plan.layout
    shard = plan.extras.get("shard")
    for spec in plan.models:
        factory = OnceFactory(model_factory(spec, plan.config_of(spec), a.base))
        try:
            for suite, folder, ident, prompts, how, seeds in _folders(plan, spec):
                folder.mkdir(parents=True, exist_ok=True)
                layout.prepare(plan, suite, spec, folder, ident)
                try:
                    generate_images(factory, prompts, folder, how, seeds=seeds, devices=local_devices(plan.devices),
                                    desc=layout.desc(suite, spec), shard=shard)
                except GenerationPlanError as e:
                    raise GenerationPlanError(f"{e} ({layout.stale(folder)})") from e
                if suite in safety_suites(a) and (shard is None or shard[0] == 0):
                    apply_safety_checker(plan, folder)
                layout.finish(plan, suite, spec, folder, prompts)
        finally:
            factory.clear()


# the suites whose original scripts kept diffusers' safety checker on (artist_erasure.py, object_erase.py,
# gender_reversal.py, eval_coco.py load their pipelines with it); nudity_eval.py and inference_mem.py replace its
# forward by one that flags nothing
ORIGINAL_SAFETY_SUITES = ("artist", "objects", "gender", "coco")
SAFETY_SUITES = ("original", "all")
SAFETY_FILE = "safety_checker.json"


def safety_suites(settings) -> tuple[str, ...]:
    """The suites whose images go through ``--safety_checker`` (none without it)."""
    if not getattr(settings, "safety_checker", None):
        return ()
    return tuple(SUITES) if settings.safety_suites == "all" else ORIGINAL_SAFETY_SUITES


def apply_safety_checker(plan: Plan, folder: Path) -> list[int]:
    """Run the safety checker over a generated folder as the original pipelines did on their outputs: every image
    it flags becomes black (all zeros, as diffusers returns it). The flags are recorded in ``safety_checker.json``
    (image indices of the folder) before any image is blackened, so an interrupted pass resumes without checking
    a black image again. Returns the flagged indices."""
    from runtime.files import save_png_atomic, write_text_atomic

    record = folder / SAFETY_FILE
    images = folder_images(folder, flag=plan.layout.flag)
    try:
        flagged = json.loads(record.read_text(encoding="utf-8"))["flagged"]
    except (OSError, ValueError, KeyError, TypeError):
        checker = plan.preloaded.get("safety_checker") or _load_checker(plan)
        flagged = [i for i, f in enumerate(checker.flags(images)) if f]
        write_text_atomic(record, json.dumps({"safety_checker": plan.settings.safety_checker,
                                              "n_images": len(images), "flagged": flagged}, indent=1) + "\n")
    for i in flagged:
        from PIL import Image

        with Image.open(images[i]) as im:
            black = np.zeros((im.height, im.width, 3), dtype=np.uint8)
            done = not np.asarray(im.convert("RGB")).any()
        if not done:
            save_png_atomic(black, images[i])
    if flagged:
        print(f"{folder}: the safety checker flagged {len(flagged)} of {len(images)} images (now black)")
    return flagged


def _load_checker(plan: Plan):
    import torch

    from scoring.safety import load_safety_checker

    device = plan.settings.score_device or ("cuda" if torch.cuda.is_available() else "cpu")
    plan.preloaded["safety_checker"] = load_safety_checker(plan.settings.safety_checker, device)
    return plan.preloaded["safety_checker"]


def safety_flags(plan: Plan, suite: str, spec) -> list[bool] | None:
    """Per row of ``spec``'s images of ``suite``: flagged by the safety checker; None where it does not apply."""
    if suite not in safety_suites(plan.settings):
        return None
    out = [False] * len(plan.rows_of(suite, spec))
    for folder, _, idx in plan.layout.folders(plan, suite, spec):
        try:
            flagged = json.loads((folder / SAFETY_FILE).read_text(encoding="utf-8"))["flagged"]
        except (OSError, ValueError, KeyError, TypeError):
            raise FileNotFoundError(f"{folder / SAFETY_FILE} is missing or unreadable: its images were not "
                                    f"checked; run without {plan.layout.flag}") from None
        for j in flagged:
            out[idx[j]] = True
    return out


def _first_seed(seeds: list[int], folder: Path) -> int:
    """``seeds[0]`` of rows seeded ``seed + index`` (a layout without per-row seeds in its folders' plans)."""
    if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        raise ValueError(f"{folder}: its layout records one seed, but the rows' seeds do not run seed, seed + 1, ...")
    return seeds[0]


def images_of(plan: Plan, suite: str, spec) -> list[Path]:
    """Every row's image, in row order."""
    out: list[Path | None] = [None] * len(plan.rows_of(suite, spec))
    for folder, _, idx in plan.layout.folders(plan, suite, spec):
        for i, p in zip(idx, folder_images(folder, len(idx), plan.layout.flag)):
            out[i] = p
    return out  # type: ignore[return-value]


def folder_images(folder: Path, expected: int | None = None, flag: str = "--score_only") -> list[Path]:
    """The images listed in ``folder/images.txt`` (relative to the folder), all of which must exist and be complete.
    Raises FileNotFoundError (no listing, missing images) or ValueError (damaged images, another count), naming the
    folder and ``flag`` (the command's flag that skips generation)."""
    from runtime.files import image_is_complete, read_text_lines

    listing = folder / "images.txt"
    if not listing.is_file():
        raise FileNotFoundError(f"{listing} not found: generate first (run without {flag})")
    paths = [folder / line for line in read_text_lines(listing) if line.strip()]
    missing = [p for p in paths if not p.is_file()]
    if missing or not paths:
        raise FileNotFoundError(f"{folder}: {len(missing)} of {len(paths)} listed images missing"
                                + (f", e.g. {missing[0]}" if missing else ""))
    damaged = [p for p in paths if not image_is_complete(p)]
    if damaged:
        raise ValueError(f"{folder}: {len(damaged)} image(s) are truncated or not images, e.g. {damaged[0]}; "
                         f"delete them and run without {flag} to regenerate them")
    if expected is not None and len(paths) != expected:
        raise ValueError(f"{folder} holds {len(paths)} images, expected {expected} (made with other settings, e.g. "
                         f"another --numgen or --limit?)")
    return paths


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


def score(plan: Plan):
    """Score every model's images of every suite, write each one's records where the layout keeps them, and hand
    the summaries ``{suite: {model: summary}}`` to the layout's table writer (:meth:`Layout.table`); returns what
    it returns."""
    import torch

    from runtime.files import write_text_atomic

    device = plan.settings.score_device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = {}
    for suite in plan.suites:
        scorers = suite.load(plan.settings, device, plan.preloaded)
        cache: dict = {}
        base_images = images_of(plan, suite.name, plan.models[0])
        summaries = results[suite.name] = {}
        for spec in plan.models:
            ctx = Context(plan.settings, scorers, spec.name, spec.kind == "base", cache)
            images = base_images if ctx.is_base else images_of(plan, suite.name, spec)
            records, summaries[spec.name] = suite.score(ctx, plan.rows_of(suite.name, spec), images, base_images)
            flags = safety_flags(plan, suite.name, spec)
            if flags is not None:  # scored as the original scored them: black where flagged
                summaries[spec.name]["safety_checker"] = {"flagged": sum(flags), "images": len(flags)}
                for r, f in zip(records, flags):
                    r["safety_flagged"] = f
            path = plan.layout.records(plan, suite.name, spec)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(path, "".join(json.dumps(_json_safe(r), ensure_ascii=False) + "\n" for r in records))
        del scorers, cache
        gc.collect()
    return plan.layout.table(plan, results)


def _settings(plan: Plan) -> dict:
    a = plan.settings
    out = {**sampling(a), "scale": a.scale, "H": a.H, "W": a.W, "base": a.base,
           "models": {m.name: {"kind": m.kind, "path": m.path} for m in plan.models}}
    if safety_suites(a):
        out["safety_checker"] = {"folder": a.safety_checker, "suites": list(safety_suites(a))}
    return out


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
    arrows = {"lower": " ↓", "higher": " ↑"}
    lines = ["| model | " + " | ".join(f"{d['suite']}: {m['label']}" + arrows.get(m["better"], "")
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
