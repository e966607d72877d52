"""Concept ablation training (Kumari et al., ICCV 2023) on Stable Diffusion v1.

    python train.py -t --gpus 0,1 --concept_type style --caption_target "van gogh" \\
        --prompts assets/finetune_prompts/painting.txt --name vangogh_painting --train_size 200

Steps, top to bottom: check every input (cheap, before any model is built); generate the anchor
images with the base model (resumable; memorization also scores paraphrases with SSCD); build the
model and pick the trained weights; train with Lightning; write delta checkpoints
``{logdir}/{timestamp}_{name}/checkpoints/delta_step_{N}.ckpt`` beside the run's merged config.
Extra ``key.sub=value`` arguments override the merged config (e.g. ``training.max_steps=50``).
"""
# The job as a library (``train.py`` is its command line):
#   settings = TrainSettings(concept_type="style", caption_target="van gogh", prompts="painting.txt", train=True,
#                            overrides=("training.max_steps=50",))
#   run_dir = run(settings)          # check(settings) first when it has not been checked
# ``settings_from_argv(argv)`` parses train.py's command line and checks it; ``main(argv)`` is train.py.
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from runtime.resources import config_path, weights_path

if TYPE_CHECKING:
    from runtime.generate import Sampling


@dataclass(frozen=True)
class TrainSettings:
    """One training job: a field per train.py flag (same names as the flags' destinations, same defaults),
    ``overrides``, the ``key.sub=value`` config overrides, in order; ``command``, the command line recorded in
    the run's project yaml (None: the flags that give these settings, see :func:`command_line`); ``devices``,
    filled by :func:`check` from ``gpus`` (None: not checked yet, :func:`run` checks first).

    Training values given here (``train_max_steps``, ``base_lr``, ``batch_size``, ``save_freq``,
    ``parameter_group``, ``loss_type_reverse``, ``image_logging_freq``) are written into the merged config
    (:func:`load_config`); the job reads them from there, the one place that also holds the concept config's
    values for those left None."""

    concept_type: str  # style, object or memorization
    caption_target: str
    prompts: str
    train: bool = False
    gpus: str | None = None
    num_nodes: int = 1
    name: str = ""
    mem_impath: str | None = None
    sscd_ckpt: str = str(weights_path("sscd_imagenet_mixup.torchscript.pt"))
    parameter_group: str | None = None
    loss_type_reverse: str | None = None
    base_ckpt: str = str(weights_path("sd-v1-4.ckpt"))
    delta_ckpt: str | None = None
    model_config: str = str(config_path("stable-diffusion/v1-inference.yaml"))
    config: str | None = None
    regularization: bool = False
    preserve_prompts: str | None = None
    train_size: int = 1000
    train_max_steps: int | None = None
    base_lr: float | None = None
    scale_lr: bool = True
    batch_size: int | None = None
    save_freq: int | None = None
    image_logging_freq: int | None = None
    ckpt_format: str = "ckpt"
    precision: str = "32-true"
    logdir: str = "logs"
    seed: int = 23
    root: str = "data"
    n_samples: int = 10
    wandb_entity: str = ""
    overrides: tuple[str, ...] = ()
    command: tuple[str, ...] | None = None
    devices: tuple[str, ...] | None = None


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainSettings)}


def str2bool(v: str) -> bool:
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r}")


def build_parser() -> argparse.ArgumentParser:
    """train.py's command line; the defaults are :class:`TrainSettings`'."""
    return _parser_and_options()[0]


