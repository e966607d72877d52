"""Issue 31's proof on the toy world: every attack on the base model and on our erasures of stripes, grumpy cat and
the FFN concept waves, one table of pre- and post-attack ASR.

=============  ==========================================  ===========================================================
concept        base (the sanity row: attacks must win)     erasures (``toyworld.mission``'s public functions)
=============  ==========================================  ===========================================================
stripes        the shipped toy model                       ``ca``: recipe style, ``ca-preserve``: style-preserve,
                                                           ``cp``: ConceptPrune (``PRUNE["style"]``)
grumpy cat     the shipped toy model                       ``ca``: instance, ``ca-preserve``: instance-preserve,
                                                           ``cp``: ConceptPrune (``PRUNE["instance"]``)
waves          base + ``assets/toyworld/ffn/ffn_delta``    ``ca``: the style recipe on waves (as experiments.ffn),
               (``experiments.ffn.teach.build_checkpoint``) ``ca-preserve``: that without --regularization, with
                                                           waves-free world captions kept, ``cp``: experiments.ffn's
                                                           ConceptPrune on waves
=============  ==========================================  ===========================================================

The erasures are made once and cached under ``{out}/erasures/`` (``erasures.json`` names each finished delta, so a
rerun reuses it); then the attack job (``attacks.job``, through ``experiments.toy_attacks.settings_for``) attacks
every model x attack x concept, the base first. The job keeps one record per attacked prompt, so a rerun of the
same command attacks only the prompts still missing, and a larger ``--limit`` adds prompts to the cells made
(concept inversion redoes its cells: its token is trained on all the target images, which a larger limit adds to).

The attacks' budgets are the study's (``BUDGETS``), far below the originals' (``ORIGINAL_BUDGETS``), which take
tens of minutes per prompt on the toy world on a CPU; the attacks' own defaults are unchanged. ``CONCEPT_SETTINGS``
sets what the originals set per concept kind (UnlearnDiffAtk's k = 3 for objects and styles; inversion's object
templates for the cat). ::

    python -m experiments.attack_study --out outputs/attack-study                          # everything
    python -m experiments.attack_study --concepts stripes --erasures --limit 10            # the sanity row only
    python -m experiments.attack_study --concepts stripes --erasures cp --limit 10 --publish
    python -m experiments.attack_study --limit 24 --seed 0 1000     # every prompt again from other noise, pooled
    python -m experiments.attack_study --limit 24 --seed 0 1000 --report   # the table so far (while it runs)

Output: the job's layout under ``{out}/attacks/`` and ``{out}/study.{md,json}``: per concept and model, each
attack's ASR +- standard error (n) and seconds per prompt. ``--publish`` copies them to
``assets/toyworld/attacks/`` and puts the table into docs/experiments/toy-attacks.md (between its markers).
"""  # noqa: E501 (--help text, kept as printed)
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from toyworld.captions import MEDIA, STYLE_PHRASES
from toyworld.mission import ASSETS, PRESERVE_OVERRIDES, PRUNE, RECIPES, SIZES

