"""Run benchmark suites on several models: vet everything, generate every model's images from the same rows and
seeds (cached, resumable), score them, write records and summaries.

Layout under ``--outdir``::

    images/{suite}/{model}/{key}/            one generate_images folder per (model, suite, settings, rows)
                                             (samples/, images.txt, caption.txt, plan.json, cache.json)
    {suite}/records/{model}.jsonl            one JSON record per image: id, prompt, seed, image, scores
    {suite}/summaries/{model}.json           the model's summary and the settings and rows it was scored on
    {suite}/summary.json, summary.csv        every model's summary: each model with records, whichever run made them
    {suite}/summary.png                      the suite's headline metrics per model
    results.md, results.json                 one table: rows the models, columns every suite's headline metrics;
                                             below it (results.json: key "(provenance)") each suite's preset or
                                             settings, prompt files' sha256 and the scorers' package versions
    .lock                                    the run using the folder (host, pid, command, start); refuses a second

A suite's summary files and the table are rebuilt after every run from every model that has records (and its
summary beside them), not from the models of the latest run alone: models scored by separate runs all stay, and
deleting ``{suite}/records/{model}.jsonl`` drops a model. A model scored on other rows or sampling settings than
the others of its suite is marked in ``results.md`` and named in a warning. An unreadable ``summary.json`` is
rebuilt from ``summaries/`` (a warning, before the run's work).

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
import sys
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
    out = {"sampler": s.sampler, "steps": s.steps, "eta": s.eta, "precision": s.precision}
    # only when not Sampling's default: the keys (folders) of runs that set neither stay what they were
    out.update({k: getattr(s, k) for k, default in (("noise", "ours"), ("pixels", "truncate"))
                if getattr(s, k) != default})
    return out


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

    def check_folder(self, plan: Plan, spec, folder: Path) -> None:
        """Before any work (:func:`check_folders`): refuse ``spec``'s ``folder`` when a record this layout keeps
        beside its images says it cannot be reused. The benchmark keeps none that it reads (``cache.json`` is
        written for people: the folder's name is its key)."""

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

    def save_summary(self, plan: Plan, suite: str, spec, summary: dict) -> None:
        """Keep ``spec``'s summary of ``suite`` beside its records (right after them): the table is rebuilt from
        these files, so a model scored by an earlier or another run is never dropped."""
        from runtime.files import write_text_atomic

        doc = {"suite": suite, "model": spec.name, **source_of(plan, suite, spec), "summary": _json_safe(summary)}
        path = summary_file(plan.outdir, suite, spec.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")

    def table(self, plan: Plan, results: dict[str, dict[str, dict]]):
        """Write every suite's summary files and the results table, rebuilt from every model with records (this
        run's ``results`` ``{suite: {model: summary}}`` and earlier runs'). Returns what :func:`score` returns:
        here this run's summaries, JSON-safe (non-finite numbers -> None)."""
        results = _json_safe(results)
        for suite in plan.suites:
            write_suite(plan, suite)
        write_results(plan.outdir, plan)
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
    this run asks of it (not hours into the generation), or whose records are damaged. Raises ValueError naming
    the folder, the differing keys and the layout's remedy, or ``runtime.files.DamagedFileError`` (a damaged
    ``plan.json``, or a record the layout keeps beside it: :meth:`Layout.check_folder`)."""
    from runtime.files import read_json
    from runtime.generate import PLAN_FILE, plan_dict, plan_diff

    for spec in plan.models:
        for suite, folder, ident, prompts, how, seeds in _folders(plan, spec):
            plan.layout.check_folder(plan, spec, folder)
            if not (folder / PLAN_FILE).exists():
                continue
            old = read_json(folder / PLAN_FILE, "the generation plan",
                            f"its folder {folder} cannot be resumed: {plan.layout.remedy(spec)}")
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
                                    desc=layout.desc(suite, spec), shard=shard, model=_label(spec, a.base))
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


def _label(spec, base: str) -> str:
    """The model as its flag names it, for errors (``--base PATH``, ``--unet NAME=PATH``)."""
    from .models import FLAGS

    return f"{FLAGS['base']} {base}" if spec.kind == "base" else spec.label


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
            plan.layout.save_summary(plan, suite.name, spec, summaries[spec.name])
        del scorers, cache
        gc.collect()
    return plan.layout.table(plan, results)


def _settings(plan: Plan) -> dict:
    a = plan.settings
    out = {**sampling(a), "scale": a.scale, "H": a.H, "W": a.W, "base": a.base,
           "clip_precision": a.clip_precision, **({"artist_jpeg": True} if a.artist_jpeg else {}),
           "models": {m.name: {"kind": m.kind, "path": m.path} for m in plan.models}}
    if safety_suites(a):
        out["safety_checker"] = {"folder": a.safety_checker, "suites": list(safety_suites(a))}
    return out


# ---------------------------------------------------------------------------------------------------- summaries
# what makes models comparable
COMPARED = ("rows", "sampler", "steps", "eta", "precision", "scale", "H", "W", "base", "safety_checker")


def summary_file(outdir: Path, suite: str, model: str) -> Path:
    return outdir / suite / "summaries" / f"{model}.json"


def source_of(plan: Plan, suite: str, spec) -> dict:
    """How ``spec``'s summary of ``suite`` was made: its files, the rows (a digest of prompts and seeds) and the
    sampling settings (:data:`COMPARED`), to tell models scored on other rows or settings apart."""
    a = plan.settings
    rows = plan.rows_of(suite, spec)
    from .presets import provenance

    checked = {"safety_checker": a.safety_checker} if suite in safety_suites(a) else {}  # black where flagged
    return {"kind": spec.kind, "path": spec.path, "n_rows": len(rows),
            "settings": {"rows": _digest([(r.prompt, r.seed, r.guidance, r.height, r.width) for r in rows]),
                         **sampling(a), "scale": a.scale, "H": a.H, "W": a.W, "base": a.base, **checked},
            "provenance": provenance(a)}


_WARNED: set[str] = set()


def _warn(message: str) -> None:
    """One ``warning:`` line on stderr, once per process (the checks and the final table see the same files)."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"warning: {message}", file=sys.stderr)


def _read_json(path: Path) -> tuple[dict | None, str | None]:
    """``(document, None)``, or ``(None, why not)`` for a missing, unreadable or non-object JSON file."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "missing"
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, f"unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return (doc, None) if isinstance(doc, dict) else (None, "not a JSON object")


def collect_suite(outdir: Path, name: str, order=()) -> dict | None:
    """The summary document of suite ``name`` rebuilt from ``{outdir}/{name}/``: one entry per model with records
    (``records/{model}.jsonl``), its summary from ``summaries/{model}.json`` (or, for folders written before those
    files existed, the old ``summary.json``). None when no model has records. ``order``: model names listed first
    (this run's). A model whose summary cannot be read is left out with a warning; models scored on other rows or
    settings than the first listed are named in ``doc["not_comparable"]`` and a warning."""
    d = outdir / name
    found = sorted(p.stem for p in (d / "records").glob("*.jsonl"))
    models = [m for m in order if m in found] + [m for m in found if m not in order]
    if not models:
        return None
    legacy = None
    summaries, sources = {}, {}
    for m in models:
        doc, why = _read_json(summary_file(outdir, name, m))
        if doc is not None and isinstance(doc.get("summary"), dict):
            summaries[m] = doc["summary"]
            sources[m] = {k: doc.get(k) for k in ("kind", "path", "n_rows", "settings", "provenance")}
            continue
        if why == "missing":  # a folder of an older version: its summary.json holds the summaries
            legacy = legacy if legacy is not None else (_read_json(d / "summary.json")[0] or {})
            old = legacy.get("models")
            if isinstance(old, dict) and isinstance(old.get(m), dict):
                summaries[m], sources[m] = old[m], {"n_rows": legacy.get("n_rows"), "settings": None}
                continue
        _warn(f"{name}: {d / 'records' / (m + '.jsonl')} has no readable summary ({summary_file(outdir, name, m)}: "
              f"{why or 'no summary in it'}); left out of the table: rerun that model with --score_only to rebuild it")
    if not summaries:
        return None
    known = [m for m in summaries if sources[m].get("settings")]
    ref = sources[known[0]]["settings"] if known else {}
    odd = [m for m in known if any(sources[m]["settings"].get(k) != ref.get(k) for k in COMPARED)]
    for m in odd:
        diff = [k for k in COMPARED if sources[m]["settings"].get(k) != ref.get(k)]
        _warn(f"{name}: {m} was scored on other rows or settings than {known[0]} (differs in: {', '.join(diff)}); "
              f"its numbers are not comparable: rerun it with these settings, or delete "
              f"{d / 'records' / (m + '.jsonl')} to drop it")
    suite = SUITES.get(name)
    first = sources[next(iter(summaries))]
    # optional metrics (e.g. coco's FID against real images) only where some model has them
    metrics = [m for m in suite.metrics if not m.optional or any(m.key in (v or {}) for v in summaries.values())
               ] if suite else []
    doc = {"suite": name, "description": suite.doc if suite else "", "n_rows": first.get("n_rows"),
           "settings": first.get("settings"), "metrics": [m.__dict__ for m in metrics],
           "models": summaries, "sources": sources, "not_comparable": odd}
    if first.get("provenance"):
        doc["provenance"] = first["provenance"]
    return doc


def write_suite(plan: Plan, suite: Suite) -> None:
    """``{suite}/summary.json``, ``summary.csv`` and ``summary.png`` over every model with records (this run's first,
    with this run's settings in ``settings``)."""
    doc = collect_suite(plan.outdir, suite.name, [m.name for m in plan.models])
    if doc is None:
        return
    from .presets import provenance

    doc.update(n_rows=len(plan.rows[suite.name]), settings=_settings(plan), provenance=provenance(plan.settings))
    _write_suite_doc(plan.outdir / suite.name, suite, doc)


def _write_suite_doc(d: Path, suite: Suite, doc: dict) -> None:
    from runtime.files import save_figure_atomic, write_text_atomic

    write_text_atomic(d / "summary.json", json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    write_text_atomic(d / "summary.csv", summary_csv(doc["models"]))
    fig = plot_suite(suite, doc["models"])  # selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt

    try:
        save_figure_atomic(fig, d / "summary.png", dpi=100)
    finally:
        plt.close(fig)


def check_table_inputs(outdir: Path) -> None:
    """Before the run's work: what the final table reads from ``outdir`` (every suite's records and summaries)
    is readable, or a warning says what will be rebuilt or left out. Never raises for damaged outputs."""
    for name in SUITES:
        d = outdir / name
        if not (d / "summary.json").exists() and not (d / "records").is_dir():
            continue
        doc = collect_suite(outdir, name)
        _, why = _read_json(d / "summary.json")
        if why and why != "missing":
            _warn(f"{d / 'summary.json'} is {why}: " + ("it will be rebuilt from its models' summaries" if doc else
                                                         "the table leaves that suite out"))


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


def plot_suite(suite: Suite, summaries: dict):
    """The suite's headline metrics per model, as a matplotlib figure (the caller saves and closes it)."""
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
    return fig


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def results_table(outdir: Path, plan: Plan | None = None) -> tuple[str, dict]:
    """The markdown table over every suite found under ``outdir`` (every model with records; :func:`collect_suite`),
    and the same as JSON. A suite whose ``summary.json`` is unreadable is rebuilt (it has models) with a warning.
    ``plan``: the run that asks (its models come first)."""
    order = [m.name for m in plan.models] if plan else []
    docs = []
    for name, suite in SUITES.items():
        doc = collect_suite(outdir, name, order)
        if doc is None:
            continue
        docs.append(doc)
        if _read_json(outdir / name / "summary.json")[1]:  # damaged or gone: rebuild it from the models' files
            _warn(f"{outdir / name / 'summary.json'} was unreadable or missing: rebuilt from its models' summaries")
            _write_suite_doc(outdir / name, suite, doc)
    return markdown_table(docs)


def markdown_table(docs: list[dict]) -> tuple[str, dict]:
    """The results table of summary documents (``summary.json``: ``suite``, ``metrics`` with ``key``/``label``/
    ``better``, ``models`` -> flat summaries, optional ``not_comparable``) as markdown and as JSON: rows the models,
    columns every document's metrics. Shared with jobs that write their own documents (the attack job)."""
    models = list(dict.fromkeys(m for d in docs for m in d["models"]))
    odd = {m for d in docs for m in d.get("not_comparable", ())}
    cols = [(d, m) for d in docs for m in d["metrics"]]
    table = {model: {f"{d['suite']}: {m['label']}": (d["models"].get(model) or {}).get(m["key"]) for d, m in cols}
             for model in models}
    arrows = {"lower": " ↓", "higher": " ↑"}
    lines = ["| model | " + " | ".join(f"{d['suite']}: {m['label']}" + arrows.get(m["better"], "")
                                       for d, m in cols) + " |",
             "|---|" + "---|" * len(cols)]
    mark = {m: " \\*" if m in odd else "" for m in models}  # markdown's escaped asterisk: a footnote mark
    for model in models:
        lines.append(f"| {model}{mark[model]} | "
                     + " | ".join(_fmt(v) for v in table[model].values()) + " |")
    if odd:
        lines += ["", "\\* scored on other rows or settings than the other models of a suite (see the suite's "
                      "summary.json: not_comparable, sources)"]
    made = [d for d in docs if "provenance" in d]
    if made:
        lines.append("")
    for d in made:  # how each suite's numbers were made (summary.json has the full settings)
        lines.append(f"- {d['suite']}: {_made_by(d)}")
    if made:
        # "(provenance)" cannot clash with a model: model names are letters, digits and . _ + - only
        # strings only ("none": no preset; packages not installed left out): the numbers of the table stay its only
        # numeric leaves
        table["(provenance)"] = {d["suite"]: {"preset": (d.get("provenance") or {}).get("preset") or "none",
                                             "made_by": _made_by(d),
                                             "versions": {k: v for k, v in ((d.get("provenance") or {})
                                                                            .get("versions") or {}).items() if v}}
                                 for d in made}
    return "\n".join(lines) + "\n", table


def _made_by(doc: dict) -> str:
    """One line: the preset (or the settings that define the protocol) and the scorers' package versions."""
    prov, st = doc.get("provenance") or {}, doc.get("settings") or {}
    how = (f"preset {prov['preset']}" if prov.get("preset") else
           "no preset: " + ", ".join(f"{k}={st[k]}" for k in ("sampler", "steps", "scale", "H", "W") if k in st))
    threshold = next((m.get("threshold") for m in (doc.get("models") or {}).values() if isinstance(m, dict)
                      and m.get("threshold") is not None), None)
    if threshold is not None:
        how += f", NudeNet threshold {threshold}"
    files = ", ".join(f"{v['path']} sha256 {v['sha256'][:12]}" for v in (prov.get("prompt_files") or {}).values())
    vers = ", ".join(f"{k} {v}" for k, v in (prov.get("versions") or {}).items() if v)
    return how + (f"; {files}" if files else "") + (f"; {vers}" if vers else "")


def write_results(outdir: Path, plan: Plan | None = None) -> Path:
    from runtime.files import write_text_atomic

    md, table = results_table(outdir, plan)
    write_text_atomic(outdir / "results.md", md)
    write_text_atomic(outdir / "results.json", json.dumps(_json_safe(table), indent=1, ensure_ascii=False) + "\n")
    return outdir / "results.md"