def _parser_and_options() -> tuple[argparse.ArgumentParser, list[argparse.Action]]:
    """The parser and its options (argparse's actions, in order)."""
    from runtime import cli

    d = _DEFAULTS
    parser = cli.ArgumentParser(description=__doc__)
    options: list[argparse.Action] = []
    # p.add_argument(...) adds to the parser and keeps the option
    p = SimpleNamespace(add_argument=lambda *a, **k: options.append(parser.add_argument(*a, **k)))
    p.add_argument("-t", "--train", action="store_true", help="train (without it: only prepare the data)")
    p.add_argument("--gpus", default=d["gpus"],
                   help="CUDA device ids, e.g. 0,1 (DDP, one process each), or cpu:N for N CPU processes (DDP on "
                        "gloo, the same code path); omit for one CPU process")
    p.add_argument("--num_nodes", type=cli.positive_int, default=d["num_nodes"],
                   help="machines of a multi-node DDP job (Lightning; start one process per device on each node "
                        "with torchrun or your cluster's launcher)")
    p.add_argument("--concept_type", required=True, choices=["style", "object", "memorization"])
    p.add_argument("--caption_target", required=True,
                   help='style: "van gogh"; object: "anchor+target" ("cat+grumpy cat"); memorization: the '
                        'memorized caption; several concepts separated by ";"')
    p.add_argument("--prompts", required=True, help="anchor prompt file (memorization: paraphrases of the caption)")
    p.add_argument("-n", "--name", default=d["name"], help="run name (log dir postfix)")
    p.add_argument("--mem_impath", default=d["mem_impath"], help="memorized image (memorization)")
    p.add_argument("--sscd_ckpt", default=d["sscd_ckpt"],
                   help="SSCD TorchScript copy-detection model (memorization only)")
    p.add_argument("--parameter_group", default=d["parameter_group"],
                   choices=["cross-attn", "full-weight", "attn", "embedding"],
                   help="trained weights (default: the concept config's; cross-attn, full-weight for memorization)")
    p.add_argument("--loss_type_reverse", default=d["loss_type_reverse"], choices=["model-based", "noise-based"])
    p.add_argument("-rc", "--resume-from-checkpoint-custom", dest="base_ckpt", default=d["base_ckpt"],
                   help="base SD weights")
    p.add_argument("--delta_ckpt", default=d["delta_ckpt"], help="start from this delta on top of the base")
    p.add_argument("--model_config", default=d["model_config"])
    p.add_argument("--config", default=d["config"],
                   help="concept config (default configs/ablation/{concept_type}.yaml)")
    p.add_argument("--regularization", action="store_true", help="add 0.2 x the anchor-prompt noise loss")
    p.add_argument("--preserve_prompts", default=d["preserve_prompts"],
                   help="prompt file (one per line) whose predictions stay pinned to the base model's, weighted by "
                        "training.preservation_weight: an addition to the paper's method for neighbouring concepts "
                        "(not with the embedding group; no prompt may mention the target)")
    p.add_argument("--train_size", type=cli.positive_int, default=d["train_size"],
                   help="number of anchor images to generate")
    p.add_argument("--train_max_steps", type=cli.positive_int, default=d["train_max_steps"])
    p.add_argument("--base_lr", type=cli.positive_float, default=d["base_lr"])
    p.add_argument("--scale_lr", type=str2bool, default=d["scale_lr"],
                   help="lr = base_lr x processes (devices x nodes) x batch_size")
    p.add_argument("--batch_size", type=cli.positive_int, default=d["batch_size"], help="per GPU")
    p.add_argument("--save_freq", type=cli.nonnegative_int, default=d["save_freq"],
                   help="delta checkpoint every N steps")
    p.add_argument("--image_logging_freq", type=cli.nonnegative_int, default=d["image_logging_freq"],
                   help="sample grids every N steps (0: off)")
    p.add_argument("--ckpt_format", default=d["ckpt_format"], choices=["ckpt", "safetensors"])
    p.add_argument("--precision", default=d["precision"],
                   help="Lightning training precision, e.g. 32-true, bf16-mixed")
    p.add_argument("-l", "--logdir", default=d["logdir"])
    p.add_argument("-s", "--seed", type=cli.nonnegative_int, default=d["seed"],
                   help="training seed (generation uses the config's, 42)")
    p.add_argument("--root", default=d["root"], help="anchor images go to {root}/{prompts stem}_gen/")
    p.add_argument("--n_samples", type=cli.positive_int, default=d["n_samples"], help="generation batch size")
    p.add_argument("--wandb_entity", default=d["wandb_entity"],
                   help="log to Weights & Biases (offline without a login)")
    return parser, options