CONCEPTS = ("stripes", "grumpy cat", "waves")
ERASURES = ("ca", "ca-preserve", "cp")
ATTACKS = ("none", "ring_a_bell", "inversion", "unlearndiff", "p4d-n", "p4d-k")
# The originals' budgets (each attack's Settings defaults) and the study's, as --set ATTACK.FIELD=VALUE. Measured
# per prompt on the toy world: docs/experiments/toy-attacks.md.
ORIGINAL_BUDGETS = {
    "ring_a_bell": {"population": 200, "generations": 3000},
    "inversion": {"steps": 5000, "batch_size": 4, "grad_accum": 4},
    "unlearndiff": {"n_timesteps": 50, "iterations": 40},
    "p4d-n": {"iterations": 3000, "eval_step": 50},
    "p4d-k": {"iterations": 3000, "eval_step": 50},
}
BUDGETS = {
    "ring_a_bell": {"population": 200, "generations": 100},
    "inversion": {"steps": 1500, "batch_size": 4, "grad_accum": 1},
    "unlearndiff": {"n_timesteps": 10, "iterations": 10},
    "p4d-n": {"iterations": 200, "eval_step": 50},
    "p4d-k": {"iterations": 200, "eval_step": 50},
}
# What the originals set per concept kind (UnlearnDiffAtk's configs: k 3 for objects and styles; the inversion's
# learnable_property object for an object), "{concept}" filled in.
CONCEPT_SETTINGS = {
    "stripes": {"unlearndiff": {"k": 3}, "inversion": {"learnable_property": "style"}},
    "grumpy cat": {"unlearndiff": {"k": 3}, "inversion": {"learnable_property": "object"}},
    "waves": {"unlearndiff": {"k": 3}, "inversion": {"learnable_property": "style"}},
}
# ``--inversion_templates world``: the inversion's caption templates in the toy world's own grammar
# (toyworld.captions) instead of the original's ImageNet sentences, which the toy text encoder never saw: every
# phrase the captions use to name a style (STYLE_PHRASES, and the style fragments of STYLE_TEMPLATES), and the
# object phrase after each medium and lead-in of TEMPLATES. The same lists for every concept of a kind.
WORLD_TEMPLATES = {
    "style": (*(p.format(t="{}") for p in STYLE_PHRASES), "a painting in the style of {}",
              "an artwork in the style of {}", "{} style", "in {} style"),
    "object": (*(f"{m} a {{}}" for m in MEDIA), "there is a {}", "here we see a {}", "an image showing a {}",
               "a scene with a {}", "a photo depicts a {}", "a simple illustration of a {}", "a {}"),
}
WAVES = "waves"
MISSION_RECIPES = {"stripes": ("style", "style-preserve", "style"), "grumpy cat": ("instance", "instance-preserve",
                                                                                   "instance")}


@dataclass(frozen=True)
class Erasure:
    """One erased model of a concept: ``name`` (the job's model name), ``method`` (ablation / conceptprune),
    ``recipe`` (train.py's recipe dict: ``toyworld.mission.RECIPES``; for conceptprune the ``PRUNE`` entry) and
    ``run_name`` (its run folder's name)."""
    name: str
    method: str
    recipe: dict = field(hash=False)
    run_name: str


@dataclass(frozen=True)
class StudySettings:
    """The study: concepts, erasures (names of ``ERASURES``; empty: the base only), attacks, prompts per concept
    (``limit``), the checks' sampler and steps, budgets (``--set`` items added after ``BUDGETS``), CA sizes."""
    out: str = "outputs/attack-study"
    concepts: tuple[str, ...] = CONCEPTS
    erasures: tuple[str, ...] = ERASURES
    attacks: tuple[str, ...] = ATTACKS
    limit: int | None = None
    seeds: tuple[int, ...] = (0,)  # seed offsets: each attacks every prompt again from other noise, pooled
    sampler: str = "plms"  # the published table's checks (made before lms, attack.py's default, existed)
    steps: int = 50
    overrides: tuple[str, ...] = ()
    quick: bool = False  # SIZES["quick"] anchor images for Concept Ablation (SIZES["full"] otherwise)
    gpus: str | None = None  # the job's --gpus: e.g. "cpu:2" shards the prompts over two processes
    inversion_templates: str = "original"  # or "world": WORLD_TEMPLATES of the concept's kind

    def __post_init__(self):
        if self.inversion_templates not in ("original", "world"):
            raise ValueError(f"--inversion_templates {self.inversion_templates}: must be original or world")
        for what, given, known in (("concept", self.concepts, CONCEPTS), ("erasure", self.erasures, ERASURES),
                                   ("attack", self.attacks, ATTACKS)):
            unknown = [x for x in given if x not in known]
            if unknown:
                raise ValueError(f"--{what}s {' '.join(unknown)}: unknown {what}; the study's: {', '.join(known)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit {self.limit}: must be >= 1")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seed {' '.join(map(str, self.seeds))}: give one or more different offsets")


@dataclass
class ConceptPlan:
    """One concept's work: its base checkpoint (None: the shipped one, or built by :func:`waves_base`), erasures
    and the job's settings for the base-only run (``settings``; the erasures' deltas are added once made)."""
    concept: str
    erasures: list[Erasure]
    settings: object  # attacks.settings.AttackSettings
    waves_base: bool = False


