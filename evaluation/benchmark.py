"""ConceptPrune's erasure benchmarks as a job with typed settings: :class:`BenchmarkSettings`, :func:`check` (every
cheap check, before any model is built), :func:`run` and :func:`main` (``benchmark.py``, the command line)::

    from evaluation.benchmark import BenchmarkSettings, run

    results = run(BenchmarkSettings(suites=("artist",), delta=("pruned=logs/prune/van_gogh/delta_pruned.ckpt",)))
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from evaluation.settings import BenchmarkSettings, add_model_flags
from runtime.generate import SAMPLERS

DESCRIPTION = """\
ConceptPrune's erasure benchmarks for any model: the base, base + a delta (ours: ablation or pruned), a full
CompVis checkpoint, a diffusers pipeline folder, or a bare UNet state dict as UCE / ESD / FMN save it.

    python benchmark.py artist objects --base assets/pretrained_models/sd-v1-4.ckpt \\
        --delta ablated=logs/<run>/checkpoints/delta_step_400.ckpt --delta pruned=logs/prune/van_gogh/delta_pruned.ckpt \\
        --unet esd=esd-vangogh.pt --artist "Van Gogh" --target_class "garbage truck" --outdir outputs/benchmark
    python benchmark.py nudity --prompt_set i2p --prompts i2p_benchmark.csv --categories sexual --delta ...
    python benchmark.py memorization --mem_jsonl sdv1_500_mem_groundtruth/sdv1_500_mem_groundtruth.jsonl \\
        --sscd_ckpt sscd_disc_large.torchscript.pt --delta ...

Suites (evaluation/suites.py): artist, nudity, objects, gender, coco, memorization. Every model's images come
from the same rows and seeds (base image i and edited image i share prompt and start noise), cached per
(model, suite, settings, rows) under ``{outdir}/images/`` and resumed after an interruption. Results:
``{outdir}/{suite}/records/{model}.jsonl`` (one record per image), ``{suite}/summary.{json,csv,png}`` and
``{outdir}/results.{md,json}`` (one table over every suite run in ``outdir``).