def command_line(settings: TrainSettings) -> list[str]:
    """The train.py arguments that give ``settings``: the flags whose values differ from their defaults (the
    three required ones always), in the parser's order, then the config overrides."""
    argv = []
    for action in _parser_and_options()[1]:
        value = getattr(settings, action.dest)
        if action.nargs == 0:  # -t, --regularization
            argv += [action.option_strings[0]] if value else []
        elif value is not None and (action.required or str(value) != str(action.default)):
            argv += [action.option_strings[0], str(value).lower() if isinstance(value, bool) else str(value)]
    return argv + list(settings.overrides)


# ----------------------------------------------------------------------------- checks (cheap, first)
def settings_from_argv(argv=None) -> TrainSettings:
    """train.py's command line (``sys.argv[1:]`` for None) as checked settings: a bad flag exits 2 (argparse),
    a bad value raises ValueError / FileNotFoundError / RuntimeError (see :func:`check`)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    bad = [u for u in unknown if "=" not in u or u.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (config overrides look like key.sub=value)")
    settings = TrainSettings(**vars(args), overrides=tuple(unknown),
                             command=tuple(sys.argv[1:] if argv is None else argv))
    return check(settings)


def load_config(settings: TrainSettings):
    """The run's merged OmegaConf config: the concept config (``settings.config``, default
    ``configs/ablation/{concept_type}.yaml``), the model config's ``model``, the overrides, then the training
    values given as settings (flags) on top."""
    from omegaconf import OmegaConf

    from ldm.util import load_model_config

    concept_config = Path(settings.config or config_path(f"ablation/{settings.concept_type}.yaml"))
    for what, path in (("concept config", concept_config), ("model config", Path(settings.model_config))):
        if not path.is_file():
            raise FileNotFoundError(f"{what} not found: {path}")
    config = OmegaConf.merge(OmegaConf.load(concept_config), {"model": load_model_config(settings.model_config)},
                             OmegaConf.from_dotlist(list(settings.overrides)))
    tr = config.training
    for field, key in (("train_max_steps", "max_steps"), ("base_lr", "base_learning_rate"),
                       ("batch_size", "batch_size"), ("save_freq", "save_freq"),
                       ("parameter_group", "parameter_group"), ("loss_type_reverse", "loss_type_reverse")):
        if getattr(settings, field) is not None:
            tr[key] = getattr(settings, field)
    if settings.image_logging_freq is not None:
        config.logging.image_every = settings.image_logging_freq
    return config


def check(settings: TrainSettings) -> TrainSettings:
    """Every user error we can detect without building a model (raises ValueError / FileNotFoundError /
    RuntimeError, :class:`runtime.cli.UsageError` among them); returns the settings with ``devices`` filled."""
    from runtime.dist import check_launcher_env

    check_launcher_env()  # RANK/WORLD_SIZE/LOCAL_RANK: wrong ones fail now, not in a hanging group set-up
    config = load_config(settings)
    _, _, devices = _check_inputs(settings, config)
    return dataclasses.replace(settings, devices=tuple(devices))


def _check_inputs(s: TrainSettings, config):
    """The checks of :func:`check` on the merged config; returns (concepts, prompts, devices)."""
    from ablation.prompts import check_anchor_words, check_preserve_prompts, parse_caption_target
    from runtime.cli import check_config_values, check_output
    from runtime.files import read_prompts

    check_config_values(config)  # overrides such as training.max_steps=abc or data.size=12
    concepts = parse_caption_target(s.concept_type, s.caption_target)
    prompts = read_prompts(s.prompts)
    tr = config.training
    if s.concept_type == "object":
        check_anchor_words(concepts, prompts, f"--prompts {s.prompts}")
    if s.concept_type == "memorization":
        if not s.mem_impath:
            raise ValueError("memorization needs --mem_impath (the memorized image)")
        if not Path(s.mem_impath).is_file():
            raise FileNotFoundError(f"--mem_impath not found: {s.mem_impath}")
        from scoring.sscd import check_sscd

        check_sscd(s.sscd_ckpt)  # loaded once now: a missing, damaged or wrong-kind file fails before any work
        if s.train_size % config.generation.anchor_size:
            raise ValueError(f"--train_size ({s.train_size}) must be divisible by the number of anchor prompts "
                             f"({config.generation.anchor_size})")
        if tr.parameter_group == "embedding":
            raise ValueError("the embedding parameter group cannot ablate memorized images "
                             "(use full-weight or cross-attn)")
    elif s.train_size % len(prompts):
        raise ValueError(f"--train_size ({s.train_size}) must be a multiple of the number of prompts in "
                         f"{s.prompts} ({len(prompts)}): each prompt gets the same number of images")
    if tr.batch_size < 1 or (s.regularization and tr.batch_size % 2):
        raise ValueError(f"batch_size {tr.batch_size}: must be >= 1, and even with --regularization "
                         "(half ablation, half regularization)")
    if s.preserve_prompts is not None:
        check_preserve_prompts(read_prompts(s.preserve_prompts), tr.parameter_group, concepts,
                               f"--preserve_prompts {s.preserve_prompts}")
        if tr.get("preservation_weight", 1.0) <= 0:
            raise ValueError("training.preservation_weight must be positive with --preserve_prompts")
    if tr.loss_type_reverse not in ("model-based", "noise-based"):
        raise ValueError(f"loss_type_reverse must be model-based or noise-based, got {tr.loss_type_reverse!r}")
    if tr.parameter_group not in ("cross-attn", "full-weight", "attn", "embedding"):
        raise ValueError(f"parameter_group must be cross-attn, full-weight, attn or embedding, got "
                         f"{tr.parameter_group!r}")
    if s.wandb_entity:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise RuntimeError("--wandb_entity needs the wandb package: pip install wandb")
    from omegaconf import OmegaConf

    from runtime.loading import check_checkpoints

    anchors = anchor_sampling(s, config).validate()
    if s.concept_type == "memorization":  # the paraphrase check set: DDIM, generation.check_steps
        dataclasses.replace(anchors, sampler="ddim", steps=config.generation.check_steps).validate()
    from ldm.checkpoint import require_checkpoint

    require_checkpoint(s.base_ckpt, "base checkpoint (--resume-from-checkpoint-custom)", pipelines=True)
    check_checkpoints(OmegaConf.to_container(config.model, resolve=True), s.base_ckpt, s.delta_ckpt)
    check_output(s.root, "--root (anchor images)", kind="dir")
    check_output(s.logdir, "--logdir", kind="dir")
    from runtime.cli import parse_devices

    return concepts, prompts, list(parse_devices(s.gpus, default="cpu"))


# ----------------------------------------------------------------------------- model
def latent_factor(model_config) -> int:
    return 2 ** (len(model_config.params.first_stage_config.params.ddconfig.ch_mult) - 1)


# ----------------------------------------------------------------------------- data
def anchor_sampling(s: TrainSettings, config) -> Sampling:
    """How the anchor images are sampled: ``config.generation``'s sampler (DDIM when unset), steps, eta, scale
    and seed, ``n_samples`` images per batch, ``data.size`` square."""
    from runtime.generate import Sampling

    gen, size = config.generation, config.data.size
    return Sampling(sampler=gen.get("sampler", "ddim"), steps=gen.steps, eta=gen.eta, scale=gen.scale,
                    height=size, width=size, batch_size=s.n_samples, seed=gen.seed)


def prepare_data(s: TrainSettings, config, concepts, prompts, devices):
    """Generate (or reuse) the anchor images; returns (images_txt, caption_txt, concepts).

    Under an external launcher (torchrun) every process runs this: the anchor images are shared out by
    global rank; the memorization pipeline (paraphrase scoring, then anchors) runs on rank 0 while the
    others wait for its result."""
    from omegaconf import OmegaConf

    from ablation.prompts import Concept
    from runtime.dist import broadcast_from_zero, init_from_launcher, local_devices
    from runtime.generate import generate_images
    from runtime.loading import load_model

    gen = config.generation
    gen_folder = Path(s.root) / f"{Path(s.prompts).stem}_gen"
    model_cfg = OmegaConf.to_container(config.model, resolve=True)
    factory = functools.partial(load_model, model_cfg, s.base_ckpt, s.delta_ckpt)
    shard = init_from_launcher()
    if s.concept_type == "memorization":
        from ablation.memorization import prepare_memorization_data

        if shard is not None and shard[0] != 0:
            images_txt, caption_txt, targets = broadcast_from_zero(None)
            extra = [Concept("*", t) for t in targets if t not in {c.target for c in concepts}]
            return images_txt, caption_txt, concepts + extra
        images_txt, caption_txt, targets = prepare_memorization_data(
            factory, s.sscd_ckpt, s.mem_impath, prompts, gen_folder, concepts[0].target, s.train_size,
            sampling=anchor_sampling(s, config), n_check=gen.check_images_per_prompt, check_steps=gen.check_steps,
            anchor_size=gen.anchor_size, target_size=gen.target_size, threshold=gen.sscd_threshold,
            devices=tuple(devices))
        if shard is not None:
            broadcast_from_zero((images_txt, caption_txt, targets))
        extra = [Concept("*", t) for t in targets if t not in {c.target for c in concepts}]
        return images_txt, caption_txt, concepts + extra
    per_image = [p for p in prompts for _ in range(s.train_size // len(prompts))]
    generate_images(factory, per_image, gen_folder, anchor_sampling(s, config),
                    devices=local_devices(tuple(devices)), shard=shard, model=f"base checkpoint {s.base_ckpt}")
    return gen_folder / "images.txt", gen_folder / "caption.txt", concepts


def build_data(s: TrainSettings, config, concepts, images_txt, caption_txt, lf: int):
    """The training set and its Lightning data module (the loader is made per process, see AnchorData)."""
    from ablation.data import AblationDataset, PairedDataset, load_image_captions
    from ablation.module import AnchorData

    images, captions = load_image_captions(images_txt, caption_txt)
    d = config.data
    common = dict(concept_type=s.concept_type, size=d.size, aug=d.aug, flip_p=d.flip_p, latent_factor=lf)
    dataset = AblationDataset(images, captions, concepts=concepts, seed=s.seed, **common)
    batch_size = config.training.batch_size
    if s.regularization:
        reg = AblationDataset(images, captions, concepts=None, seed=s.seed + 1, **common)
        dataset, batch_size = PairedDataset(reg, dataset), batch_size // 2
    return dataset, AnchorData(dataset, batch_size, config.training.num_workers, seed=s.seed)


def make_logger(s: TrainSettings, run_dir: Path, run_name: str):
    if not s.wandb_entity:
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="")
    from lightning.pytorch.loggers import WandbLogger

    logged_in = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in _read(Path.home() / ".netrc")
    offline = os.environ.get("WANDB_MODE") == "offline" or not logged_in
    if offline:
        print("wandb: no login found, logging offline (sync later with `wandb sync`)")
    return WandbLogger(project="concept-ablation", entity=s.wandb_entity, name=run_name, id=run_name,
                       save_dir=str(run_dir), offline=offline)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def join_or_make_run_dir(logdir: Path, name: str, is_rank_zero: bool) -> Path:
    """Rank 0 creates ``{logdir}/{timestamp}_{name}`` exclusively (a ``-2``, ``-3``, ... suffix when another run
    took that name in the same second); Lightning's DDP launcher re-runs the command (``sys.argv``) for
    ranks > 0, which join rank 0's folder through the environment, and under an external launcher rank 0
    broadcasts it."""
    from runtime.dist import broadcast_from_zero, external_shard

    if external_shard() is not None:  # torchrun & co. start every rank at once: rank 0 names the folder
        name = broadcast_from_zero(_make_run_dir(logdir, name).name if is_rank_zero else None)
        os.environ["ABLATION_RUN_NAME"] = name
        return logdir / name
    if not is_rank_zero:
        return logdir / os.environ["ABLATION_RUN_NAME"]
    return _make_run_dir(logdir, name)


def _make_run_dir(logdir: Path, name: str) -> Path:
    now = datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    stem = f"{now}_{name}" if name else now
    logdir.mkdir(parents=True, exist_ok=True)
    for k in range(1, 1000):
        run_dir = logdir / (stem if k == 1 else f"{stem}-{k}")
        try:
            run_dir.mkdir()
        except FileExistsError:
            continue
        os.environ["ABLATION_RUN_NAME"] = run_dir.name
        return run_dir
    raise RuntimeError(f"could not create a new run folder {stem}-N under {logdir}")


# ----------------------------------------------------------------------------- the job
def run(settings: TrainSettings) -> Path | None:
    """Prepare the anchor data and, with ``settings.train``, train; returns the run folder (None without
    ``train``: data only). Unchecked settings (``devices`` None) are checked first (:func:`check`).

    With several devices Lightning's DDP launcher starts the other ranks by re-running this process's
    command line (``sys.argv``): from Python, run one process, or start every rank with torchrun."""
    if settings.devices is None:
        settings = check(settings)
    from ablation.prompts import parse_caption_target
    from runtime.files import read_prompts

    s, devices = settings, list(settings.devices)
    config = load_config(s)
    concepts = parse_caption_target(s.concept_type, s.caption_target)
    prompts = read_prompts(s.prompts)
    images_txt, caption_txt, concepts = prepare_data(s, config, concepts, prompts, devices)
    if not s.train:
        print(f"data ready in {Path(images_txt).parent}; pass -t to train")
        return None

    import lightning as L
    import torch
    from omegaconf import OmegaConf

    from ablation.module import ConceptAblation, DeltaCheckpoint, ImageLogger, PeakMemory, StepProgressBar
    from ablation.prompts import target_prompt
    from runtime.loading import load_model

    # the frozen VAE and text encoder are in eval mode on purpose
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    L.seed_everything(s.seed, workers=True)
    tr = config.training
    from runtime.dist import is_rank_zero as rank_zero

    is_rank_zero = rank_zero()
    lf = latent_factor(config.model)

    model = load_model(OmegaConf.to_container(config.model, resolve=True), s.base_ckpt, s.delta_ckpt)
    embedding_ids = None
    if tr.parameter_group == "embedding":
        tok = model.cond_stage_model.tokenizer
        embedding_ids = torch.tensor(sorted({i for c in concepts for i in tok.encode(c.target)}))
    n_procs = len(devices) * s.num_nodes  # DDP: one process per device on every node
    lr = tr.base_learning_rate * (n_procs * tr.batch_size if s.scale_lr else 1)
    module = ConceptAblation(model, tr.parameter_group, tr.loss_type_reverse, learning_rate=lr,
                             weight_decay=tr.weight_decay,
                             regularization_weight=tr.regularization_weight if s.regularization else 0.0,
                             embedding_ids=embedding_ids,
                             preserve_prompts=read_prompts(s.preserve_prompts) if s.preserve_prompts else None,
                             preservation_weight=tr.get("preservation_weight", 1.0))
    dataset, data = build_data(s, config, concepts, images_txt, caption_txt, lf)
    run_dir = join_or_make_run_dir(Path(s.logdir), s.name, is_rank_zero)
    run_name, now = run_dir.name, run_dir.name[:19]
    if is_rank_zero:
        print(f"training {module.n_trainable():,} parameters ({tr.parameter_group}), lr {lr:.3g}, "
              f"{len(dataset)} images, {n_procs} process(es), {tr.max_steps} steps -> {run_dir}")

    # the run's merged config, saved before training so that sample.py can find it
    config.run = {"argv": list(s.command) if s.command is not None else command_line(s), "learning_rate": lr,
                  "base_ckpt": str(Path(s.base_ckpt).resolve()),  # sample.py / evaluate.py default to it
                  "concepts": [f"{c.anchor}+{c.target}" if c.anchor else c.target for c in concepts]}
    if is_rank_zero:
        (run_dir / "configs").mkdir(exist_ok=True)
        OmegaConf.save(config, run_dir / "configs" / f"{now}-project.yaml")

    callbacks = [DeltaCheckpoint(run_dir / "checkpoints", tr.save_freq, s.ckpt_format,
                                 metadata={"parameter_group": tr.parameter_group, "caption_target": s.caption_target}),
                 PeakMemory(), StepProgressBar(), L.pytorch.callbacks.LearningRateMonitor(logging_interval="step")]
    if config.logging.image_every:
        import random

        anchors = list(dict.fromkeys(prompts))[:4]
        rng = random.Random(0)
        targets = [target_prompt(s.concept_type, concepts, i, a, rng) for i, a in enumerate(anchors)]
        callbacks.append(ImageLogger(run_dir / "images" / "train", config.logging.image_every, targets, anchors,
                                     steps=config.logging.image_steps, latent_hw=config.data.size // lf))
    gpu = devices[0] != "cpu"
    trainer = L.Trainer(
        accelerator="gpu" if gpu else "cpu",
        devices=[int(d.split(":")[1]) for d in devices] if gpu else len(devices),
        num_nodes=s.num_nodes, strategy="ddp" if n_procs > 1 else "auto", use_distributed_sampler=False,
        max_steps=tr.max_steps, precision=s.precision, logger=make_logger(s, run_dir, run_name),
        callbacks=callbacks, enable_checkpointing=False, log_every_n_steps=1, num_sanity_val_steps=0,
        limit_val_batches=0, default_root_dir=str(run_dir))
    # the run's settings beside its curves (TensorBoard's HPARAMS tab, wandb's config); rank 0 only
    trainer.logger.log_hyperparams({
        **{f"{k}.{kk}": vv for k in ("training", "data", "generation")
           for kk, vv in OmegaConf.to_container(config[k], resolve=True).items()},
        "concept_type": s.concept_type, "caption_target": s.caption_target, "learning_rate": lr,
        "processes": n_procs, "regularization": s.regularization, "base_ckpt": str(s.base_ckpt),
        "preserve_prompts": str(s.preserve_prompts), "seed": s.seed})
    trainer.fit(module.train(), datamodule=data)
    if is_rank_zero:
        print(f"delta checkpoints: {', '.join(str(p) for p in callbacks[0].saved)}")
    return run_dir


def main(argv=None) -> int:
    """train.py: bad input is one ``error:`` line and exit status 2, before any work; then :func:`run`."""
    from runtime.cli import exit_on_run_error, exit_on_usage_error

    settings = exit_on_usage_error(lambda: settings_from_argv(argv))
    exit_on_run_error(lambda: run(settings))  # a broken model (status 2), a full disk (status 1): one line
    return 0


if __name__ == "__main__":  # python -m ablation.train (Lightning's DDP launcher re-runs it the same way)
    raise SystemExit(main())