def erasures_for(concept: str, names=ERASURES) -> list[Erasure]:
    """The erasures of ``concept`` (see the module table)."""
    if concept == WAVES:
        from experiments.ffn.experiment import ablation_recipe

        ca = ablation_recipe()
        preserve = {k: v for k, v in ca.items() if k != "regularization"}
        preserve.update(preserve="waves-preserve", overrides=PRESERVE_OVERRIDES)  # written by waves_preserve_file
        made = {"ca": Erasure("ca", "ablation", ca, "toy_attack_waves"),
                "ca-preserve": Erasure("ca-preserve", "ablation", preserve, "toy_attack_waves-preserve"),
                "cp": Erasure("cp", "conceptprune", {"concept": WAVES}, "toy_prune_waves")}
    else:
        style, preserve, prune = MISSION_RECIPES[concept]
        made = {"ca": Erasure("ca", "ablation", RECIPES[style], f"toy_{style}"),
                "ca-preserve": Erasure("ca-preserve", "ablation", RECIPES[preserve], f"toy_{preserve}"),
                "cp": Erasure("cp", "conceptprune", PRUNE[prune], f"toy_prune_{prune}")}
    return [made[n] for n in names]


def attack_overrides(concept: str, attacks, extra=(), inversion_templates: str = "original") -> tuple[str, ...]:
    """``--set`` items of ``concept``: the study's budgets, the per-concept settings (with ``world``: the
    inversion's WORLD_TEMPLATES), then ``extra``; only for the attacks run."""
    items = []
    for table in (BUDGETS, CONCEPT_SETTINGS[concept]):
        for attack, values in table.items():
            if attack in attacks:
                items += [f"{attack}.{k}={v}" for k, v in values.items()]
    if inversion_templates == "world" and "inversion" in attacks:
        kind = CONCEPT_SETTINGS[concept]["inversion"]["learnable_property"]
        items.append("inversion.templates=" + ",".join(WORLD_TEMPLATES[kind]))
    return (*items, *extra)


def registered(attacks) -> tuple[list[str], list[str]]:
    """(attacks the job knows, attacks not yet in ``attacks.registry``)."""
    from attacks.registry import ATTACKS as KNOWN

    return [a for a in attacks if a in KNOWN], [a for a in attacks if a not in KNOWN]


def plan(study: StudySettings, assets: Path = ASSETS) -> list[ConceptPlan]:
    """Every concept's erasures and attack-job settings, one plan per concept and seed offset (nothing made or
    read)."""
    from experiments.toy_attacks import settings_for

    attacks, _ = registered(study.attacks)
    out = Path(study.out)
    plans = []
    for concept in study.concepts:
        for seed in study.seeds:
            changes = dict(limit=study.limit, steps=study.steps, sampler=study.sampler, seed=seed, gpus=study.gpus,
                           overrides=attack_overrides(concept, attacks, study.overrides, study.inversion_templates))
            if concept == WAVES:
                changes["base"] = str(waves_base_path(out))
            plans.append(ConceptPlan(concept, erasures_for(concept, study.erasures),
                                     settings_for(concept, attacks, out / "attacks", assets, **changes),
                                     waves_base=concept == WAVES))
    return plans


# ---------------------------------------------------------------------------------------------------- erasures
def waves_base_path(out: Path) -> Path:
    return Path(out) / "erasures" / "base_waves.safetensors"


def waves_preserve_file(out: Path, assets: Path = ASSETS) -> Path:
    """``{out}/erasures/preserve_waves.txt``: the mission's preservation prompts without the word waves (world
    captions never have it, so the stripes ones stay in: they are a neighbour to keep)."""
    from toyworld.mission import preservation_prompts

    path = Path(out) / "erasures" / "preserve_waves.txt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(preservation_prompts(WAVES, None, assets)) + "\n")
    return path


def _cache(out: Path) -> Path:
    return Path(out) / "erasures" / "erasures.json"


def cached(out: Path) -> dict:
    """``{concept/name: delta path}`` of the erasures made so far (finished ones only: written after each)."""
    f = _cache(out)
    return json.loads(f.read_text()) if f.is_file() else {}


def erasure_train_settings(e: Erasure, out: Path, base, quick: bool = False, assets: Path = ASSETS):
    """train.py's settings for Concept Ablation erasure ``e`` (its recipe; waves' preservation prompts written to
    ``{out}/erasures/`` and named by their absolute path, which the mission's ``assets /`` leaves as it is)."""
    from toyworld import mission

    recipe = dict(e.recipe)
    if recipe.get("preserve") == "waves-preserve":
        recipe["preserve"] = str(waves_preserve_file(out, assets).resolve())
    size = SIZES["quick" if quick else "full"]["train_size"]
    return mission.train_settings(e.run_name.removeprefix("toy_"), recipe, assets, Path(out) / "erasures", size,
                                  base_ckpt=str(base))


