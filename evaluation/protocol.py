"""Evaluate ablated models: generate with every delta checkpoint of one or more training
runs and with the base model, then score CLIP score / CLIP accuracy, KID and FID (and, for
memorization, the SSCD memorization rate).

    python evaluate.py --root logs/<run> --concept_type style --caption_target "van gogh"
    python evaluate.py --root logs --concept_type object --caption_target "grumpy cat" --eval_stage

Stage 1 (generation, skipped with ``--eval_stage``), for every checkpoint ``{run}/checkpoints/{--filter}``:

* concepts ``[target, anchor] + hard_negative`` from ``--eval_json``; ``4 * numgen`` images for the
  target and the anchor, ``numgen`` for each hard negative (memorization: the memorized caption only,
  ``4 * numgen`` images);
* prompts: style concepts read ``assets/eval_prompts/{concept}_eval.txt`` (spaces and ``-`` -> ``_``);
  object concepts read the ANCHOR's file with the anchor word replaced by the concept exactly as the
  original does (a plain substring replace: "robots" -> "r2d2s"; a warning names such lines); the file
  is cycled line by line until the wanted number of images (image ``i`` gets line ``i % n_lines``);
* ablated images (base + delta) in ``{run}/eval/{ckpt stem}-{concept}/`` and base-model images, made
  from the very same per-image prompt list and seeds, cached in ``{base_outpath}/base-{concept}/``
  (generated once, reused by every later run and checkpoint). DDIM ``--steps`` (50), ``--eta`` (1),
  CFG ``--scale`` (6), image ``i`` seeded ``seed + i``. Each folder has ``samples/NNNNN.png``,
  ``images.txt``, ``caption.txt`` and ``prompts.json`` (``{"00000": prompt}``).

Stage 2 (metrics), per concept ``t``: ``CLIP scores_{t}_{t}`` and ``CLIP accuracy_{t}_{anchor}`` on the
ablated folder, the same with a ``Baseline `` prefix on the base folder, ``KID_{t}`` and ``FID_{t}`` of
the ablated vs the base folder's features (clean-fid Inception by default, or ``--feature_model``);
memorization adds ``Memorization rate`` and ``Baseline memorization rate`` (SSCD cosine > 0.5 with
``--mem_impath``). Rows are indexed ``{run name}_{ckpt stem}`` in a table kept as JSON beside
``--outpkl`` (``{outpkl stem}.json``: merged with new results when it exists; its folder is created),
with a CSV copy, the pandas DataFrame pickled to ``--outpkl`` for the original's readers (written only:
a pickle is never read back, since unpickling runs code), a table on stdout and a bar chart
``{outpkl stem}_{concept}.png`` of the ablated vs the baseline CLIP accuracy (memorization: rate) per
concept. Every output location is checked before any generation.

Differences from the reference, on purpose: FID is reported beside KID; KID is a
float, not a one-element list; ``prompts.json`` goes into the folder it describes; the output folder
is created; the base folder holds the same prompts and seeds as the ablated one (the CompVis code made
``4 * numgen`` base images for every concept: ``--baseline_set paper``, folders ``base{4 numgen}-{concept}``
for the hard negatives); ``--filter`` matches delta checkpoints.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import re
import sys
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from runtime.resources import asset_path, config_path, weights_path

DEFAULT_CONFIG = config_path("stable-diffusion/v1-inference.yaml")
PROMPT_DIR = asset_path("eval_prompts")
CKPT_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth")
BASE_META = "base_model.json"
CONCEPT_TYPES = ("style", "object", "memorization")
PRECISIONS = ("full", "autocast")
BASELINE_SETS = ("paired", "paper")


# ---------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class EvaluateSettings:
    """The command line of ``evaluate.py``, one field per flag (same names and defaults).

    :func:`check` (run by :func:`settings_from_argv` and :func:`run`) fills in what the command line may leave
    open: ``base_ckpt`` (the base recorded in the run's config, else ``assets/pretrained_models/sd-v1-4.ckpt``),
    ``outpkl`` (``{root}/metrics/evaluation.pkl``) and, for memorization, ``sscd_ckpt``."""

    root: str
    concept_type: str
    caption_target: str
    filter: str = "delta_step_*"
    eval_json: str = str(asset_path("eval.json"))
    eval_prompts: str = str(PROMPT_DIR)
    numgen: int = 50
    outpkl: str | None = None
    base_ckpt: str | None = None
    base_outpath: str = "outputs/baseline_generation"
    gpus: str | None = None
    eval_stage: bool = False
    config: str | None = None
    clip_model: str = "open_clip:ViT-B-32:openai"
    feature_model: str | None = None
    feature_size: int = 299
    sscd_ckpt: str | None = None
    mem_impath: str | None = None
    steps: int = 50
    eta: float = 1.0
    scale: float = 6.0
    seed: int = 42
    H: int = 512
    W: int = 512
    n_samples: int = 10
    precision: str = "autocast"
    baseline_set: str = "paired"


def build_parser() -> argparse.ArgumentParser:
    from runtime import cli

    d = {f.name: f.default for f in fields(EvaluateSettings)}  # one source for the defaults
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--root", required=True, help="a training run folder (with checkpoints/) or a folder of runs")
    p.add_argument("--filter", default=d["filter"], help="glob for checkpoints under {run}/checkpoints/")
    p.add_argument("--concept_type", required=True, choices=list(CONCEPT_TYPES))
    p.add_argument("--caption_target", required=True,
                   help="a key of --eval_json (style/object) or the memorized caption (memorization)")
    p.add_argument("--eval_json", default=d["eval_json"])
    p.add_argument("--eval_prompts", default=d["eval_prompts"], help="folder of {name}_eval.txt prompt files")
    p.add_argument("--numgen", type=cli.positive_int, default=d["numgen"],
                   help="images per hard negative (>= 2 with hard negatives: KID needs two); target and anchor "
                        "get 4x")
    p.add_argument("--outpkl", default=d["outpkl"],
                   help="metrics table (.pkl; .json, .csv and the chart beside it); default: {--root}/metrics/"
                        "evaluation.pkl")
    p.add_argument("--base_ckpt", default=d["base_ckpt"],
                   help="base model (checkpoint file or diffusers pipeline folder); default: the base recorded in the "
                        "run's config, else assets/pretrained_models/sd-v1-4.ckpt")
    p.add_argument("--base_outpath", default=d["base_outpath"],
                   help="cache of the base model's generations, shared by runs (one per base model and settings)")
    p.add_argument("--gpus", default=d["gpus"], help=cli.GPUS_HELP)
    p.add_argument("--eval_stage", action="store_true", help="metrics only, on existing generations")
    p.add_argument("--config", default=d["config"], help="model config (default: the run's saved config)")
    p.add_argument("--clip_model", default=d["clip_model"],
                   help="open_clip:ARCH:PRETRAINED (an open_clip tag, or a local weights file), or a transformers "
                        "CLIPModel (local folder or hub id); checked before any generation")
    p.add_argument("--feature_model", default=d["feature_model"],
                   help="TorchScript feature extractor for KID/FID (default: clean-fid Inception); "
                        "a file named inception-2015-12-05.pt runs as clean-fid's Inception")
    p.add_argument("--feature_size", type=cli.positive_int, default=d["feature_size"],
                   help="input size of --feature_model")
    p.add_argument("--sscd_ckpt", default=d["sscd_ckpt"], help="SSCD TorchScript model (memorization)")
    p.add_argument("--mem_impath", default=d["mem_impath"], help="the memorized image (memorization)")
    p.add_argument("--steps", type=cli.positive_int, default=d["steps"], help="DDIM steps")
    p.add_argument("--eta", type=cli.nonnegative_float, default=d["eta"])
    p.add_argument("--scale", type=cli.finite_float, default=d["scale"], help="classifier-free guidance scale")
    p.add_argument("--seed", type=cli.nonnegative_int, default=d["seed"])
    p.add_argument("--H", type=cli.image_side, default=d["H"])
    p.add_argument("--W", type=cli.image_side, default=d["W"])
    p.add_argument("--n_samples", type=cli.positive_int, default=d["n_samples"], help="generation batch size")
    p.add_argument("--precision", choices=list(PRECISIONS), default=d["precision"],
                   help="autocast: fp16 on CUDA")
    p.add_argument("--baseline_set", choices=list(BASELINE_SETS), default=d["baseline_set"],
                   help="the base-model images each concept is compared with (KID, FID, Baseline columns): "
                        "paired = the ablated images' own prompts and seeds (numgen per hard negative); "
                        "paper = the original's 4*numgen base images for every concept")
    return p


def parse_settings(argv=None) -> EvaluateSettings:
    """The command line as settings, nothing checked beyond argparse (a bad flag exits with status 2);
    :func:`settings_from_argv` also runs :func:`check`."""
    return EvaluateSettings(**vars(build_parser().parse_args(argv)))


def settings_from_argv(argv=None) -> EvaluateSettings:
    """Parse ``argv`` and run every cheap check (:func:`check`); the settings with their defaults resolved."""
    return check(parse_settings(argv))


# ---------------------------------------------------------------------------------------- plan
@dataclass
class Concept:
    name: str  # the concept text (lower-cased), used in column names and CLIP texts
    prompts: list[str]  # one entry per image


@dataclass
class Checkpoint:
    run: Path
    path: Path
    model_config: dict

    @property
    def expname(self) -> str:
        return f"{self.run.name}_{self.path.stem}"


@dataclass
class Plan:
    """What :func:`plan` found and checked: the work of one evaluation."""

    settings: EvaluateSettings  # with base_ckpt, outpkl and (memorization) sscd_ckpt resolved
    target: str
    anchor: str | None
    concepts: list[Concept]
    checkpoints: list[Checkpoint]
    base_config: dict
    devices: tuple[str, ...]
    outpkl: Path
    clip: str  # --clip_model as resolved by scoring.metrics.resolve_clip (what load_clip loads)
    base_prompt_sets: dict[str, list[str]] = field(default_factory=dict, repr=False)  # base_prompts' cache

    @property
    def concept_type(self) -> str:
        return self.settings.concept_type


def folder_name(concept: str) -> str:
    """File-system name of a concept: lower case, every run of non-alphanumerics -> ``_``."""
    name = re.sub(r"[^0-9a-z]+", "_", concept.strip().lower()).strip("_")
    if not name:
        raise ValueError(f"concept {concept!r} has no letters or digits")
    if len(name) > 80:  # long memorized captions: keep it unique but short
        name = name[:64] + "_" + hashlib.sha256(concept.encode()).hexdigest()[:8]
    return name


def _read_lines(path: Path) -> list[str]:
    from runtime.files import read_prompts

    return read_prompts(path)  # FileNotFoundError / ValueError (empty) with the path


def _cycle(lines: list[str], n: int) -> list[str]:
    return [lines[i % len(lines)] for i in range(n)]


def replace_word(prompt: str, old: str, new: str) -> str:
    """The original's object-prompt rewrite (``compvis/evaluate.py`` ``load_data``): the stripped
    line with every occurrence of ``old`` replaced by ``new``. A plain, case-sensitive substring replace, kept
    exactly so that the paper's own prompt files give the paper's prompts: "robots" becomes "r2d2s", "fishbowl"
    becomes "nemobowl", and "Cat" is left as it is."""
    return prompt.strip().replace(old, new)


def _whole_word(word: str, flags: int = 0) -> re.Pattern:
    return re.compile(rf"(?<![0-9A-Za-z]){re.escape(word)}(?![0-9A-Za-z])", flags)


def odd_rewrites(lines: list[str], anchor: str) -> list[str]:
    """The prompts the substring rewrite treats unlike a whole-word one, described with their numbers:
    the anchor inside a longer word, the anchor only in another case (not replaced), or no anchor at all (the
    line stays the anchor's prompt for every concept)."""
    odd = []
    for n, line in enumerate(lines, 1):
        hits, words = line.count(anchor), len(_whole_word(anchor).findall(line))
        if hits > words:
            odd.append(f"prompt {n} {line!r}: {anchor!r} inside a longer word, replaced there too")
        elif hits == 0 and _whole_word(anchor, re.IGNORECASE).search(line):
            odd.append(f"prompt {n} {line!r}: {anchor!r} only in another case, not replaced")
        elif hits == 0:
            odd.append(f"prompt {n} {line!r}: no {anchor!r}, the prompt stays the same for every concept")
    return odd


def _eval_file(prompt_dir: Path, name: str, concept: str) -> list[str]:
    path = prompt_dir / f"{name.replace(' ', '_').replace('-', '_')}_eval.txt"
    if not path.is_file():
        ours = sorted(p.name for p in prompt_dir.glob("*_eval.txt")) if prompt_dir.is_dir() else []
        raise FileNotFoundError(
            f"no evaluation prompts for {concept!r}: {path} not found. {prompt_dir} has "
            f"{', '.join(ours) or 'no *_eval.txt files'}. Write your own file of prompts (one per line), or pass "
            f"--eval_prompts <the original repository's assets/eval_prompts> to use the paper's")
    return _read_lines(path)


def concept_lines(concept_type: str, concept: str, anchor: str, prompt_dir: Path) -> list[str]:
    """The prompt lines of ``concept``, as the original builds them: style concepts read their own file
    unchanged; object concepts read the anchor's file with :func:`replace_word`. Lines the rewrite treats
    oddly are named in one warning per file."""
    if concept_type == "style":
        return _eval_file(prompt_dir, concept, concept)
    lines = _eval_file(prompt_dir, anchor, concept)
    odd = odd_rewrites(lines, anchor) if concept != anchor else []
    if odd:
        # the same text for every concept of the file, so Python shows it once
        warnings.warn(f"{prompt_dir / (anchor.replace(' ', '_').replace('-', '_') + '_eval.txt')}: object prompts "
                      f"are rewritten as in the original (plain substring replace of {anchor!r}); "
                      f"{len(odd)} prompt(s) differ from a whole-word rewrite:\n  " + "\n  ".join(odd),
                      stacklevel=3)
    return [replace_word(line, anchor, concept) for line in lines]


def concept_prompts(concept_type: str, concept: str, anchor: str, n: int, prompt_dir: Path) -> list[str]:
    """``n`` prompts for ``concept`` from :func:`concept_lines`: image ``i`` gets line ``i % n_lines``."""
    return _cycle(concept_lines(concept_type, concept, anchor, prompt_dir), n)


def load_eval_entry(eval_json: Path, concept_type: str, caption_target: str) -> dict:
    if not eval_json.is_file():
        raise FileNotFoundError(f"--eval_json not found: {eval_json}")
    try:
        data = json.loads(eval_json.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--eval_json {eval_json} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--eval_json {eval_json}: expected an object of sections (style, object, ...), "
                         f"got a {type(data).__name__}")
    section = data.get(concept_type)
    if not isinstance(section, dict) or not section:
        raise ValueError(f"{eval_json} has no {concept_type!r} section (it has: {', '.join(sorted(data)) or 'none'})")
    if caption_target not in section:
        raise ValueError(f"--caption_target {caption_target!r} is not a {concept_type} entry of {eval_json}; "
                         f"known {concept_type} targets: {', '.join(repr(k) for k in sorted(section))}")
    entry = section[caption_target]
    if not isinstance(entry, dict):
        raise ValueError(f"{eval_json}: entry {caption_target!r} must be an object with 'target', 'anchor' and "
                         f"'hard_negative', got a {type(entry).__name__}")
    for key in ("target", "anchor"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            raise ValueError(f"{eval_json}: entry {caption_target!r} needs a non-empty {key!r}")
    negs = entry.get("hard_negative", entry.get("hard_negatives", []))
    if not isinstance(negs, list) or not all(isinstance(x, str) and x.strip() for x in negs):
        raise ValueError(f"{eval_json}: entry {caption_target!r}: 'hard_negative' must be a list of strings")
    return {"target": entry["target"], "anchor": entry["anchor"], "hard_negative": negs}


def _step_key(p: Path):
    nums = re.findall(r"\d+", p.stem)
    return (p.parent.parent.name, int(nums[-1]) if nums else -1, p.name)


def find_checkpoints(root: Path, pattern: str) -> list[Path]:
    """Checkpoints ``{run}/checkpoints/{pattern}`` of ``root`` (a run) or of every run directly under it."""
    if not root.is_dir():
        raise FileNotFoundError(f"--root not found: {root}")
    runs = [root] if (root / "checkpoints").is_dir() else sorted(d for d in root.iterdir()
                                                                   if (d / "checkpoints").is_dir())
    if not runs:
        raise FileNotFoundError(f"--root {root} is neither a training run (no checkpoints/ folder) nor a folder "
                                f"of runs")
    found = [p for run in runs for p in (run / "checkpoints").glob(pattern)
             if p.is_file() and p.suffix in CKPT_SUFFIXES]
    if not found:
        raise FileNotFoundError(f"no checkpoint matches {pattern!r} under "
                                f"{', '.join(str(r / 'checkpoints') for r in runs)}")
    return sorted(found, key=_step_key)


def _model_config(path: Path) -> dict:
    from omegaconf import OmegaConf

    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    config = OmegaConf.load(path)
    if "model" not in config:
        raise ValueError(f"{path} has no 'model:' section")
    return OmegaConf.to_container(config.model, resolve=True)



def _check_values(settings: EvaluateSettings) -> None:
    """The command line's type and choice rules, for settings built in Python (parsed ones always pass)."""
    import argparse as _argparse

    from runtime import cli

    rules = {"numgen": cli.positive_int, "feature_size": cli.positive_int, "steps": cli.positive_int,
             "eta": cli.nonnegative_float, "scale": cli.finite_float, "seed": cli.nonnegative_int,
             "H": cli.image_side, "W": cli.image_side, "n_samples": cli.positive_int}
    for name, rule in rules.items():
        value = getattr(settings, name)
        if isinstance(value, bool) or (rule in (cli.positive_int, cli.nonnegative_int, cli.image_side)
                                       and not isinstance(value, int)):
            raise cli.UsageError(f"argument --{name}: expected an integer, got {value!r}")
        try:
            rule(str(value))
        except _argparse.ArgumentTypeError as e:
            raise cli.UsageError(f"argument --{name}: {e}") from None
    for name, choices in (("concept_type", CONCEPT_TYPES), ("precision", PRECISIONS),
                          ("baseline_set", BASELINE_SETS)):
        if getattr(settings, name) not in choices:
            raise cli.UsageError(f"argument --{name}: invalid choice: {getattr(settings, name)!r} (choose from "
                                 f"{', '.join(repr(c) for c in choices)})")


def check(settings: EvaluateSettings) -> EvaluateSettings:
    """Every cheap check of :func:`plan` (no model is built); the settings with their defaults resolved."""
    return plan(settings).settings


def plan(settings: EvaluateSettings) -> Plan:
    """Check everything that is cheap to check, before any model is built, and return the work to do.

    Raises :class:`runtime.cli.UsageError` and other ValueError / OSError / RuntimeError / ImportError with
    one-line messages (``main`` prints them and exits with status 2)."""
    from runtime.cli import check_distinct_outputs, check_output, parse_devices
    from runtime.loading import check_checkpoints, check_delta, find_run_config

    s = settings
    _check_values(s)
    if not s.caption_target.strip():
        raise ValueError("--caption_target is empty")
    prompt_dir = Path(s.eval_prompts)
    n_main = 4 * s.numgen

    sscd_ckpt = s.sscd_ckpt
    if s.concept_type == "memorization":
        target, anchor = s.caption_target.strip(), None
        concepts = [Concept(target.lower(), [target] * n_main)]
        if not s.mem_impath:
            raise ValueError("memorization needs --mem_impath (the memorized image)")
        if not Path(s.mem_impath).is_file():
            raise FileNotFoundError(f"--mem_impath not found: {s.mem_impath}")
        from scoring.sscd import DEFAULT_SSCD_PATH

        sscd = Path(s.sscd_ckpt) if s.sscd_ckpt else DEFAULT_SSCD_PATH
        if not sscd.is_file():
            raise FileNotFoundError(f"memorization needs the SSCD model: {sscd} not found (pass --sscd_ckpt)")
        sscd_ckpt = str(sscd)
    else:
        entry = load_eval_entry(Path(s.eval_json), s.concept_type, s.caption_target)
        target, anchor = entry["target"].strip().lower(), entry["anchor"].strip().lower()
        names = [target, anchor] + [n.strip().lower() for n in entry["hard_negative"]]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"--caption_target {s.caption_target!r}: concepts repeat in {s.eval_json}: {dupes}")
        counts = [n_main, n_main] + [s.numgen] * (len(names) - 2)
        concepts = [Concept(n, concept_prompts(s.concept_type, n, anchor, k, prompt_dir))
                    for n, k in zip(names, counts)]
    for c in concepts:
        folder_name(c.name)
        if len(c.prompts) < 2:
            raise ValueError(f"--numgen {s.numgen} gives {c.name!r} {len(c.prompts)} image: KID needs at least 2 "
                             f"per concept; use --numgen 2 or more")

    ckpt_paths = find_checkpoints(Path(s.root), s.filter)
    checkpoints = []
    for path in ckpt_paths:
        config_path = Path(s.config) if s.config else (find_run_config(path) or DEFAULT_CONFIG)
        model_config = _model_config(config_path)
        if not s.eval_stage:
            check_delta(model_config, path)
        checkpoints.append(Checkpoint(path.parent.parent, path, model_config))
    base_config = _model_config(Path(s.config)) if s.config else checkpoints[0].model_config
    base_ckpt = s.base_ckpt
    if base_ckpt is None:  # the base the run was trained on, not a fixed path
        from runtime.loading import run_base_ckpt

        bases = {run_base_ckpt(c.path) for c in checkpoints}
        if len(bases) > 1:
            raise ValueError(f"the runs under --root were trained on different bases ({', '.join(sorted(map(str, bases)))}); "
                             f"pass --base_ckpt, or evaluate them one by one")
        base_ckpt = bases.pop() or str(weights_path("sd-v1-4.ckpt"))
    outpkl_name = s.outpkl if s.outpkl is not None else str(Path(s.root) / "metrics" / "evaluation.pkl")
    s = replace(s, sscd_ckpt=sscd_ckpt, base_ckpt=base_ckpt, outpkl=outpkl_name)
    if not s.eval_stage:
        from ldm.diffusers_format import checkpoint_exists

        if not checkpoint_exists(s.base_ckpt):
            raise FileNotFoundError(f"--base_ckpt not found: {s.base_ckpt} (a checkpoint file or a diffusers "
                                    f"pipeline folder)")
        check_checkpoints(base_config, s.base_ckpt)

    # every output location, before any work (the pickle is written last, after hours of generation)
    outpkl = Path(s.outpkl)
    inputs = [s.base_ckpt, s.eval_json, s.mem_impath, s.config, *(c.path for c in checkpoints)]
    outputs = {"--outpkl": outpkl, "its CSV": outpkl.with_suffix(".csv"), "its JSON": outpkl.with_suffix(".json"),
               "the chart": chart_file(outpkl, s.caption_target)}
    if outpkl.suffix.lower() in (".csv", ".json", ".png"):
        raise ValueError(f"--outpkl {outpkl}: use a .pkl name; the CSV, JSON and chart are written beside it")
    for what, path in outputs.items():
        check_output(path, what if what == "--outpkl" else f"{what} (from --outpkl)", inputs=inputs)
    check_distinct_outputs(outputs)
    read_table(outpkl)  # an earlier table that cannot be merged fails now, not after the metrics
    if not s.eval_stage:
        check_output(s.base_outpath, "--base_outpath", kind="dir")
        for run in dict.fromkeys(c.run for c in checkpoints):
            check_output(run / "eval", f"the eval folder of run {run}", kind="dir")

    # metric models: fail now, not after hours of generation
    from scoring.metrics import check_feature_model, resolve_clip

    clip = resolve_clip(s.clip_model)  # a missing model fails here, not after the generation
    check_feature_model(s.feature_model)

    base_sets: dict[str, list[str]] = {}  # base_prompts' cache, shared with the plan
    if not s.eval_stage:
        _check_folder_plans(s, concepts, checkpoints, anchor, base_sets)
    devices = () if s.eval_stage else parse_devices(s.gpus)
    the_plan = Plan(s, target, anchor, concepts, checkpoints, base_config, devices, outpkl, clip, base_sets)
    if s.eval_stage:  # metrics only: every generation must be there now, not after CLIP has loaded
        for c in concepts:
            folder_images(base_dir(the_plan, c), len(base_prompts(the_plan, c)))
            for ckpt in checkpoints:
                folder_images(ablated_dir(ckpt, c), len(c.prompts))
    else:
        from runtime.generate import validate_generation_args

        for c in concepts:
            validate_generation_args(c.prompts, steps=s.steps, eta=s.eta, scale=s.scale,
                                     batch_size=s.n_samples, height=s.H, width=s.W, seed=s.seed,
                                     devices=devices, precision=s.precision)
    return the_plan


def _check_folder_plans(settings: EvaluateSettings, concepts: list[Concept], checkpoints: list[Checkpoint],
                        anchor: str | None, base_sets: dict[str, list[str]]) -> None:
    """Folders generated before with other settings fail now, each named, not hours into the generation."""
    from runtime.generate import PLAN_FILE, plan_diff, plan_dict

    s = settings
    folders = []
    for c in concepts:
        prompts = _base_prompts(s, anchor, c, base_sets)
        folders.append((baseline_dir(s.base_outpath, c, prompts), prompts, "--base_outpath"))
    folders += [(ablated_dir(k, c), c.prompts, f"the eval folder of run {k.run}") for k in checkpoints for c in concepts]
    for folder, prompts, where in folders:
        plan_file = folder / PLAN_FILE
        if not plan_file.is_file():
            continue
        try:
            old = json.loads(plan_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # generate_images reports an unreadable plan with its own advice
        diff = plan_diff(old, plan_dict(prompts, s.steps, s.eta, s.scale, s.H, s.W, s.seed))
        if diff:
            raise ValueError(f"{folder} was generated with other settings (differs in: {', '.join(diff)}); delete it, "
                             f"or use another {where if where == '--base_outpath' else 'copy of the run'}")


# ---------------------------------------------------------------------------------------- stage 1
def ablated_dir(ckpt: Checkpoint, concept: Concept) -> Path:
    return ckpt.run / "eval" / f"{ckpt.path.stem}-{folder_name(concept.name)}"


def baseline_prompts(settings: EvaluateSettings, anchor: str | None, concept: Concept) -> list[str]:
    """The base model's prompts for ``concept`` (``--baseline_set``).

    ``paired`` (default): the ablated folder's own prompt list (``concept.prompts`` itself), so base image ``i``
    has the prompt and seed of ablated image ``i``. ``paper``: the original's baseline, ``4 * numgen`` images for
    every concept with each line repeated consecutively (its ``load_data``); for the target and the anchor that
    is the paired list anyway (the original, too, sampled both from the same list and seed), for a hard negative a
    separate, larger set whose first ``numgen`` images share their start noise (mostly not their prompts) with the
    ablated ones.
    """
    n = 4 * settings.numgen
    if settings.baseline_set == "paired" or anchor is None or len(concept.prompts) == n:
        return concept.prompts
    with warnings.catch_warnings():  # already warned about these lines in plan()
        warnings.simplefilter("ignore")
        lines = concept_lines(settings.concept_type, concept.name, anchor, Path(settings.eval_prompts))
    return [lines[i * len(lines) // n] for i in range(n)]


def _base_prompts(settings: EvaluateSettings, anchor: str | None, concept: Concept,
                  cache: dict[str, list[str]]) -> list[str]:
    if concept.name not in cache:
        cache[concept.name] = baseline_prompts(settings, anchor, concept)
    return cache[concept.name]


def base_prompts(plan: Plan, concept: Concept) -> list[str]:
    """:func:`baseline_prompts` of the plan's settings, computed once per concept."""
    return _base_prompts(plan.settings, plan.anchor, concept, plan.base_prompt_sets)


def baseline_dir(base_outpath: str | Path, concept: Concept, prompts: list[str]) -> Path:
    """The cache folder of the base model's images of ``concept`` made from ``prompts`` (from
    :func:`baseline_prompts`): ``base-{concept}`` for the paired set, ``base{n}-{concept}`` for the paper's."""
    name = folder_name(concept.name)
    if prompts is concept.prompts:
        return Path(base_outpath) / f"base-{name}"
    return Path(base_outpath) / f"base{len(prompts)}-{name}"  # the --baseline_set paper set


def base_dir(plan: Plan, concept: Concept) -> Path:
    return baseline_dir(plan.settings.base_outpath, concept, base_prompts(plan, concept))


def _write_prompts_json(folder: Path, prompts: list[str]) -> None:
    from runtime.files import write_text_atomic

    write_text_atomic(folder / "prompts.json",
                      json.dumps({f"{i:05d}": p for i, p in enumerate(prompts)}, indent=1) + "\n")


def _base_identity(plan: Plan) -> dict:
    from ldm.diffusers_format import source_identity

    config = hashlib.sha256(json.dumps(plan.base_config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    # size alone misses retrained weights of the same architecture written to the same path
    ident = source_identity(plan.settings.base_ckpt)  # a file, or every file of a diffusers pipeline folder
    return {"base_ckpt": ident.pop("path"), **ident, "model_config_sha256": config}


def _check_base_identity(folder: Path, ident: dict) -> None:
    meta = folder / BASE_META
    if meta.is_file():
        old = json.loads(meta.read_text(encoding="utf-8"))
        if old != ident:
            raise RuntimeError(f"{folder} caches generations of another base model ({old.get('base_ckpt')}, "
                               f"config {old.get('model_config_sha256')}); use another --base_outpath or delete it")


def _generate(factory, prompts: list[str], outdir: Path, plan: Plan, desc: str,
              shard: tuple[int, int] | None) -> None:
    from runtime.dist import local_devices
    from runtime.generate import GenerationPlanError, generate_images

    a = plan.settings
    try:
        generate_images(factory, prompts, outdir, steps=a.steps, eta=a.eta, scale=a.scale, batch_size=a.n_samples,
                        height=a.H, width=a.W, seed=a.seed, devices=local_devices(plan.devices),
                        precision=a.precision, desc=desc, shard=shard)
    except GenerationPlanError as e:
        raise GenerationPlanError(f"{e} (evaluation settings such as --numgen, --steps, --H/--W or the prompts "
                                  f"changed since this folder was generated)") from e
    _write_prompts_json(outdir, prompts)


def generate_all(plan: Plan, shard: tuple[int, int] | None = None) -> None:
    """Stage 1: the base model's images of every concept (cached across runs), then every checkpoint's.
    ``shard``: this process's share under a launcher (``runtime.dist.init_from_launcher``), None for all."""
    from runtime.loading import load_model

    base_factory = functools.partial(load_model, plan.base_config, plan.settings.base_ckpt, None)
    ident = _base_identity(plan)
    for concept in plan.concepts:  # the baseline once per concept, cached across runs
        folder = base_dir(plan, concept)
        _check_base_identity(folder, ident)
        folder.mkdir(parents=True, exist_ok=True)
        from runtime.files import write_text_atomic

        write_text_atomic(folder / BASE_META, json.dumps(ident, indent=1) + "\n")
        _generate(base_factory, base_prompts(plan, concept), folder, plan, f"base {concept.name}", shard)
    for ckpt in plan.checkpoints:
        factory = functools.partial(load_model, ckpt.model_config, plan.settings.base_ckpt, str(ckpt.path))
        for concept in plan.concepts:
            _generate(factory, concept.prompts, ablated_dir(ckpt, concept), plan, f"{ckpt.expname} {concept.name}",
                      shard)


# ---------------------------------------------------------------------------------------- stage 2
def folder_images(folder: Path, expected: int | None = None) -> list[Path]:
    """The images listed in ``folder/images.txt`` (relative to the folder), all of which must exist."""
    from runtime.files import read_text_lines

    listing = folder / "images.txt"
    if not listing.is_file():
        raise FileNotFoundError(f"{listing} not found: generate first (run without --eval_stage)")
    from runtime.files import image_is_complete

    paths = [folder / line for line in read_text_lines(listing) if line.strip()]
    missing = [p for p in paths if not p.is_file()]
    if missing or not paths:
        raise FileNotFoundError(f"{folder}: {len(missing)} of {len(paths)} listed images missing"
                                + (f", e.g. {missing[0]}" if missing else ""))
    damaged = [p for p in paths if not image_is_complete(p)]
    if damaged:
        raise ValueError(f"{folder}: {len(damaged)} image(s) are truncated or not images, e.g. {damaged[0]}; "
                         f"delete them and run without --eval_stage to regenerate them")
    if expected is not None and len(paths) != expected:
        raise ValueError(f"{folder} holds {len(paths)} images, expected {expected} (other --numgen?)")
    return paths




def compute_metrics(plan: Plan) -> dict[str, dict[str, float]]:
    """``{expname: {column: value}}`` for every checkpoint of the plan."""
    import torch

    from scoring.metrics import clip_metrics, clip_score, feature_extractor, fid, kid, load_clip
    from scoring.sscd import sscd_memorization_rate

    s = plan.settings
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clip = load_clip(plan.clip, device)
    features = feature_extractor(s.feature_model, s.feature_size, device)
    sscd = None
    if plan.concept_type == "memorization":
        from scoring.sscd import load_sscd

        sscd = load_sscd(s.sscd_ckpt, device)

    def clip_pair(images, t):
        if plan.anchor is None:
            return clip_score(clip, images, t), None
        return clip_metrics(clip, images, t, plan.anchor)

    def folder_stats(images, t):
        stats = {"clip": clip_pair(images, t), "feats": features(images)}
        if sscd is not None:
            stats["mem"] = sscd_memorization_rate(sscd, images, s.mem_impath)
        return stats

    base = {}
    for c in plan.concepts:
        base[c.name] = folder_stats(folder_images(base_dir(plan, c), len(base_prompts(plan, c))), c.name)
    results = {}
    for ckpt in plan.checkpoints:
        row = {}
        for c in plan.concepts:
            t = c.name
            abl = folder_stats(folder_images(ablated_dir(ckpt, c), len(c.prompts)), t)
            b = base[t]
            row[f"KID_{t}"] = kid(abl["feats"], b["feats"])
            row[f"FID_{t}"] = fid(abl["feats"], b["feats"])
            row[f"CLIP scores_{t}_{t}"] = abl["clip"][0]
            row[f"Baseline CLIP scores_{t}_{t}"] = b["clip"][0]
            if plan.anchor is not None:
                row[f"CLIP accuracy_{t}_{plan.anchor}"] = abl["clip"][1]
                row[f"Baseline CLIP accuracy_{t}_{plan.anchor}"] = b["clip"][1]
            if sscd is not None:
                row["Memorization rate"] = abl["mem"]
                row["Baseline memorization rate"] = b["mem"]
        results[ckpt.expname] = row
    return results


def plan_columns(plan: Plan) -> list[str]:
    cols = []
    for c in plan.concepts:
        t = c.name
        cols += [f"KID_{t}", f"FID_{t}", f"CLIP scores_{t}_{t}", f"Baseline CLIP scores_{t}_{t}"]
        if plan.anchor is not None:
            cols += [f"CLIP accuracy_{t}_{plan.anchor}", f"Baseline CLIP accuracy_{t}_{plan.anchor}"]
    if plan.concept_type == "memorization":
        cols += ["Memorization rate", "Baseline memorization rate"]
    return cols


def read_table(outpkl: Path):
    """The table of earlier evaluations: the JSON beside ``outpkl`` (``{expname: {column: value}}``).

    The pickle is never read: unpickling a file runs whatever code it holds, and ``--outpkl`` may point
    anywhere. The JSON is written together with it and is the source of truth; a pickle without its
    JSON is refused rather than silently replaced."""
    import pandas as pd

    js = outpkl.with_suffix(".json")
    if not js.is_file():
        if outpkl.exists():
            raise ValueError(f"{outpkl} exists without {js.name} beside it; it is not read (a pickle can run "
                             f"code). Move it away, or restore {js.name}, to merge new results into the table")
        return pd.DataFrame()
    try:
        rows = json.loads(js.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{js} (the results table of --outpkl) is not valid JSON: {e}") from None
    if not isinstance(rows, dict) or not all(isinstance(r, dict) for r in rows.values()) or not all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for r in rows.values()
            for v in r.values()):
        raise ValueError(f"{js} is not a results table ({{expname: {{column: number}}}})")
    df = pd.DataFrame.from_dict(rows, orient="index", dtype="float64")
    return df if len(df.columns) else pd.DataFrame(index=list(rows))


def update_table(outpkl: Path, results: dict[str, dict[str, float]]):
    """Merge ``results`` into the table of ``outpkl`` (see :func:`read_table`), save JSON + CSV + pkl."""
    import pandas as pd

    outpkl.parent.mkdir(parents=True, exist_ok=True)
    df = read_table(outpkl)
    for expname, row in results.items():
        for col, value in row.items():
            if col not in df.columns:
                df[col] = pd.Series(dtype="float64")
            df.loc[expname, col] = float(value)
    df.index.name = "expname"
    from runtime.files import write_text_atomic

    write_text_atomic(outpkl.with_suffix(".json"), df.to_json(orient="index", indent=1) + "\n")
    write_text_atomic(outpkl.with_suffix(".csv"), df.to_csv())
    tmp = outpkl.with_name(f".{outpkl.name}.tmp")
    df.to_pickle(tmp)  # for the original's readers (pd.read_pickle); never read back here
    tmp.replace(outpkl)
    return df


def chart_file(outpkl: Path, caption_target: str) -> Path:
    return outpkl.with_name(f"{outpkl.stem}_{folder_name(caption_target)}.png")


def chart_path(plan: Plan) -> Path:
    return chart_file(plan.outpkl, plan.settings.caption_target)


def plot_chart(plan: Plan, results: dict[str, dict[str, float]]) -> Path:
    """Grouped bars per concept: the baseline and every evaluated checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if plan.anchor is None:
        labels, key, base_key, ylabel = ["memorized image"], lambda t: "Memorization rate", \
            lambda t: "Baseline memorization rate", "SSCD memorization rate (lower is better)"
    else:
        # the anchor's accuracy against itself is 0 by definition (strict >): no bar for it
        labels = [c.name for c in plan.concepts if c.name != plan.anchor]
        key = lambda t: f"CLIP accuracy_{t}_{plan.anchor}"  # noqa: E731
        base_key = lambda t: f"Baseline CLIP accuracy_{t}_{plan.anchor}"  # noqa: E731
        ylabel = f"CLIP accuracy vs '{plan.anchor}'"
    concepts = [c.name for c in plan.concepts if c.name != plan.anchor][:len(labels)]
    first = next(iter(results.values()))
    series = [("baseline", [first[base_key(t)] for t in concepts])]
    series += [(name, [row[key(t)] for t in concepts]) for name, row in results.items()]
    x = np.arange(len(labels))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(labels) * len(series) ** 0.5 + 2), 4))
    for i, (name, vals) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, label=name)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{plan.concept_type}: {plan.settings.caption_target}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    out = chart_path(plan)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def execute(plan: Plan):
    """Stage 1 (unless ``--eval_stage``) and stage 2 of a checked :func:`plan`: the merged metrics table
    (a DataFrame), or None on a launcher rank other than 0 (it only generates)."""
    if not plan.settings.eval_stage:
        from runtime.dist import init_from_launcher

        # torchrun & co.: every rank generates its share of each folder; rank 0 alone scores them
        shard = init_from_launcher()
        generate_all(plan, shard)
        if shard is not None and shard[0] != 0:
            return None
    results = compute_metrics(plan)
    bad = [(e, c) for e, row in results.items() for c, v in row.items() if not math.isfinite(v)]
    if bad:
        print(f"warning: non-finite metrics: {bad[:5]}", file=sys.stderr)
    df = update_table(plan.outpkl, results)
    chart = plot_chart(plan, results)
    import pandas as pd

    with pd.option_context("display.max_rows", None, "display.width", 200, "display.float_format", "{:.4f}".format):
        print(df.loc[list(results), plan_columns(plan)].T.to_string())
    print(f"metrics -> {plan.outpkl} (+ .csv, .json); chart -> {chart}")
    return df


def run(settings: EvaluateSettings):
    """The evaluation of ``settings``: :func:`plan` (every cheap check first), then :func:`execute`.
    Returns the metrics table (a pandas DataFrame; None on a launcher rank other than 0)."""
    return execute(plan(settings))


def main(argv=None) -> int:
    """``evaluate.py``: a bad input is one ``error:`` line and exit status 2, before any work."""
    from runtime.cli import exit_on_usage_error

    execute(exit_on_usage_error(lambda: plan(parse_settings(argv))))
    return 0


if __name__ == "__main__":  # python -m evaluation.protocol (an installed copy without its bin/ on PATH)
    raise SystemExit(main())
