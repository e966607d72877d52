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
concept. One JSON line per image in ``{outpkl stem}_records/{concept}/{expname}.jsonl`` (the base's:
``base.jsonl``): id, prompt, seed, image, ``clip_score`` (vs the concept's text), ``anchor_clip_score`` (vs the
anchor's; CLIP accuracy counts the images where the first is higher) and, for memorization,
``sscd_similarity``. Every output location is checked before any generation.

Both stages run on ``evaluation.runner`` (the benchmark's runner): each concept is a suite whose rows are its
prompts, the base and every checkpoint are models, the metrics are the suites' scoring step, and
:class:`Folders` is the runner's layout: the folders above, and the table, its merge and the chart as its table
writer.

Differences from the reference, on purpose: FID is reported beside KID; KID is a
float, not a one-element list; ``prompts.json`` goes into the folder it describes; the output folder
is created; the base folder holds the same prompts and seeds as the ablated one (the CompVis code made
``4 * numgen`` base images for every concept: ``--baseline_set paper``, folders ``base{4 numgen}-{concept}``
for the hard negatives); ``--filter`` matches delta checkpoints.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.generate import Sampling

from evaluation.runner import Layout
from runtime.resources import DEFAULT_BASE_CKPT, asset_path

PROMPT_DIR = asset_path("eval_prompts")
CKPT_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")  # .bin: Concept Ablation's delta.bin
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

    def sampling(self) -> Sampling:
        """The sampler settings of every generated folder (DDIM, ``n_samples`` images per batch)."""
        from runtime.generate import Sampling

        return Sampling(steps=self.steps, eta=self.eta, scale=self.scale, height=self.H, width=self.W,
                        batch_size=self.n_samples, seed=self.seed, precision=self.precision)


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
    p.add_argument("--scale", type=cli.guidance_scale, default=d["scale"], help="classifier-free guidance scale")
    p.add_argument("--seed", type=cli.seed_int, default=d["seed"])
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
    from ldm.util import load_model_config

    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    return load_model_config(path)



def _check_values(settings: EvaluateSettings) -> None:
    """The command line's type and choice rules, for settings built in Python (parsed ones always pass)."""
    import argparse as _argparse

    from runtime import cli

    rules = {"numgen": cli.positive_int, "feature_size": cli.positive_int, "steps": cli.positive_int,
             "eta": cli.nonnegative_float, "scale": cli.guidance_scale, "seed": cli.seed_int,
             "H": cli.image_side, "W": cli.image_side, "n_samples": cli.positive_int}
    for name, rule in rules.items():
        value = getattr(settings, name)
        if isinstance(value, bool) or (rule in (cli.positive_int, cli.nonnegative_int, cli.image_side, cli.seed_int)
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
    from runtime.dist import check_launcher_env
    from runtime.loading import check_checkpoints, check_delta, resolve_model

    check_launcher_env()  # RANK/WORLD_SIZE of a launcher: wrong ones fail now, not in a hanging group set-up
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
        from scoring.sscd import check_sscd

        sscd_ckpt = str(check_sscd(s.sscd_ckpt))  # loaded once now: a damaged file fails before any image
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
        config_path = resolve_model(s.config, path).config  # the run's own config, else SD v1's
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
            raise ValueError("the runs under --root were trained on different bases "
                             f"({', '.join(sorted(map(str, bases)))}); "
                             f"pass --base_ckpt, or evaluate them one by one")
        base_ckpt = bases.pop() or str(DEFAULT_BASE_CKPT)
    outpkl_name = s.outpkl if s.outpkl is not None else str(Path(s.root) / "metrics" / "evaluation.pkl")
    s = replace(s, sscd_ckpt=sscd_ckpt, base_ckpt=base_ckpt, outpkl=outpkl_name)
    if not s.eval_stage:
        from ldm.checkpoint import require_checkpoint

        require_checkpoint(s.base_ckpt, "--base_ckpt", pipelines=True)
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
    check_output(records_dir(outpkl), "the records folder (from --outpkl)", kind="dir")
    read_table(outpkl)  # an earlier table that cannot be merged fails now, not after the metrics
    if not s.eval_stage:
        check_output(s.base_outpath, "--base_outpath", kind="dir")
        for run in dict.fromkeys(c.run for c in checkpoints):
            check_output(run / "eval", f"the eval folder of run {run}", kind="dir")

    # metric models: fail now, not after hours of generation
    from scoring.metrics import check_feature_model, resolve_clip

    clip = resolve_clip(s.clip_model)  # a missing model fails here, not after the generation
    check_feature_model(s.feature_model)

    devices = () if s.eval_stage else parse_devices(s.gpus)
    the_plan = Plan(s, target, anchor, concepts, checkpoints, base_config, devices, outpkl, clip)
    rp = runner_plan(the_plan)
    if s.eval_stage:  # metrics only: every generation must be there now, not after CLIP has loaded
        from evaluation.runner import images_of

        for suite in rp.suites:
            for spec in rp.models:
                images_of(rp, suite.name, spec)
    else:
        from evaluation.runner import check_folders
        from runtime.generate import validate_generation_args

        check_folders(rp)  # folders generated with other settings fail now, each named
        for c in concepts:
            validate_generation_args(c.prompts, s.sampling(), devices)
    return the_plan


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


def base_prompts(plan: Plan, concept: Concept) -> list[str]:
    """:func:`baseline_prompts` of the plan's settings, computed once per concept."""
    if concept.name not in plan.base_prompt_sets:
        plan.base_prompt_sets[concept.name] = baseline_prompts(plan.settings, plan.anchor, concept)
    return plan.base_prompt_sets[concept.name]


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
    """Refuse to reuse ``folder`` when its ``base_model.json`` names another base model than ``ident``
    (RuntimeError) or is damaged (``runtime.files.DamagedFileError``: which base made the images is then unknown)."""
    from runtime.files import read_json

    meta = folder / BASE_META
    if meta.exists():
        old = read_json(meta, "the base-model record", f"which base model made the images of {folder} is unknown: "
                                                       f"delete that folder, or use another --base_outpath")
        if old != ident:
            raise RuntimeError(f"{folder} caches generations of another base model ({old.get('base_ckpt')}, "
                               f"config {old.get('model_config_sha256')}); use another --base_outpath or delete it")


# ---------------------------------------------------------------------------------------- on the runner
def _rows(prompts: list[str], seed: int) -> list:
    from evaluation.prompt_sets import Row

    return [Row(f"{i:05d}", p, seed + i) for i, p in enumerate(prompts)]  # image i: seed + i, as ever


def runner_plan(plan: Plan):
    """The protocol as an ``evaluation.runner.Plan``: one suite per concept (its rows: the concept's prompts,
    image ``i`` seeded ``seed + i``), the base and every checkpoint as models (base + delta, each on its run's
    config), evaluate.py's folders as the layout (:class:`Folders`) and the protocol's metrics as the suites'
    scoring step."""
    from evaluation.models import ModelSpec
    from evaluation.runner import Plan as RunnerPlan
    from evaluation.settings import BenchmarkSettings

    s = plan.settings
    # the runner's settings: what it reads to generate (the paper's DDIM) and where it scores (cuda if available)
    sampling = BenchmarkSettings(suites=tuple(c.name for c in plan.concepts), base=s.base_ckpt, sampler="ddim",
                                 steps=s.steps, scale=s.scale, eta=s.eta, H=s.H, W=s.W, batch_size=s.n_samples,
                                 precision=s.precision, pixels="truncate")  # the CompVis scripts' pixels
    # runner names (any run folder name is an expname; a model name is letters, digits and ._+- only)
    models = [ModelSpec("base", "base", None)]
    models += [ModelSpec(f"checkpoint-{i}", "delta", str(k.path)) for i, k in enumerate(plan.checkpoints)]
    layout = Folders(plan, {m.name: k for m, k in zip(models[1:], plan.checkpoints)})
    suites = [_concept_suite(plan, c) for c in plan.concepts]
    rows = {c.name: _rows(c.prompts, s.seed) for c in plan.concepts}
    base_rows = {c.name: _rows(base_prompts(plan, c), s.seed) for c in plan.concepts
                 if base_prompts(plan, c) is not c.prompts}
    return RunnerPlan(sampling, suites, rows, models, plan.base_config, plan.devices, plan.outpkl.parent,
                      layout=layout, configs={m.name: k.model_config for m, k in zip(models[1:], plan.checkpoints)},
                      base_rows=base_rows)


class Folders(Layout):
    """evaluate.py's folders on the runner: the base model's images of a concept in ``{base_outpath}/base-{concept}/``
    (``base{n}-`` for ``--baseline_set paper``; ``base_model.json`` names the base they were made with, checked
    before a folder is reused), a checkpoint's in ``{run}/eval/{ckpt stem}-{concept}/``; ``prompts.json`` beside
    the images; the folders' plans record ``--seed`` (image ``i``: ``seed + i``); the table is evaluate.py's
    (:meth:`table`)."""

    per_row_seeds = False
    flag = "--eval_stage"

    def __init__(self, plan: Plan, checkpoints: dict[str, Checkpoint]):
        # plan: the protocol's; checkpoints: by runner model name
        self.plan, self.checkpoints, self._ident = plan, checkpoints, None
        self.concepts = {c.name: c for c in plan.concepts}

    def folders(self, plan, suite, spec):
        concept = self.concepts[suite]
        s = self.plan.settings
        if spec.kind == "base":
            folder = base_dir(self.plan, concept)
        else:
            folder = ablated_dir(self.checkpoints[spec.name], concept)
        return [(folder, {"scale": float(s.scale), "height": s.H, "width": s.W},
                 list(range(len(plan.rows_of(suite, spec)))))]

    def prepare(self, plan, suite, spec, folder, ident):
        if spec.kind != "base":
            return
        from runtime.files import write_text_atomic

        _check_base_identity(folder, self._base_identity())
        write_text_atomic(folder / BASE_META, json.dumps(self._ident, indent=1) + "\n")

    def check_folder(self, plan, spec, folder):
        if spec.kind == "base":  # a base folder made by another base, or with a damaged record: now, not mid-run
            _check_base_identity(folder, self._base_identity())

    def _base_identity(self) -> dict:
        if self._ident is None:
            self._ident = _base_identity(self.plan)
        return self._ident

    def finish(self, plan, suite, spec, folder, prompts):
        _write_prompts_json(folder, prompts)

    def desc(self, suite, spec):
        return f"{'base' if spec.kind == 'base' else self.checkpoints[spec.name].expname} {suite}"

    def stale(self, folder):
        return ("evaluation settings such as --numgen, --steps, --H/--W or the prompts changed since this folder was "
                "generated")

    def remedy(self, spec):
        return f"delete it, or use another {'--base_outpath' if spec.kind == 'base' else 'copy of the run'}"

    def records(self, plan, suite, spec):
        name = "base" if spec.kind == "base" else self.checkpoints[spec.name].expname
        return records_dir(self.plan.outpkl) / folder_name(suite) / f"{name}.jsonl"

    def save_summary(self, plan, suite, spec, summary):
        """Nothing: evaluate.py's table (:meth:`table`) merges its rows into the JSON beside ``--outpkl``."""

    def table(self, rp, results):
        """Every checkpoint's row (``{expname: {column: value}}``, its concepts' columns concept by concept) merged
        into the table beside ``--outpkl`` (:func:`update_table`), the chart, the table on stdout; returns the
        merged table (a DataFrame)."""
        import pandas as pd

        plan = self.plan
        rows = {k.expname: {col: v for c in plan.concepts for col, v in results[c.name][name].items()}
                for name, k in self.checkpoints.items()}
        bad = [(e, c) for e, row in rows.items() for c, v in row.items() if not math.isfinite(v)]
        if bad:
            print(f"warning: non-finite metrics: {bad[:5]}", file=sys.stderr)
        df = update_table(plan.outpkl, rows)
        chart = plot_chart(plan, rows)
        with pd.option_context("display.max_rows", None, "display.width", 200, "display.float_format",
                               "{:.4f}".format):
            print(df.loc[list(rows), plan_columns(plan)].T.to_string())
        print(f"metrics -> {plan.outpkl} (+ .csv, .json); chart -> {chart}")
        return df


def _concept_suite(plan: Plan, concept: Concept):
    """The protocol's metrics of one concept ``t`` as a runner suite. Summary of a checkpoint: ``KID_{t}``,
    ``FID_{t}`` (against the base's images), ``CLIP scores_{t}_{t}`` and ``CLIP accuracy_{t}_{anchor}`` with their
    ``Baseline`` twins, and for memorization ``Memorization rate`` / ``Baseline memorization rate``; of the base:
    its own statistics."""
    from evaluation.suites import Suite

    t, anchor, mem_impath = concept.name, plan.anchor, plan.settings.mem_impath

    def stats(scorers, images):
        # scoring.metrics.clip_metrics / clip_score and scoring.sscd.sscd_memorization_rate step by step, to keep
        # the per-image values for the records
        from scoring.metrics import accuracy_from_scores, clip_scores, clip_text

        texts = [clip_text(t, anchor)] + ([] if anchor is None else [clip_text(anchor, anchor)])
        per = clip_scores(scorers["clip"], images, texts)
        accuracy = None if anchor is None else accuracy_from_scores(per[:, 0], per[:, 1])
        out = {"clip": (float(per[:, 0].mean()), accuracy), "feats": scorers["features"](images),
               "per": {"clip_score": per[:, 0].tolist()}}
        if anchor is not None:
            out["per"]["anchor_clip_score"] = per[:, 1].tolist()
        if "sscd" in scorers:
            from scoring.sscd import memorization_rate, similarities

            sims = similarities(scorers["sscd"], images, mem_impath)
            out["mem"], out["per"]["sscd_similarity"] = memorization_rate(sims, 0.5), sims.tolist()
        return out

    def score(ctx, rows, images, base_images):
        from scoring.metrics import fid, kid

        own = stats(ctx.scorers, images)
        b = ctx.of_base("protocol", base_images, lambda: stats(ctx.scorers, base_images), own=own)
        records = [{"id": r.id, "prompt": r.prompt, "seed": r.seed, "image": str(p),
                    **{k: v[i] for k, v in own["per"].items()}} for i, (r, p) in enumerate(zip(rows, images))]
        if ctx.is_base:  # scored first: its statistics are now the baseline of every checkpoint (of_base)
            return records, {}
        summary = {f"KID_{t}": kid(own["feats"], b["feats"]), f"FID_{t}": fid(own["feats"], b["feats"]),
                   f"CLIP scores_{t}_{t}": own["clip"][0], f"Baseline CLIP scores_{t}_{t}": b["clip"][0]}
        if anchor is not None:
            summary[f"CLIP accuracy_{t}_{anchor}"] = own["clip"][1]
            summary[f"Baseline CLIP accuracy_{t}_{anchor}"] = b["clip"][1]
        if "mem" in own:
            summary["Memorization rate"] = own["mem"]
            summary["Baseline memorization rate"] = b["mem"]
        return records, summary

    return Suite(t, rows=lambda _: _rows(concept.prompts, plan.settings.seed), check=lambda settings: settings,
                 load=lambda settings, device, preloaded: preloaded, score=score, metrics=(),
                 doc=f"evaluate.py's protocol: concept {t!r}")


def load_scorers(plan: Plan, device: str) -> dict:
    """The protocol's metric models, loaded once for every concept: CLIP, the KID/FID feature extractor and, for
    memorization, SSCD."""
    from scoring.metrics import feature_extractor, load_clip

    s = plan.settings
    # Concept Ablation's evaluate.py runs OpenAI CLIP with fp16 weights on CUDA: autocast is the nearest we have
    scorers = {"clip": load_clip(plan.clip, device, precision="autocast"),
               "features": feature_extractor(s.feature_model, s.feature_size, device)}
    if plan.concept_type == "memorization":
        from scoring.sscd import load_sscd

        scorers["sscd"] = load_sscd(s.sscd_ckpt, device)
    return scorers


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
    from runtime.files import atomic_target, write_text_atomic

    write_text_atomic(outpkl.with_suffix(".json"), df.to_json(orient="index", indent=1) + "\n")
    write_text_atomic(outpkl.with_suffix(".csv"), df.to_csv())
    with atomic_target(outpkl) as tmp:
        df.to_pickle(tmp, compression=None)  # for the original's readers (pd.read_pickle); never read back here
    return df


def records_dir(outpkl: Path) -> Path:
    """The per-image records beside ``outpkl``: ``{stem}_records/{concept}/{expname or base}.jsonl``."""
    return outpkl.with_name(f"{outpkl.stem}_records")


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
    from runtime.files import save_figure_atomic

    try:
        save_figure_atomic(fig, out, dpi=100)
    finally:
        plt.close(fig)
    return out


def execute(plan: Plan):
    """Stage 1 (unless ``--eval_stage``) and stage 2 of a checked :func:`plan`: the merged metrics table
    (a DataFrame), or None on a launcher rank other than 0 (it only generates)."""
    import torch

    from evaluation.runner import generate, score

    rp = runner_plan(plan)
    with lock_outputs(plan):
        if not plan.settings.eval_stage:
            from runtime.dist import init_from_launcher

            # torchrun & co.: every rank generates its share of each folder; rank 0 alone scores them
            shard = rp.extras["shard"] = init_from_launcher()
            generate(rp)  # the base's images of every concept (cached across runs), then every checkpoint's
            if shard is not None and shard[0] != 0:
                return None
        rp.preloaded.update(load_scorers(plan, "cuda" if torch.cuda.is_available() else "cpu"))
        return score(rp)  # Folders.table: the merged table, the chart and the printout


def lock_outputs(plan: Plan):
    """The lock of ``--outpkl``'s folder (``runtime.files.lock_folder``): its table is read, merged and written
    back, so a second evaluation writing there at the same time would lose the first one's rows; it is refused
    before any work instead. Under a launcher only rank 0 holds it."""
    import contextlib

    from runtime.dist import is_rank_zero
    from runtime.files import lock_folder

    return lock_folder(plan.outpkl.parent) if is_rank_zero() else contextlib.nullcontext()


def run(settings: EvaluateSettings):
    """The evaluation of ``settings``: :func:`plan` (every cheap check first), then :func:`execute`.
    Returns the metrics table (a pandas DataFrame; None on a launcher rank other than 0)."""
    return execute(plan(settings))


def main(argv=None) -> int:
    """``evaluate.py``: a bad input, or an output folder another evaluation is using, is one ``error:`` line and
    exit status 2, before any work; a model found broken while loading or sampling is one line and status 2, a
    file that cannot be written (disk full) one line and status 1."""
    from runtime.cli import exit_on_run_error, exit_on_usage_error

    the_plan = exit_on_usage_error(lambda: plan(parse_settings(argv)))
    with exit_on_usage_error(lambda: lock_outputs(the_plan)):
        exit_on_run_error(lambda: execute(the_plan))
    return 0


if __name__ == "__main__":  # python -m evaluation.protocol (an installed copy without its bin/ on PATH)
    raise SystemExit(main())