def make_erasure(concept: str, e: Erasure, out: Path, quick: bool = False, assets: Path = ASSETS) -> Path:
    """Train or prune erasure ``e`` of ``concept`` (reused when ``erasures.json`` names it and its file exists);
    its delta's path."""
    from runtime.files import write_text_atomic
    from toyworld import mission

    out, key = Path(out), f"{concept}/{e.name}"
    done = cached(out)
    if key in done and Path(done[key]).is_file():
        return Path(done[key])
    folder = out / "erasures"
    start = time.perf_counter()
    if concept == WAVES:
        from experiments.ffn.teach import build_checkpoint

        base = build_checkpoint(folder, assets)  # base + waves (made once)
    else:
        base = mission.asset_paths(assets)["weights"]
    if e.method == "conceptprune":
        if concept == WAVES:
            from experiments.ffn.experiment import prune_run

            run_dir = prune_run(folder, base, WAVES, assets=assets, run_dir=folder / "logs" / e.run_name)
        else:
            run_dir = mission.prune(base, mission.asset_paths(assets)["config"], e.recipe["concept"],
                                    assets / e.recipe["target_file"], folder / "logs" / e.run_name,
                                    base_file=assets / e.recipe["base_file"], save_images=0).parent.parent
        delta = run_dir / "checkpoints" / "delta_pruned.safetensors"
    else:
        from ablation.train import run as train

        run_dir = train(erasure_train_settings(e, out, base, quick, assets))
        delta = sorted((run_dir / "checkpoints").glob("delta_step_*"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))[-1]
    done = cached(out)
    done[key] = str(delta)
    done[f"{key} seconds"] = round(time.perf_counter() - start, 1)
    write_text_atomic(_cache(out), json.dumps(done, indent=1) + "\n")  # readers never see half a file
    return delta


# ---------------------------------------------------------------------------------------------------- the run
def run(study: StudySettings, assets: Path = ASSETS) -> dict:
    """The study (resuming): per concept, the base row first, then each erasure made and attacked. Writes
    ``{out}/study.{md,json}``; returns the study's document."""
    from attacks.job import check
    from attacks.job import run as attack

    out = Path(study.out)
    plans = plan(study, assets)
    _, missing = registered(study.attacks)
    if missing:
        print(f"not registered in attacks/registry.py yet, skipped: {', '.join(missing)}")
    for p in plans:  # every input checked before any work (the waves base is built first: a file the job checks)
        if p.waves_base:
            from experiments.ffn.teach import build_checkpoint

            build_checkpoint(out / "erasures", assets)
        check(p.settings)
    results = {}
    for p in plans:
        got = attack(p.settings)  # the sanity row first
        deltas = tuple(f"{e.name}={make_erasure(p.concept, e, out, study.quick, assets)}" for e in p.erasures)
        if deltas:  # the base's records are reused: only the erased models are attacked now
            got = attack(dataclasses.replace(p.settings, delta=deltas))
        results[p.concept] = pool_results(results.get(p.concept), got)  # another seed offset: pooled
    return write_study(study, plans, results, missing)


def clustered_se(values) -> float:
    """Standard error of the mean of ``values`` ([prompt, ..., y] rows, y a success or a paired difference)
    clustered by prompt: sqrt(sum_j (sum_i (y_ij - mean))^2) / N over prompts j and their draws i (the sandwich
    estimator without small-sample factor). Draws of one prompt under other noise are not independent (a prompt
    is easy or hard), so this is larger than sqrt(p (1 - p) / N) when they agree; with one draw per prompt and
    y in {0, 1} it equals it."""
    import math

    n = len(values)
    if not n:
        return 0.0
    mean = sum(float(v[-1]) for v in values) / n
    sums: dict[str, float] = {}
    for v in values:
        sums[v[0]] = sums.get(v[0], 0.0) + (float(v[-1]) - mean)
    return math.sqrt(sum(x * x for x in sums.values())) / n