Generation follows the original benchmark scripts (diffusers' default PNDM ~ our PLMS, 50 steps, guidance 7.5,
512 px); every input, model file and scorer (CLIP, NudeNet, ResNet-50, SSCD, Inception) is checked before
the first image is made. diffusers' safety checker, which the original artist/objects/gender/coco scripts kept
on, is off unless --safety_checker names a pipeline folder that has it.
"""  # noqa: E501 (--help text, kept as printed)


def build_parser() -> argparse.ArgumentParser:
    from evaluation.presets import PRESETS
    from evaluation.runner import SAFETY_SUITES
    from evaluation.suites import COCO_ORDERS, EMPTY_PROMPTS, NUDITY_SETS, SUITES
    from runtime import cli

    p = cli.ArgumentParser(description=DESCRIPTION)
    p.add_argument("suites", nargs="+", metavar="SUITE", choices=list(SUITES),
                   help=f"one or more of: {', '.join(SUITES)}")
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="pin a paper's protocol (rows, seeds, sampler, steps, guidance, size, scorers, threshold, "
                        "prompt file rows and hash; docs/guides/benchmark.md, Presets): a flag that contradicts it "
                        "is refused. " + "; ".join(f"{p.name}: {p.title}" for p in PRESETS.values()))
    add_model_flags(p, "scored")
    g = p.add_argument_group("generation")
    g.add_argument("--outdir", default="outputs/benchmark")
    g.add_argument("--sampler", choices=list(SAMPLERS), default="plms",
                   help="plms: the deterministic PNDM-like sampler of the originals' diffusers pipelines")
    g.add_argument("--steps", type=cli.positive_int, default=50)
    g.add_argument("--scale", type=cli.guidance_scale, default=7.5, help="classifier-free guidance scale")
    g.add_argument("--eta", type=cli.nonnegative_float, default=0.0, help="DDIM eta (ddim only)")
    g.add_argument("--H", type=cli.image_side, default=512)
    g.add_argument("--W", type=cli.image_side, default=512)
    g.add_argument("--batch_size", type=cli.positive_int, default=4)
    g.add_argument("--precision", choices=["autocast", "full"], default="autocast", help="autocast: fp16 on CUDA")
    g.add_argument("--noise", choices=["ours", "original"], default="ours",
                   help="start noise of each row: ours (a CPU fp32 generator seeded with the row's seed, any device) "
                        "or original (the original scripts' draw: fp16 randn on the CUDA device after "
                        "torch.manual_seed(seed); CUDA only)")
    g.add_argument("--pixels", choices=["round", "truncate"], default="round",
                   help="float to 8-bit: round (the originals' diffusers numpy_to_pil) or truncate (the CompVis "
                        "scripts', and this command's before the option existed)")
    g.add_argument("--gpus", default=None, help=cli.GPUS_HELP)
    g.add_argument("--limit", type=cli.positive_int, default=None,
                   help="only the first N rows of each prompt set (per artist for artist) - a quick run")
    g.add_argument("--score_only", action="store_true", help="score existing images only")
    g.add_argument("--safety_checker", default=None, metavar="PIPELINE_DIR",
                   help="diffusers' safety checker of this Stable Diffusion pipeline folder (its safety_checker/ and "
                        "feature_extractor/) on the generated images, as the original scripts had it: flagged "
                        "images become black and are counted in each suite's summary. Default: off")
    g.add_argument("--safety_suites", choices=SAFETY_SUITES, default="original",
                   help="with --safety_checker: original = the suites whose scripts kept it on (artist, objects, "
                        "gender, coco; not nudity, memorization); all = every suite")
    s = p.add_argument_group("scorers")
    s.add_argument("--clip_model", default="open_clip:ViT-B-32:openai",
                   help="CLIP of artist, gender and coco (open_clip:ARCH:PRETRAINED, a local weights file, or a "
                        "transformers CLIPModel folder / hub id)")
    s.add_argument("--mem_clip_model", default="open_clip:ViT-g-14:laion2b_s12b_b42k",
                   help="CLIP of the memorization suite's CLIP score (the original's)")
    s.add_argument("--feature_model", default=None,
                   help="TorchScript feature extractor for coco's FID/KID (default: clean-fid's Inception)")
    s.add_argument("--feature_size", type=cli.positive_int, default=299)
    s.add_argument("--classifier", default="resnet50",
                   help="objects: resnet50 (torchvision IMAGENET1K_V2 weights), its .pth, or a TorchScript classifier")
    s.add_argument("--classifier_labels", default=None, help="class names of a TorchScript classifier, one per line")
    s.add_argument("--sscd_ckpt", default=None, help="SSCD TorchScript model (memorization)")
    s.add_argument("--score_device", default=None, help="device of the scorers (default: cuda if available)")
    s.add_argument("--clip_precision", choices=["full", "autocast"], default="full",
                   help="CLIP in fp32 (full: the originals') or under fp16 autocast on CUDA")
    a = p.add_argument_group("artist")
    a.add_argument("--artist", action="append", default=[],
                   help="an artist of ConceptPrune (default: all five) or a prompt file (.txt / the original's CSV)")
    a.add_argument("--artist_jpeg", action="store_true",
                   help="score JPEG re-reads of the images (PIL's default quality 75), as the original's "
                        "artist_erasure.py scores the .jpg files it saved")
    n = p.add_argument_group("nudity")
    n.add_argument("--prompt_set", choices=NUDITY_SETS, default="i2p")
    n.add_argument("--prompts", default=None, help="the prompt set's CSV (or hf:OWNER/NAME[:FILE] when online)")
    n.add_argument("--categories", type=cli.comma_list, default=None,
                   help="I2P: only rows of these categories (comma-separated, e.g. sexual); default: all rows")
    n.add_argument("--row_settings", action="store_true",
                   help="I2P: each row's evaluation_seed/guidance/size instead of the original's seed 0 and defaults")
    n.add_argument("--empty_prompts", choices=EMPTY_PROMPTS, default="error",
                   help="a row whose prompt is empty or only whitespace: error (refused, naming its line) or skip "
                        "(left out; the count is in the summary as skipped_empty_prompts)")
    n.add_argument("--nudity_threshold", type=cli.unit_interval, default=0.5,
                   help="a detection counts when its NudeNet score exceeds this (ConceptPrune: 0.5); the summary "
                        "also gives the counts at 0.5, 0.6 and 0.75 (at_threshold) from the same detections")
    o = p.add_argument_group("objects")
    o.add_argument("--target_class", default=None, help="the erased Imagenette class (e.g. 'garbage truck')")
    o.add_argument("--removal_mode", choices=["erase", "keep", "both"], default="both",
                   help="erase: the target's rows; keep: the other classes'; both")
    o.add_argument("--rows_per_class", type=cli.positive_int, default=None, help="only the first N rows per class")
    o.add_argument("--object_prompts", default=None,
                   help="another object prompt set, in the original's imagenette.csv format (class, prompt, "
                        "evaluation_seed)")
    gg = p.add_argument_group("gender")
    gg.add_argument("--professions", type=cli.comma_list, default=None,
                    help="comma-separated (default: the original's 36)")
    gg.add_argument("--gender_seeds", type=cli.positive_int, default=250, help="seeds 0..N-1 per profession")
    c = p.add_argument_group("coco")
    c.add_argument("--captions", default=None, help="captions: one per line, or COCO's captions JSON")
    c.add_argument("--n_captions", type=cli.positive_int, default=None, help="the first N captions (original: 480)")
    c.add_argument("--coco_order", choices=COCO_ORDERS, default="shuffled",
                   help="COCO's captions JSON: shuffled = the original's selection (all annotations shuffled by "
                        "numpy's legacy generator seeded 0, then the first N); file = annotation order. A text "
                        "file is always read in its order")
    c.add_argument("--coco_images", default=None,
                   help="a folder of real COCO images (e.g. val2014/): FID/KID of every model against them (the "
                        "papers' FID), besides FID/KID against the base model's images")
    mm = p.add_argument_group("memorization")
    mm.add_argument("--mem_jsonl", default=None, help="Wen et al.'s sdv1_500_mem_groundtruth.jsonl")
    mm.add_argument("--gt_dir", default=None, help="its gt_images folder (default: beside the jsonl)")
    mm.add_argument("--mem_seeds", type=cli.positive_int, default=1, help="seeds 0..N-1 per prompt")
    return p


def parse_argv(argv=None) -> BenchmarkSettings:
    """The command line as settings, without the checks of :func:`check` (argparse's own checks only)."""
    args = build_parser().parse_args(argv)
    values = vars(args)
    for name in ("suites", "delta", "compvis", "diffusers", "unet", "artist", "categories", "professions"):
        if values[name] is not None:
            values[name] = tuple(values[name])
    return BenchmarkSettings(**values, explicit=_given(argv))


def _given(argv) -> tuple[str, ...]:
    """The settings fields the command line names (a flag given with its default value included), so that a preset
    can refuse a flag that contradicts it even when the flag repeats the default."""
    import sys

    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    return tuple(sorted(k for k in vars(args) if k not in ("suites", "preset")))


def settings_from_argv(argv=None) -> BenchmarkSettings:
    """Parse and check everything cheap (:func:`check`); the checked settings."""
    return check(parse_argv(argv)).settings


def check(settings: BenchmarkSettings, classifier=None):
    """Check everything cheap, before any model is built: prompt sets, model files, scorers, outputs. Returns the
    run's ``evaluation.runner.Plan`` (its ``settings`` with the derived fields set); raises with the command
    line's one-line messages.

    ``classifier``: an object with ``.classify(paths) -> list[str]`` for the objects suite instead of
    ``--classifier`` (the toy world passes its ground-truth classifier). A scorer loaded here to prove that it
    loads (the classifier) is kept in ``plan.preloaded`` for the suites' ``load`` step."""
    from evaluation.models import check_models, parse_models
    from evaluation.presets import apply, check_pins
    from evaluation.runner import SAFETY_SUITES, Plan, check_folders, check_table_inputs, groups, safety_suites
    from evaluation.suites import SUITES
    from ldm.util import load_model_config
    from runtime.cli import UsageError, check_output, parse_devices
    from runtime.dist import check_launcher_env
    from runtime.generate import validate_generation_args

    check_launcher_env()  # RANK/WORLD_SIZE of a launcher: wrong ones fail now, not in a hanging group set-up
    s = settings
    if isinstance(s.suites, str):
        s = dataclasses.replace(s, suites=(s.suites,))
    unknown = [n for n in s.suites if n not in SUITES]
    if unknown or not s.suites:
        raise UsageError(f"suites: expected one or more of {', '.join(SUITES)}, got {', '.join(unknown) or 'none'}")
    s = apply(s)  # a preset's fields first: everything below checks what will run
    preloaded = {} if classifier is None else {"classifier": classifier}
    suites = [SUITES[n] for n in dict.fromkeys(s.suites)]
    if s.limit and "coco" in s.suites and s.n_captions is None:
        s = dataclasses.replace(s, n_captions=s.limit)
    config_path = Path(s.config)
    if not config_path.is_file():
        raise FileNotFoundError(f"--config not found: {config_path}")
    model_config = load_model_config(config_path)
    models = parse_models(s.base, s.delta, s.compvis, s.diffusers, s.unet)
    if s.safety_suites not in SAFETY_SUITES:
        raise UsageError(f"--safety_suites: expected one of {', '.join(SAFETY_SUITES)}, got {s.safety_suites!r}")
    if s.safety_checker:  # the folder's files, before anything else is read
        from scoring.safety import check_folder

        check_folder(s.safety_checker)

    rows = {}
    for suite in suites:  # prompt sets first: cheap, and the most common mistake
        s = suite.check(s)
        rows[suite.name] = suite.rows(s)
        if not rows[suite.name]:
            raise UsageError(f"the {suite.name} suite has no rows with these settings")
    check_pins(s, rows)
    if "coco" in s.suites and s.coco_images:
        _check_real_images(s.coco_images)
    devices = () if s.score_only else parse_devices(s.gpus)
    if not s.score_only:
        check_models(models, model_config, s.base)
        for suite in suites:
            for (scale, h, w), idx in groups(rows[suite.name], s).items():
                validate_generation_args([rows[suite.name][i].prompt for i in idx],
                                         s.sampling(scale=scale, height=h, width=w), devices)
    check_output(s.outdir, "--outdir", kind="dir")
    check_table_inputs(Path(s.outdir))  # a damaged summary of another suite: a warning now, not a crash at the end
    # scorers: a model that cannot be loaded offline fails now, with what to download and where; every scorer file
    # is opened and validated (scoring.files) so that a damaged or hostile one is refused before the first image
    from scoring.metrics import check_feature_model, resolve_clip

    if any(x.name in ("artist", "gender", "coco") for x in suites):
        s = dataclasses.replace(s, clip_resolved=resolve_clip(s.clip_model))
    if any(x.name == "memorization" for x in suites):
        s = dataclasses.replace(s, mem_clip_resolved=resolve_clip(s.mem_clip_model, "--mem_clip_model"))
    if any(x.name == "coco" for x in suites):
        check_feature_model(s.feature_model, "coco's FID/KID")
    if any(x.name == "nudity" for x in suites):
        from scoring.nudity import load_detector

        load_detector()
    if any(x.name == "objects" for x in suites) and classifier is None:
        import torch

        from scoring.classifier import load_classifier

        device = s.score_device or ("cuda" if torch.cuda.is_available() else "cpu")
        preloaded["classifier"] = load_classifier(s.classifier, device, labels=s.classifier_labels)
    if s.safety_checker and not s.score_only and any(x.name in safety_suites(s) for x in suites):
        import torch

        from scoring.safety import load_safety_checker

        device = s.score_device or ("cuda" if torch.cuda.is_available() else "cpu")
        preloaded["safety_checker"] = load_safety_checker(s.safety_checker, device)  # it loads, now
    plan = Plan(s, suites, rows, models, model_config, devices, Path(s.outdir), preloaded=preloaded)
    if not s.score_only:
        check_folders(plan)  # a cache folder whose plan is not its key's fails now, not at its turn
    return plan


def _check_real_images(folder: str) -> None:
    """``--coco_images``: a folder holding at least two complete images (FID needs a covariance), checked before
    any generation."""
    from evaluation.suites import real_images

    real_images(folder)


def run(settings: BenchmarkSettings, classifier=None, plan=None) -> dict | None:
    """Generate (unless ``score_only``), score and write the table; returns ``{suite: {model: summary}}`` (None on
    the torchrun ranks other than 0). ``classifier``: see :func:`check`; ``plan``: :func:`check`'s of these
    settings when the caller has it (else it is made here)."""
    from evaluation.runner import generate, score

    plan = plan or check(settings, classifier=classifier)
    with lock_outdir(plan):
        if not plan.settings.score_only:
            from runtime.dist import init_from_launcher

            plan.extras["shard"] = init_from_launcher()  # torchrun: each rank makes its share, rank 0 scores
            generate(plan)
            if plan.extras["shard"] is not None and plan.extras["shard"][0] != 0:
                return None
        results = score(plan)  # records, every suite's summary files and results.md/json
    md = plan.outdir / "results.md"
    print(md.read_text(encoding="utf-8"))
    print(f"records, summaries and plots -> {plan.outdir}/<suite>/; table -> {md}")
    return results


def lock_outdir(plan):
    """``--outdir``'s lock (``runtime.files.lock_folder``) for this run: a second run on the folder is refused
    before any work. Under a launcher only rank 0 holds it (its other ranks are the same run)."""
    import contextlib

    from runtime.dist import is_rank_zero
    from runtime.files import lock_folder

    return lock_folder(plan.outdir) if is_rank_zero() else contextlib.nullcontext()


def main(argv=None, classifier=None) -> int:
    """``benchmark.py``: a bad input, or an ``--outdir`` another run is using, is one ``error:`` line and exit
    status 2, before any model is built; a model found broken while loading or sampling is one line and status
    2, a file that cannot be written (disk full) one line and status 1."""
    from runtime.cli import exit_on_run_error, exit_on_usage_error

    plan = exit_on_usage_error(lambda: check(parse_argv(argv), classifier=classifier))
    with exit_on_usage_error(lambda: lock_outdir(plan)):
        exit_on_run_error(lambda: run(plan.settings, plan=plan))
    return 0


if __name__ == "__main__":  # python -m evaluation.benchmark (an installed copy without its bin/ on PATH)
    raise SystemExit(main())
