"""Sample images from Stable Diffusion v1, optionally with an ablation (or pruning) delta on top.

    python sample.py --ckpt assets/pretrained_models/sd-v1-4.ckpt \\
        --delta_ckpt logs/<run>/checkpoints/delta_step_100.ckpt --prompt "a painting in the style of van gogh"

Output: ``{outdir}/samples/NNNNN.png`` (numbering continues after existing files), a grid image
``{outdir}/{prompt}_{ckpt}_{scale}_{sampler}_{steps}_{eta}.jpg`` and, with ``--metadata``,
``images.txt``/``caption.txt`` lines appended in ``{outdir}``. A checkpoint inside a training run
(``{run}/checkpoints/``) uses that run's saved config; ``--outdir`` defaults to that run's folder.
Image ``i`` of a call is seeded ``seed + i`` (noise per image): a rerun with the same ``--n_samples`` is
bit-identical, and another ``--n_samples`` or number of GPUs changes pixels only by float rounding
(kernels depend on the batch shape: some pixels move by one 1/255 step).

Images are generated into ``{outdir}/.staging-{request hash}/`` (an interrupted call resumes there) and
then moved into ``samples/`` following a journal (``handover.json``) written before the first move, so a
call killed during the move finishes the same move when run again: no image is lost or duplicated.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from runtime import cli
from runtime.resources import DEFAULT_CONFIG

if TYPE_CHECKING:
    from runtime.generate import Sampling

__all__ = ["SampleSettings", "build_parser", "settings_from_argv", "check", "run", "main", "grid_name", "save_grid",
           "hand_over", "HANDOVER", "METADATA"]


@dataclass(frozen=True)
class SampleSettings:
    """One ``sample.py`` call: a field per flag, with the command line's defaults.

    :func:`check` fills in what follows from the others: ``ckpt`` (the run's base, else sd-v1-4),
    ``config`` (the run's, else v1-inference.yaml), ``outdir`` (the run's folder, else
    outputs/txt2img-samples), ``ddim_eta`` (0 with ``plms``), ``prompts`` (one per image) and ``devices``.
    """

    prompt: str = "a painting of a virus monster playing guitar"
    from_file: str | None = None  # one prompt per line (overrides prompt)
    outdir: str | Path | None = None
    skip_grid: bool = False
    skip_save: bool = False  # keep only the grid
    ddim_steps: int = 100
    plms: bool = False
    fixed_code: bool = False  # same start noise for every image
    ddim_eta: float = 1.0
    n_iter: int = 1  # repeat the whole prompt list this many times
    H: int = 512
    W: int = 512
    n_samples: int = 10  # batch size (and copies of prompt)
    n_rows: int = 0  # grid columns (0: n_samples)
    n_copies: int = 1  # images per prompt of from_file
    scale: float = 6.0
    config: str | Path | None = None
    ckpt: str | Path | None = None
    delta_ckpt: str | Path | None = None
    seed: int = 42
    precision: str = "autocast"  # "full" or "autocast" (fp16 on CUDA)
    metadata: bool = False  # append images.txt / caption.txt in outdir
    gpus: str | None = None
    # filled by check()
    prompts: tuple[str, ...] | None = None  # one per image, in order
    devices: tuple[str, ...] | None = None  # the parsed gpus

    def sampling(self) -> Sampling:
        """The sampler and its settings (PLMS with ``plms``, else DDIM; ``n_samples`` images per batch)."""
        from runtime.generate import Sampling

        return Sampling(sampler="plms" if self.plms else "ddim", steps=self.ddim_steps, eta=self.ddim_eta,
                        scale=self.scale, height=self.H, width=self.W, batch_size=self.n_samples, seed=self.seed,
                        precision=self.precision, fixed_code=self.fixed_code)


def build_parser() -> argparse.ArgumentParser:
    d = SampleSettings  # the defaults are the settings' defaults
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--prompt", default=d.prompt)
    p.add_argument("--from-file", dest="from_file", default=None, help="one prompt per line (overrides --prompt)")
    p.add_argument("--outdir", default=None, help="default: the training run's folder, else outputs/txt2img-samples")
    p.add_argument("--skip_grid", action="store_true")
    p.add_argument("--skip_save", action="store_true", help="keep only the grid")
    p.add_argument("--ddim_steps", type=cli.positive_int, default=d.ddim_steps)
    p.add_argument("--plms", action="store_true", help="PLMS sampler (deterministic: eta is 0)")
    p.add_argument("--fixed_code", action="store_true", help="same start noise for every image")
    p.add_argument("--ddim_eta", type=cli.nonnegative_float, default=d.ddim_eta)
    p.add_argument("--n_iter", type=cli.positive_int, default=d.n_iter,
                   help="repeat the whole prompt list this many times")
    p.add_argument("--H", type=cli.image_side, default=d.H)
    p.add_argument("--W", type=cli.image_side, default=d.W)
    p.add_argument("--n_samples", type=cli.positive_int, default=d.n_samples,
                   help="batch size (and copies of --prompt)")
    p.add_argument("--n_rows", type=cli.nonnegative_int, default=d.n_rows, help="grid columns (default n_samples)")
    p.add_argument("--n_copies", type=cli.positive_int, default=d.n_copies, help="images per prompt of --from-file")
    p.add_argument("--scale", type=cli.guidance_scale, default=d.scale, help="classifier-free guidance scale")
    p.add_argument("--config", default=None, help=f"model config (default: the run's, else {DEFAULT_CONFIG.name})")
    p.add_argument("--ckpt", default=None,
                   help="full or base checkpoint (.ckpt / .safetensors, or a diffusers pipeline folder); default: the "
                        "base recorded in --delta_ckpt's training run, else assets/pretrained_models/sd-v1-4.ckpt")
    p.add_argument("--delta_ckpt", default=None, help="delta checkpoint applied on top of --ckpt")
    p.add_argument("--seed", type=cli.seed_int, default=d.seed)
    p.add_argument("--precision", choices=["full", "autocast"], default=d.precision, help="autocast: fp16 on CUDA")
    p.add_argument("--metadata", action="store_true", help="append images.txt / caption.txt in outdir")
    p.add_argument("--gpus", default=None, help=cli.GPUS_HELP)
    return p


def settings_from_argv(argv=None) -> SampleSettings:
    """Parse the command line and check everything cheap (:func:`check`)."""
    args = build_parser().parse_args(argv)
    return check(SampleSettings(**vars(args)))


def check(settings: SampleSettings) -> SampleSettings:
    """Check everything cheap before any work (files, numbers, the checkpoints against the model config,
    the output folder, the records an interrupted call left there); returns the settings with the values that
    follow from them filled in (see :class:`SampleSettings`). Raises FileNotFoundError, ValueError (UsageError),
    CheckpointError or ``runtime.files.DamagedFileError``."""
    from ldm.checkpoint import require_checkpoint
    from ldm.util import load_model_config
    from runtime.dist import check_launcher_env
    from runtime.files import read_prompts
    from runtime.loading import check_checkpoints, resolve_model

    check_launcher_env()  # RANK/WORLD_SIZE of a launcher: wrong ones fail now, not in a hanging group set-up
    s = settings
    source = resolve_model(s.config, s.delta_ckpt, s.ckpt)  # the run's own base model, not a fixed path
    ckpt = source.ckpt
    require_checkpoint(ckpt, "--ckpt", pipelines=True)
    if s.delta_ckpt is not None:
        require_checkpoint(s.delta_ckpt, "--delta_ckpt")
    # checked on the DDIM grid that PLMS shares: the eta PLMS ignores is zeroed below, with a note
    dataclasses.replace(s.sampling(), sampler="ddim").validate()
    model_config = load_model_config(source.config)
    check_checkpoints(model_config, ckpt, s.delta_ckpt)
    if s.outdir:
        outdir = Path(s.outdir)
    elif source.run_config is not None:
        outdir = source.run_config.parent.parent
    else:
        outdir = Path("outputs/txt2img-samples")
    cli.check_output(outdir, "--outdir", kind="dir")

    if s.from_file:
        prompts = [p for p in read_prompts(s.from_file) for _ in range(s.n_copies)]
    else:
        if not s.prompt.strip():
            raise ValueError("--prompt is empty")
        prompts = [s.prompt] * (s.n_copies if s.n_copies > 1 else s.n_samples)
    prompts = prompts * s.n_iter

    devices = cli.parse_devices(s.gpus)
    eta = s.ddim_eta
    if s.plms and eta != 0:
        print("note: PLMS is deterministic; --ddim_eta is ignored")
        eta = 0.0
    s = dataclasses.replace(s, ckpt=ckpt, config=source.config, outdir=outdir, ddim_eta=eta,
                            prompts=tuple(prompts), devices=devices)
    check_staging(s)  # an interrupted call's damaged records: now, not after the model has loaded
    return s


def _next_index(samples: Path) -> int:
    nums = [int(p.stem) for p in samples.glob("*.png") if p.stem.isdigit()]
    return max(nums) + 1 if nums else 0


def grid_name(prompt: str, settings: SampleSettings) -> str:
    s = settings
    words = re.sub(r"[^a-zA-Z ]", "", prompt[:60]).strip().replace(" ", "-") or "prompts"
    ckpt = Path(s.delta_ckpt or s.ckpt).stem
    return f"{words}_{ckpt}_{s.scale}_{'plms' if s.plms else 'ddim'}_{s.ddim_steps}_{s.ddim_eta}.jpg"


def save_grid(paths: list[Path], columns: int, out: Path) -> None:
    from PIL import Image

    first = Image.open(paths[0])
    w, h = first.size
    rows = (len(paths) + columns - 1) // columns
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, p in enumerate(paths):
        grid.paste(Image.open(p).convert("RGB"), ((i % columns) * w, (i // columns) * h))
    from runtime.files import write_bytes_atomic

    fmt = Image.registered_extensions().get(Path(out).suffix.lower(), "JPEG")  # grid_name: .jpg
    write_bytes_atomic(out, lambda f: grid.save(f, format=fmt, quality=70), "the grid", sync=False)


HANDOVER = "handover.json"
METADATA = ("images.txt", "caption.txt")


def staging_folder(s: SampleSettings) -> Path:
    """The folder where the images of checked settings ``s`` are made before :func:`hand_over` moves them: named
    after the request, so an interrupted call resumes where it stopped."""
    request = {"prompts": list(s.prompts), "ckpt": str(Path(s.ckpt).resolve()), "seed": s.seed,
               "delta": str(Path(s.delta_ckpt).resolve()) if s.delta_ckpt else None,
               "steps": s.ddim_steps, "eta": s.ddim_eta, "scale": s.scale, "plms": s.plms,
               "fixed_code": s.fixed_code, "H": s.H, "W": s.W}
    key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:12]
    return Path(s.outdir) / f".staging-{key}"


def read_journal(journal: Path) -> dict:
    """The hand-over plan in ``journal``: ``{"targets": [image names], "lines_before": {list file: count}}``.
    Raises ``runtime.files.DamagedFileError`` for a damaged one (it is the only record of where the images of an
    interrupted hand-over were going: never guessed)."""
    from runtime.files import DamagedFileError, read_json

    remedy = (f"it records where the images of an interrupted hand-over go: delete the folder {journal.parent} and "
              f"sample again (images it already moved stay in {journal.parent.parent / 'samples'})")
    plan = read_json(journal, "the hand-over journal", remedy)
    targets, before = plan.get("targets"), plan.get("lines_before")
    if (not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)
            or not isinstance(before, dict) or not all(isinstance(before.get(n), int) for n in METADATA)):
        raise DamagedFileError(f"the hand-over journal {journal} is damaged (no list of targets and line counts); "
                               f"{remedy}")
    return plan


def check_staging(s: SampleSettings) -> None:
    """Refuse now, before any model is loaded, a staging folder of ``s`` (:func:`staging_folder`) left by an
    interrupted call whose records are damaged: its hand-over journal or its generation plan."""
    from runtime.files import read_json
    from runtime.generate import PLAN_FILE

    staging = staging_folder(s)
    if (staging / HANDOVER).is_file():
        read_journal(staging / HANDOVER)
    elif (staging / PLAN_FILE).exists():
        read_json(staging / PLAN_FILE, "the generation plan",
                  f"delete the folder {staging} (the images of an interrupted call) and sample again")


def hand_over(staged: list[Path], outdir: Path, journal: Path, metadata: list[str] | None) -> list[Path]:
    """Move the staged images to the next free numbers of ``outdir/samples/`` and, with ``metadata`` (their
    prompts), append them to ``images.txt`` / ``caption.txt``; resumable.

    Where the images go and how long the two lists were is decided once and written to ``journal``
    before anything moves. A call killed midway finds the journal and completes the same moves (a staged
    file already moved is skipped) and rewrites the lists to their recorded length plus the new lines,
    so nothing is lost or appended twice."""
    from runtime.files import read_text_lines, write_text_atomic

    samples = outdir / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    if journal.is_file():
        plan = read_journal(journal)
    else:
        base = _next_index(samples)
        plan = {"targets": [f"{base + i:05}.png" for i in range(len(staged))],
                "lines_before": {n: len(read_text_lines(outdir / n)) if (outdir / n).is_file() else 0
                                 for n in METADATA}}
        write_text_atomic(journal, json.dumps(plan) + "\n")
    written = []
    for src, name in zip(staged, plan["targets"]):
        dst = samples / name
        if src.exists():
            os.replace(src, dst)
        elif not dst.is_file():
            raise RuntimeError(f"{src} and {dst} are both missing: the staging folder {journal.parent} was "
                               f"changed by hand; delete it and sample again")
        written.append(dst)
    if metadata is not None:
        new = {"images.txt": [f"samples/{p.name}" for p in written], "caption.txt": list(metadata)}
        for name in METADATA:
            path = outdir / name
            old = read_text_lines(path)[: plan["lines_before"][name]] if path.is_file() else []
            write_text_atomic(path, "".join(line + "\n" for line in old + new[name]))
    return written


def run(settings: SampleSettings) -> list[Path]:
    """Check ``settings`` (:func:`check`), generate the images and hand them over into ``{outdir}/samples/``;
    returns the written image paths (none with ``skip_save``, and none on ranks other than 0)."""
    return _sample(check(settings))


def _sample(s: SampleSettings) -> list[Path]:
    """:func:`run` for settings that :func:`check` returned."""
    from ldm.util import load_model_config
    from runtime.dist import init_from_launcher, local_devices
    from runtime.generate import generate_images
    from runtime.loading import load_model

    prompts, outdir = list(s.prompts), Path(s.outdir)
    shard = init_from_launcher()  # torchrun & co.: every rank makes its share, rank 0 hands them over
    samples = outdir / "samples"
    staging = staging_folder(s)
    journal = staging / HANDOVER
    if not journal.is_file():  # else a killed call was moving these images already: finish that
        factory = functools.partial(load_model, load_model_config(s.config), s.ckpt, s.delta_ckpt)
        generate_images(factory, prompts, staging, s.sampling(), devices=local_devices(s.devices),
                        desc="sampling", shard=shard,
                        model=f"--ckpt {s.ckpt}" + (f" + --delta_ckpt {s.delta_ckpt}" if s.delta_ckpt else ""))
    if shard is not None and shard[0] != 0:
        return []
    staged = [staging / "samples" / f"{i:05}.png" for i in range(len(prompts))]
    written = [] if s.skip_save else hand_over(staged, outdir, journal, prompts if s.metadata else None)
    if not s.skip_grid:
        save_grid(written or staged, s.n_rows or s.n_samples, outdir / grid_name(prompts[0], s))
    shutil.rmtree(staging)
    print(f"{len(prompts)} images -> {samples if written else outdir}")
    return written


def main(argv=None) -> int:
    """``python sample.py ...``: a bad input is one ``error:`` line and exit status 2, before any work."""
    settings = cli.exit_on_usage_error(lambda: settings_from_argv(argv))
    cli.exit_on_run_error(lambda: _sample(settings))  # a broken model (status 2), a full disk (status 1)
    return 0


if __name__ == "__main__":  # python -m runtime.sample (an installed copy without its bin/ on PATH)
    raise SystemExit(main())