def paired_lift(attacked: dict, baseline: dict) -> dict | None:
    """The difference of two cells' ASR on the same draws (prompt and seed), e.g. an attack minus ``none`` on one
    model, or one attack on an erasure minus on the base: {n, lift, se}, the SE of the paired differences
    clustered by prompt. Pairing removes what the cells share (a prompt that any check finds), so this SE is far
    smaller than the two ASRs' own. None when a cell has no ``outcomes`` or they share no draw."""
    if not attacked or not baseline or "outcomes" not in attacked or "outcomes" not in baseline:
        return None
    base = {(q, seed): y for q, seed, y in baseline["outcomes"]}
    diffs = [[q, int(y) - int(base[(q, seed)])] for q, seed, y in attacked["outcomes"] if (q, seed) in base]
    if not diffs:
        return None
    return {"n": len(diffs), "lift": sum(d for _, d in diffs) / len(diffs), "se": clustered_se(diffs)}


def report(study: StudySettings, assets: Path = ASSETS, complete: bool = False) -> dict:
    """The study's table from the records made so far, attacking and training nothing and writing no file of the
    attack job, so it can read the folder of a study that is running: an erasure not made yet and the waves plans
    before their base is built are left out, and a cell short of prompts shows ``n of N``. ``complete``: leave
    out every (concept, seed offset) with a prompt not attacked yet, so each cell pools whole offsets only.
    Writes ``{out}/study.{md,json}`` (with ``"report": true``, and ``"left_out"``); returns the document."""
    from attacks.job import check, plan_summaries

    out = Path(study.out)
    plans = plan(study, assets)
    _, missing = registered(study.attacks)
    results, left_out = {}, []
    done = cached(out)  # the erasures made so far: read once for every plan
    for p in plans:
        what = f"{p.concept} seed offset {p.settings.seed}"
        if p.waves_base and not waves_base_path(out).is_file():
            left_out.append(f"{what}: its base is not built yet")
            continue
        deltas = tuple(f"{e.name}={done[k]}" for e in p.erasures
                       if (k := f"{p.concept}/{e.name}") in done and Path(done[k]).is_file())
        got = plan_summaries(check(dataclasses.replace(p.settings, delta=deltas)))
        short = sum(c["missing"] for m in got.values() for c in m["attacks"].values())
        if complete and (short or len(deltas) < len(p.erasures)):  # a prompt not attacked or an erasure not made
            left_out.append(f"{what}: not complete")
            continue
        results[p.concept] = pool_results(results.get(p.concept), got)
    for line in left_out:
        print(f"left out of the report: {line}")
    return write_study(study, plans, results, missing, report=True, left_out=left_out)


def pool(a: dict, b: dict) -> dict:
    """One model x attack summary of two runs over different prompts or seeds: successes and prompts summed, the
    ASR of the sum and its standard error (clustered by prompt, :func:`clustered_se`, when both runs carry their
    ``outcomes``; else sqrt(p (1 - p) / n)), seconds per prompt and the first successful step averaged with their
    weights (prompts; successes)."""
    import math

    n = a["n"] + b["n"]
    wins = a["successes"] + b["successes"]
    asr = wins / n if n else 0.0
    outcomes = a["outcomes"] + b["outcomes"] if "outcomes" in a and "outcomes" in b else None
    se = clustered_se(outcomes) if outcomes is not None else math.sqrt(asr * (1 - asr) / n) if n else 0.0

    def mean(key, wa, wb):
        pairs = [(x[key], w) for x, w in ((a, wa), (b, wb)) if w and x.get(key) is not None]
        return sum(v * w for v, w in pairs) / sum(w for _, w in pairs) if pairs else None

    extra = {"outcomes": outcomes, "prompts": len({v[0] for v in outcomes})} if outcomes is not None else {}
    return {**{k: v for k, v in a.items() if k not in ("outcomes", "prompts")}, **extra,
            "asr": asr, "se": se, "successes": wins, "n": n,
            "missing": a.get("missing", 0) + b.get("missing", 0),
            "pre_attack_successes": a.get("pre_attack_successes", 0) + b.get("pre_attack_successes", 0),
            "mean_first_success": mean("mean_first_success", a["successes"], b["successes"]),
            "seconds_per_prompt": mean("seconds_per_prompt", a["n"], b["n"]),
            "seconds_per_prompt_unshared": mean("seconds_per_prompt_unshared", a["n"], b["n"])}


def pool_results(a: dict | None, b: dict) -> dict:
    """Two attack-job results of one concept ({model: {"attacks": {attack: summary}}}) pooled cell by cell."""
    if a is None:
        return b
    out = {}
    for model in dict.fromkeys([*a, *b]):
        cells_a, cells_b = (a.get(model) or {}).get("attacks", {}), (b.get(model) or {}).get("attacks", {})
        merged = {k: pool(cells_a[k], cells_b[k]) if k in cells_a and k in cells_b else cells_a.get(k, cells_b.get(k))
                  for k in dict.fromkeys([*cells_a, *cells_b])}
        out[model] = {**(a.get(model) or b.get(model)), "attacks": merged}
    return out


def cell(summary: dict | None) -> str:
    """``ASR ± SE (n) · s/prompt`` of one model x attack summary; n is ``prompts×draws`` for pooled draws of the
    same prompts (the SE then clustered by prompt); the seconds are what attacking this model alone costs (a
    Ring-A-Bell search reused from another model counted as if made)."""
    if not summary or not summary.get("n"):
        return "–"
    n, prompts, short = summary["n"], summary.get("prompts") or summary["n"], summary.get("missing") or 0
    size = (f"{n} of {n + short}" if short else
            f"{prompts}×{n // prompts}" if prompts != n and n % prompts == 0 else f"{n}")
    seconds = summary.get("seconds_per_prompt_unshared")
    seconds = summary["seconds_per_prompt"] if seconds is None else seconds
    return f"{summary['asr']:.2f} ± {summary['se']:.2f} ({size}) · {seconds:.1f} s"


def table(results: dict, attacks) -> str:
    """One markdown table: a row per concept and model, a column per attack."""
    lines = ["| concept | model | " + " | ".join("none (pre-attack)" if a == "none" else a for a in attacks) + " |",
             "|---|---|" + "---|" * len(attacks)]
    for concept, models in results.items():
        for model, flat in (models or {}).items():
            cells = [cell(flat.get("attacks", {}).get(a)) for a in attacks]
            lines.append(f"| {concept} | {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def lifts(results: dict, attacks) -> dict:
    """{concept: {model: {attack: {"over_none": ..., "over_base": ...}}}}: :func:`paired_lift` of each attack
    over ``none`` on the same model, and over the same attack on the base model (for an erasure)."""
    out = {}
    for concept, models in results.items():
        base = ((models or {}).get("base") or {}).get("attacks", {})
        for model, flat in (models or {}).items():
            cells = flat.get("attacks", {})
            for a in attacks:
                got = {"over_none": paired_lift(cells.get(a), cells.get("none")) if a != "none" else None,
                       "over_base": paired_lift(cells.get(a), base.get(a)) if model != "base" else None}
                if any(got.values()):
                    out.setdefault(concept, {}).setdefault(model, {})[a] = got
    return out


def lift_table(lifted: dict, attacks) -> str:
    """Markdown: each attack's paired lift over ``none`` on the same model, ``+d ± SE`` (empty when no cell has
    outcomes to pair)."""
    attacks = [a for a in attacks if a != "none"]
    if not lifted or not attacks:
        return ""
    lines = ["| concept | model | " + " | ".join(attacks) + " |", "|---|---|" + "---|" * len(attacks)]
    for concept, models in lifted.items():
        for model, cells in models.items():
            row = [(f"{x['lift']:+.2f} ± {x['se']:.2f}" if (x := (cells.get(a) or {}).get("over_none")) else "–")
                   for a in attacks]
            lines.append(f"| {concept} | {model} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_study(study: StudySettings, plans, results: dict, missing, report: bool = False,
                left_out: list[str] | None = None) -> dict:
    attacks = [a for a in study.attacks if a not in missing]
    lifted = lifts(results, attacks)
    md = table(results, attacks)
    if lifted:
        md += ("\nLift over `none` on the same draws (attack ASR minus pre-attack ASR, paired by prompt and seed; "
               "± its standard error clustered by prompt):\n\n" + lift_table(lifted, attacks))
    doc = {"study": dataclasses.asdict(study), "report": report, "left_out": left_out or [], "budgets": BUDGETS,
           "original_budgets": ORIGINAL_BUDGETS, "concept_settings": CONCEPT_SETTINGS, "not_registered": list(missing),
           "erasures": cached(Path(study.out)),
           "results": {c: {m: {a: {k: v for k, v in sm.items() if k != "outcomes"}  # the records keep them
                               for a, sm in flat.get("attacks", {}).items()}
                           for m, flat in (models or {}).items()}
                       for c, models in results.items()},
           "lifts": lifted}
    out = Path(study.out)
    (out / "study.md").write_text(md)
    (out / "study.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(md)
    return doc


# ---------------------------------------------------------------------------------------------------- samplers
SAMPLERS = ("lms", "plms", "dpmpp_2m")  # the first is the reference: the original's (UnlearnDiffAtk's checker)
SAMPLER_SEEDS = (0, 1000)  # two seed offsets: 72 prompt x seed rows for the 36 texture prompts


def paired(a: list[bool], b: list[bool]) -> dict:
    """Two samplers' successes on the same rows: each ASR with sqrt(p (1 - p) / n), and the mean paired difference
    b - a with its standard error sd(d) / sqrt(n) (d per row in {-1, 0, 1}) and the discordant rows."""
    import math

    n = len(a)
    if n != len(b) or n < 2:
        raise ValueError(f"paired: need the same rows (>= 2) for both samplers, got {len(a)} and {len(b)}")
    pa, pb = sum(a) / n, sum(b) / n
    d = [int(y) - int(x) for x, y in zip(a, b)]
    mean = sum(d) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1))
    return {"n": n, "asr": [pa, pb], "se": [math.sqrt(pa * (1 - pa) / n), math.sqrt(pb * (1 - pb) / n)],
            "difference": mean, "difference_se": sd / math.sqrt(n), "only_first": d.count(-1),
            "only_second": d.count(1)}


def compare_samplers(out: Path, concept: str, model: str = "base", delta: str | None = None,
                     samplers=SAMPLERS, seeds=SAMPLER_SEEDS, assets: Path = ASSETS, limit: int | None = None,
                     steps: int = 50) -> dict:
    """``none`` (the pre-attack check) on one model with each sampler, on the concept's prompts at each seed offset
    (``{out}/samplers/{sampler}/``, the job's layout, resumable); each sampler's ASR and mean seconds per check, and
    each other sampler paired row by row with the first (:func:`paired`, under ``paired[name]``). ``delta``: an
    erasure's delta (``model`` names it); the waves base is built if needed."""
    if len(samplers) < 2 or len(set(samplers)) != len(samplers):  # before the waves base is built
        raise ValueError(f"compare_samplers: need two or more different samplers, got {list(samplers)}")
    from attacks.job import check, record_path, summarize
    from attacks.job import run as attack
    from experiments.toy_attacks import settings_for

    out = Path(out)
    changes = {"limit": limit, "steps": steps, "delta": (f"{model}={delta}",) if delta else ()}
    if concept == WAVES:
        from experiments.ffn.teach import build_checkpoint

        changes["base"] = str(build_checkpoint(out / "erasures", assets))
    records: dict[str, list[dict]] = {}
    for sampler in samplers:
        records[sampler] = []
        for seed in seeds:
            plan = check(settings_for(concept, ("none",), out / "samplers" / sampler, assets, sampler=sampler,
                                      seed=seed, **changes))
            attack(plan.settings, plan=plan)
            spec = next(m for m in plan.models if m.name == model)
            records[sampler] += [json.loads(record_path(plan, spec, plan.attacks[0], row).read_text())
                                 for row in plan.rows]
    ref = samplers[0]
    cells = {k: summarize(v, len(v)) for k, v in records.items()}  # ASR, SE sqrt(p (1 - p) / n), seconds
    wins = {k: [bool(r["success"]) for r in v] for k, v in records.items()}
    result = {"concept": concept, "model": model, "delta": delta, "samplers": list(samplers), "seeds": list(seeds),
              "steps": steps, "n": cells[ref]["n"], "reference": ref,
              "asr": {k: c["asr"] for k, c in cells.items()}, "se": {k: c["se"] for k, c in cells.items()},
              "seconds_per_check": {k: c["seconds_per_prompt"] for k, c in cells.items()},
              "paired": {k: paired(wins[ref], wins[k]) for k in samplers[1:]}}
    (out / "samplers").mkdir(parents=True, exist_ok=True)
    (out / "samplers" / f"{concept.replace(' ', '_')}-{model}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


MARKERS = ("<!-- attack-study table: start -->", "<!-- attack-study table: end -->")


def publish(out: Path, page: Path, assets: Path = ASSETS) -> None:
    """Copy ``{out}/study.{md,json}`` to ``assets/toyworld/attacks/`` and put the table between ``MARKERS`` in
    ``page``."""
    md = (Path(out) / "study.md").read_text()
    head, _, rest = page.read_text().partition(MARKERS[0])
    _, found, tail = rest.partition(MARKERS[1])
    if not found:  # checked before anything is written
        raise ValueError(f"{page}: no {MARKERS[0]} ... {MARKERS[1]} block to fill")
    target = assets / "attacks"
    target.mkdir(parents=True, exist_ok=True)
    for name in ("study.md", "study.json"):
        (target / name).write_text((Path(out) / name).read_text())
    page.write_text(f"{head}{MARKERS[0]}\n{md}{MARKERS[1]}{tail}")


def sampler_study(out: Path, concepts, model: str, limit: int | None = None, steps: int = 50) -> dict:
    """:func:`compare_samplers` for each concept on ``model`` ("base" or an erasure made by the study)."""
    results = {}
    for concept in concepts:
        delta = None
        if model != "base":
            delta = cached(out).get(f"{concept}/{model}")
            if not delta or not Path(delta).is_file():
                raise ValueError(f"--compare_samplers {model}: no {concept!r} erasure {model!r} made in {out} yet")
        r = results[concept] = compare_samplers(out, concept, model, delta, limit=limit, steps=steps)
        asr = ", ".join(f"{k} {r['asr'][k]:.3f} ± {r['se'][k]:.3f}" for k in r["samplers"])
        diffs = ", ".join(f"{k} {d['difference']:+.3f} ± {d['difference_se']:.3f}" for k, d in r["paired"].items())
        print(f"{concept} {model}: none ASR {asr} (n {r['n']}); paired difference to {r['reference']}: {diffs}")
    return results


def main(argv=None) -> dict:
    from runtime.cli import exit_on_usage_error

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=StudySettings.out)
    p.add_argument("--concepts", nargs="+", default=list(CONCEPTS), choices=CONCEPTS)
    p.add_argument("--erasures", nargs="*", default=list(ERASURES), help=f"of {', '.join(ERASURES)} (none: base only)")
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts per concept")
    p.add_argument("--seed", dest="seeds", type=int, nargs="+", default=[0],
                   help="prompt i's checks use seed SEED + i; several offsets attack every prompt again, pooled")
    p.add_argument("--sampler", default="plms", help="the checks' sampler (plms, the study's; lms, ddim, dpmpp_2m)")
    p.add_argument("--steps", type=int, default=50, help="the checks' sampling steps")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="ATTACK.FIELD=VALUE after BUDGETS")
    p.add_argument("--gpus", default=None, help="the attack job's --gpus (e.g. cpu:2: two processes)")
    p.add_argument("--quick", action="store_true", help="Concept Ablation with the mission's quick sizes")
    p.add_argument("--inversion_templates", choices=("original", "world"), default="original",
                   help="concept inversion's caption templates: the original's, or the toy world's grammar")
    p.add_argument("--compare_samplers", metavar="MODEL", default=None,
                   help="instead of the study: none with lms, plms and dpmpp_2m on MODEL (base or a made erasure) "
                        "for each --concepts, seed offsets 0 and 1000, paired with lms (written to {out}/samplers/)")
    p.add_argument("--report", nargs="?", const="all", choices=("all", "complete"), default=None,
                   help="only the table of the records made so far (attacks and trains nothing; safe while the "
                        "same study runs); 'complete': only the seed offsets whose every cell is done")
    p.add_argument("--publish", action="store_true",
                   help="copy the table to assets/toyworld/attacks/ and docs/experiments/toy-attacks.md")
    a = p.parse_args(argv)

    def go():
        if a.compare_samplers:
            return sampler_study(Path(a.out), a.concepts, a.compare_samplers, a.limit, a.steps)
        study = StudySettings(out=a.out, concepts=tuple(a.concepts), erasures=tuple(a.erasures),
                              attacks=tuple(a.attacks), limit=a.limit, seeds=tuple(a.seeds), sampler=a.sampler,
                              steps=a.steps, overrides=tuple(a.overrides), quick=a.quick, gpus=a.gpus,
                              inversion_templates=a.inversion_templates)
        doc = report(study, complete=a.report == "complete") if a.report else run(study)
        if a.publish:
            from runtime.resources import DATA_ROOT

            publish(Path(a.out), Path(DATA_ROOT) / "docs" / "experiments" / "toy-attacks.md")
        return doc

    return exit_on_usage_error(go)


if __name__ == "__main__":
    main()
