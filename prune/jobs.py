"""ConceptPrune's three jobs (discover / check / prune) as functions with typed settings.

``conceptprune.py`` at the repository root is the command line (:func:`main`); from Python::

    from prune.jobs import DiscoverSettings, PruneSettings, run_discover, run_prune

    found = run_discover(DiscoverSettings(concept="Van Gogh", outdir="logs/prune/van_gogh"))
    run_prune(PruneSettings(masks=(found["masks"],), out="logs/prune/delta_pruned.ckpt"))

Every job first runs :func:`check` (cheap: no weights are loaded), which refuses bad input with the command
line's one-line messages and returns the job's plan: the settings with the derived values filled in (the
checkpoint ``--paper_base`` names, the device, the output locations, the family's skill_ratio) and what was
read from disk to check them (model config, prompt pairs, masks).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from runtime import cli
from runtime.files import write_text_atomic
from runtime.resources import DEFAULT_BASE_CKPT, DEFAULT_CONFIG, weights_path

if TYPE_CHECKING:
    from runtime.generate import Sampling

DEFAULT_CKPT = DEFAULT_BASE_CKPT
PAPER_CKPT = weights_path("v1-5-pruned-emaonly.safetensors")  # ConceptPrune's base: SD v1.5
NORMS_VERSION = 1  # bump if the recorded statistic changes

PathLike = Union[str, os.PathLike]

DESCRIPTION = """\
ConceptPrune on our Stable Diffusion v1: three steps.

1. discover -- record ff.net.2 input norms for a concept's base and target prompts (PLMS, CFG,
   empty negative prompt, seed 0 before every generation; gender pairs: one seed per pair in 0..249),
   score |W|*||X_j|| and keep per output row
   the top-k (k = int(skill_ratio * in_features)) target scores where target > base::

       python conceptprune.py discover --concept "Van Gogh" --ckpt assets/pretrained_models/sd-v1-4.ckpt \\
           --outdir logs/prune/van_gogh [--skill_ratio 0.01]

   writes ``{outdir}/norms-{key}.safetensors`` (the norms, reused when the same prompts, settings and
   checkpoint come again: ``key`` hashes all of them; a new skill_ratio only recomputes masks),
   ``{outdir}/masks_sr{skill_ratio}.safetensors`` (per-(call, layer) masks, format in
   ``prune/wanda.py``), ``{outdir}/discover.json`` and the first images ``{outdir}/images/{base,target}_{i}.png``.

2. check -- sample the target prompts with and without the per-call masks (hooks; every call t
   uses mask t) and save side-by-side images ``{outdir}/check/{i:03d}.png`` (left original, right
   pruned) with ``{outdir}/check/prompts.txt``::

       python conceptprune.py check --masks logs/prune/van_gogh/masks_sr0.01.safetensors --ckpt ... --outdir ...

3. prune -- union of the masks over the first tau calls (several mask files: several concepts, one
   union), zero those ff.net.2 weights and save a delta checkpoint (only the changed weights, CompVis
   keys; with --delta_ckpt the input delta's tensors are carried over) for sample.py/evaluate.py::

       python conceptprune.py prune --masks a/masks_sr0.01.safetensors b/masks_sr0.02.safetensors \\
           --ckpt ... [--tau 10] --out logs/prune/delta_pruned.ckpt

   --tau defaults to each concept family's tau; one value applies to every mask file.
   With ``--out {run}/checkpoints/delta_pruned.ckpt`` the model config is saved to ``{run}/configs/``, so that
   ``evaluate.py --root {run} --filter 'delta_pruned*'`` scores it like an ablation run.
"""


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    """The model every job loads (``--ckpt``, ``--paper_base``, ``--delta_ckpt``, ``--config``) and ``--outdir``.

    After :func:`check`, ``ckpt`` names the checkpoint file (``--paper_base`` resolved: ``paper_base`` is then
    False) and the paths are strings."""
    ckpt: PathLike | None = None
    paper_base: bool = False
    delta_ckpt: PathLike | None = None
    config: PathLike = str(DEFAULT_CONFIG)
    outdir: PathLike | None = None


@dataclass(frozen=True, kw_only=True)
class SamplingSettings(ModelSettings):
    """PLMS sampling of discover and check. After :func:`check`, ``device`` is set (cuda if available, else cpu).
    ``noise``: ``"ours"`` (CPU fp32 generator) or ``"original"`` (the original's CUDA fp16 draw after
    ``torch.manual_seed``, ``runtime.generate.start_noise``; CUDA only)."""
    H: int = 512
    W: int = 512
    steps: int = 50
    scale: float = 7.5
    seed: int = 0
    precision: str = "autocast"
    batch_size: int = 4
    device: str | None = None
    noise: str = "ours"

    def sampling(self) -> Sampling:
        """These settings as a :class:`runtime.generate.Sampling`: PLMS (deterministic, eta 0)."""
        from runtime.generate import Sampling

        return Sampling(sampler="plms", steps=self.steps, eta=0.0, scale=self.scale, height=self.H, width=self.W,
                        batch_size=self.batch_size, seed=self.seed, precision=self.precision, noise=self.noise)


@dataclass(frozen=True, kw_only=True)
class DiscoverSettings(SamplingSettings):
    """``conceptprune.py discover``. After :func:`check`: ``skill_ratio`` (the family's by default) and
    ``outdir`` (``outputs/prune/{concept}`` by default) are set. ``arithmetic``: the scores and top-k of
    ``prune.wanda.skilled_mask`` (``"ours"``: fp32, stable sort; ``"original"``: the original's fp16 scores and
    unstable sort)."""
    concept: str
    base_file: PathLike | None = None
    target_file: PathLike | None = None
    skill_ratio: float | None = None
    save_images: int = 5
    arithmetic: str = "ours"


@dataclass(frozen=True, kw_only=True)
class CheckSettings(SamplingSettings):
    """``conceptprune.py check``. After :func:`check`, ``outdir`` is set (the masks' folder by default)."""
    masks: PathLike
    n_prompts: int | None = None


@dataclass(frozen=True, kw_only=True)
class PruneSettings(ModelSettings):
    """``conceptprune.py prune`` (one mask file per concept). After :func:`check`, ``masks`` is a tuple of strings
    and ``out`` is set (``{outdir or the first masks' folder}/delta_pruned.ckpt`` by default)."""
    masks: tuple[PathLike, ...]
    tau: int | None = None
    out: PathLike | None = None


Settings = Union[DiscoverSettings, CheckSettings, PruneSettings]
COMMANDS = {"discover": DiscoverSettings, "check": CheckSettings, "prune": PruneSettings}


@dataclass(frozen=True)
class DiscoverPlan:
    """What :func:`check` read for discover: the model config, the prompt pairs and the keys of the norms."""
    settings: DiscoverSettings
    model_config: dict
    pairs: Any  # prune.prompts.PromptPairs
    sampling: dict  # the generation settings recorded with the norms and masks
    norms_key: str
    prompts_sha256: str


@dataclass(frozen=True)
class CheckPlan:
    settings: CheckSettings
    model_config: dict
    masks: dict
    meta: dict
    prompts: list[str]


@dataclass(frozen=True)
class PrunePlan:
    settings: PruneSettings
    model_config: dict
    loaded: list  # (path, masks, meta, tau) per mask file


Plan = Union[DiscoverPlan, CheckPlan, PrunePlan]


# ----------------------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser, model: bool = True, sampling: bool = True):
    p.add_argument("--ckpt", default=None,
                   help="full or base checkpoint (default: assets/pretrained_models/sd-v1-4.ckpt, the base of our "
                        "concept ablation; any SD v1.x file of the same layout works)")
    p.add_argument("--paper_base", action="store_true",
                   help="ConceptPrune's own base, SD v1.5: "
                        "--ckpt assets/pretrained_models/v1-5-pruned-emaonly.safetensors")
    p.add_argument("--delta_ckpt", default=None, help="delta applied on top of --ckpt (e.g. an ablation)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="model config")
    p.add_argument("--outdir", default=None)
    if sampling:
        p.add_argument("--H", type=cli.image_side, default=512)
        p.add_argument("--W", type=cli.image_side, default=512)
        p.add_argument("--steps", type=cli.positive_int, default=50,
                       help="PLMS steps (S steps make S + 1 UNet calls)")
        p.add_argument("--scale", type=cli.guidance_scale, default=7.5, help="classifier-free guidance scale")
        p.add_argument("--seed", type=cli.seed_int, default=0,
                       help="seed of the start noise of every generation (gender: of the per-pair seeds)")
        p.add_argument("--precision", choices=["autocast", "full"], default="autocast",
                       help="autocast: fp16 on CUDA (norms are accumulated in fp32 either way)")
        p.add_argument("--batch_size", type=cli.positive_int, default=4,
                       help="prompts per UNet batch; every prompt gets the same seed-`seed` start noise "
                            "(gender pairs: their own seeds)")
        p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
        p.add_argument("--noise", choices=["ours", "original"], default="ours",
                       help="start noise: ours (a CPU fp32 generator seeded --seed, any device) or original (the "
                            "original's draw: fp16 randn on the CUDA device after torch.manual_seed; CUDA only)")


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True, parser_class=cli.ArgumentParser)
    d = sub.add_parser("discover", help="record norms and compute per-(call, layer) skilled-weight masks")
    d.add_argument("--concept", required=True, help="built-in concept (prune/prompts.py) or a custom name")
    d.add_argument("--base_file", default=None, help="custom base prompts (with --target_file)")
    d.add_argument("--target_file", default=None,
                   help="custom target prompts, or the memorized prompts (.txt, or .jsonl with a caption field)")
    d.add_argument("--skill_ratio", type=cli.finite_float, default=None,
                   help="default: the concept family's")
    d.add_argument("--save_images", type=cli.nonnegative_int, default=5,
                   help="base/target images to save (first pairs)")
    d.add_argument("--arithmetic", choices=["ours", "original"], default="ours",
                   help="scores and top-k: ours (fp32 scores, stable sort: ties to the lower column) or original "
                        "(the original's fp16 scores and unstable torch.sort; masks_sr{ratio}-original.safetensors)")
    _common(d)
    c = sub.add_parser("check", help="sample the target prompts with the per-call masks applied")
    c.add_argument("--masks", required=True)
    c.add_argument("--n_prompts", type=cli.positive_int, default=None, help="only the first N target prompts")
    _common(c)
    r = sub.add_parser("prune", help="union over the first tau calls -> pruned delta checkpoint")
    r.add_argument("--masks", required=True, nargs="+", help="one mask file per concept")
    r.add_argument("--tau", type=cli.positive_int, default=None, help="default: each concept family's tau")
    r.add_argument("--out", default=None, help="delta path (.ckpt/.safetensors); default {outdir}/delta_pruned.ckpt")
    _common(r, sampling=False)
    return p


def parse_argv(argv=None) -> Settings:
    """The command line as settings, without the checks of :func:`check` (argparse's own checks only)."""
    args = build_parser().parse_args(argv)
    cls = COMMANDS[args.command]
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    if cls is PruneSettings:
        values["masks"] = tuple(values["masks"])
    return cls(**values)


def settings_from_argv(argv=None) -> Settings:
    """Parse and check everything cheap (no weights are loaded); the checked settings of the subcommand."""
    return check(parse_argv(argv)).settings


# ----------------------------------------------------------------------------- cheap checks
def _str(path: PathLike | None) -> str | None:
    return None if path is None else os.fspath(path)


def _model_config(s: ModelSettings) -> dict:
    from ldm.checkpoint import require_checkpoint
    from ldm.util import load_model_config

    require_checkpoint(s.ckpt, "--ckpt", pipelines=True)
    if s.delta_ckpt is not None:
        require_checkpoint(s.delta_ckpt, "--delta_ckpt")
    if s.config is not None and not Path(s.config).is_file():
        raise FileNotFoundError(f"--config not found: {s.config}")
    model_config = load_model_config(s.config)
    from runtime.loading import check_checkpoints

    check_checkpoints(model_config, s.ckpt, s.delta_ckpt)
    return model_config


def _check_sampling(s: SamplingSettings) -> str:
    """The device the job samples on, once the sampling settings pass ``Sampling.validate`` and the device
    ``check_devices``."""
    import torch

    from runtime.generate import check_devices, check_noise

    if s.batch_size < 1:
        raise ValueError("--batch_size must be >= 1")
    device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
    s.sampling().validate()
    check_noise(s.noise, check_devices((device,)))
    return device


def _file_identity(path) -> dict | None:
    if path is None:
        return None
    from ldm.diffusers_format import source_identity

    return source_identity(path)  # a file, or every file of a diffusers pipeline folder


def _meta_shapes(model_config) -> dict:
    """Parameter shapes of the configured model, without weights (meta device)."""
    import torch

    from ldm.util import instantiate_from_config

    with torch.device("meta"):
        model = instantiate_from_config(model_config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check(settings: Settings) -> Plan:
    """Check everything cheap (no weights are loaded) and return the job's plan; raises ValueError (UsageError),
    FileNotFoundError, CheckpointError or MaskError with the command line's messages. ``check(plan.settings)``
    gives the same plan again."""
    from prune.prompts import build_pairs
    from prune.wanda import check_fit, load_masks, n_skilled, sha256_json

    s = settings
    if not isinstance(s, (DiscoverSettings, CheckSettings, PruneSettings)):
        raise TypeError(f"expected DiscoverSettings, CheckSettings or PruneSettings, not {type(s).__name__}")
    if s.paper_base and s.ckpt is not None:
        raise ValueError(f"give --ckpt or --paper_base (which means --ckpt {PAPER_CKPT}), not both")
    s = dataclasses.replace(s, ckpt=str(s.ckpt or (PAPER_CKPT if s.paper_base else DEFAULT_CKPT)), paper_base=False,
                            delta_ckpt=_str(s.delta_ckpt), config=os.fspath(s.config), outdir=_str(s.outdir))
    model_config = _model_config(s)
    if isinstance(s, DiscoverSettings):
        s = dataclasses.replace(s, device=_check_sampling(s), base_file=_str(s.base_file),
                                target_file=_str(s.target_file))
        pairs = build_pairs(s.concept, s.base_file, s.target_file, seed=s.seed)
        skill_ratio = pairs.defaults[0] if s.skill_ratio is None else s.skill_ratio
        n_skilled(skill_ratio, 1)  # range check
        sampling = {"sampler": "plms", "steps": s.steps, "scale": s.scale, "seed": s.seed,
                    "H": s.H, "W": s.W, "precision": s.precision, "negative_prompt": ""}
        if s.noise != "ours":  # only then: the norms' keys of the default stay what they were
            sampling["noise"] = s.noise
        if s.arithmetic not in ("ours", "original"):
            raise ValueError(f"--arithmetic must be ours or original, got {s.arithmetic!r}")
        if pairs.seeds is not None:  # gender: pair i starts from seed pairs.seeds[i] (base and target)
            sampling["pair_seeds"] = pairs.seeds
        identity = {"version": NORMS_VERSION, "base": pairs.base, "target": pairs.target, "settings": sampling,
                    "ckpt": _file_identity(s.ckpt), "delta": _file_identity(s.delta_ckpt),
                    "config": sha256_json(model_config)}
        outdir = cli.check_output(s.outdir or f"outputs/prune/{pairs.concept.replace(' ', '_')}", "--outdir",
                                  kind="dir")
        s = dataclasses.replace(s, skill_ratio=skill_ratio, outdir=str(outdir))
        return DiscoverPlan(s, model_config, pairs, sampling, norms_key=sha256_json(identity)[:16],
                            prompts_sha256=sha256_json({"base": pairs.base, "target": pairs.target}))
    if isinstance(s, CheckSettings):
        s = dataclasses.replace(s, device=_check_sampling(s), masks=os.fspath(s.masks))
        masks, meta = load_masks(s.masks)
        check_fit(meta, _meta_shapes(model_config), f"the model of {s.config}")
        if s.steps + 1 != meta["n_calls"]:
            raise ValueError(f"the masks were recorded over {meta['n_calls']} UNet calls; sample with "
                             f"--steps {meta['n_calls'] - 1} (PLMS makes steps + 1 calls), not {s.steps}")
        prompts = meta["target_prompts"][: s.n_prompts] if s.n_prompts else meta["target_prompts"]
        if not prompts:
            raise ValueError("no target prompts to check")
        outdir = cli.check_output(s.outdir or Path(s.masks).parent, "--outdir", kind="dir")
        return CheckPlan(dataclasses.replace(s, outdir=str(outdir)), model_config, masks, meta, prompts)
    # prune
    paths = (s.masks,) if isinstance(s.masks, (str, os.PathLike)) else tuple(s.masks)
    s = dataclasses.replace(s, masks=tuple(os.fspath(p) for p in paths))
    shapes = _meta_shapes(model_config)
    loaded = []
    for path in s.masks:
        masks, meta = load_masks(path)
        check_fit(meta, shapes, f"the model of {s.config}")
        tau = s.tau if s.tau is not None else int(meta.get("tau", 10))
        if tau > meta["n_calls"]:
            raise ValueError(f"tau={tau} is beyond the {meta['n_calls']} UNet calls recorded in {path}")
        loaded.append((path, masks, meta, tau))
    names = [x["name"] for x in loaded[0][2]["layers"]]
    for path, _, meta, _ in loaded[1:]:
        if [x["name"] for x in meta["layers"]] != names:
            raise ValueError(f"{path} covers other layers (or another order) than {loaded[0][0]}")
    out = Path(s.out) if s.out else Path(s.outdir or Path(s.masks[0]).parent) / "delta_pruned.ckpt"
    if out.suffix.lower() not in (".ckpt", ".safetensors", ".pt", ".pth"):
        raise ValueError(f"--out must end in .ckpt or .safetensors: {out}")
    inputs = [s.ckpt, s.delta_ckpt, s.config, *s.masks]
    outputs = {"--out": out, "its summary": out.with_name(out.stem + ".json")}
    if out.parent.name == "checkpoints":
        outputs["its run config"] = out.parent.parent / "configs" / f"{out.stem}-project.yaml"
    for what, path in outputs.items():
        cli.check_output(path, what if what == "--out" else f"{what} (from --out)", inputs=inputs)
    cli.check_distinct_outputs(outputs)
    return PrunePlan(dataclasses.replace(s, out=str(out)), model_config, loaded)


# ----------------------------------------------------------------------------- sampling
def _load(plan: DiscoverPlan | CheckPlan):
    from runtime.loading import load_model

    s = plan.settings
    return load_model(plan.model_config, s.ckpt, s.delta_ckpt, s.device).eval()


def _amp(s: SamplingSettings):
    import torch

    if s.precision == "autocast" and str(s.device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def sample_prompts(model, prompts, settings: SamplingSettings, hooks=None, decode: int = 0, seeds=None):
    """PLMS-sample ``prompts`` in batches, every prompt from the seed-``settings.seed`` start noise (with
    ``seeds``, prompt ``i`` from the seed-``seeds[i]`` one). Reads ``H``, ``W``, ``steps``, ``scale``, ``seed``,
    ``precision``, ``batch_size`` and ``device`` of ``settings``.

    ``hooks.start_generation()`` runs before every batch. Returns uint8 HWC arrays of the first
    ``decode`` images.
    """
    import numpy as np
    import torch

    from ldm.models.diffusion.plms import PLMSSampler
    from runtime.generate import latent_shape, start_noise

    s = settings
    shape = latent_shape(model, s.H, s.W)
    seeds = [s.seed] * len(prompts) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    noise = {k: start_noise(shape, k, model.device, s.noise) for k in set(seeds)}
    images = []
    with torch.no_grad(), _amp(s):
        for start in range(0, len(prompts), s.batch_size):
            batch = prompts[start: start + s.batch_size]
            n = len(batch)
            c = model.get_learned_conditioning(list(batch))
            uc = model.get_learned_conditioning([""] * n) if s.scale != 1.0 else None
            x_T = torch.stack([noise[k] for k in seeds[start: start + n]])
            if hooks is not None:
                hooks.start_generation()
            z, _ = PLMSSampler(model).sample(S=s.steps, batch_size=n, shape=shape, conditioning=c,
                                             unconditional_conditioning=uc,
                                             unconditional_guidance_scale=s.scale, eta=0.0, x_T=x_T,
                                             verbose=False, progress=False)
            need = max(0, min(n, decode - len(images)))
            if need:
                x = ((model.decode_first_stage(z[:need]).float() + 1) / 2).clamp(0, 1)
                images += list((255.0 * x.permute(0, 2, 3, 1).cpu().numpy()).astype(np.uint8))
    return images


def _save_png(array, path: Path):
    from runtime.files import save_png_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    save_png_atomic(array, path)


# ----------------------------------------------------------------------------- jobs
def _read_norms(path: Path, key: str, lmeta: list) -> dict[str, list]:
    """The norms cache of :func:`run_discover` (``{"base"|"target": [tensor per layer]}``); raises when the file is
    damaged or was not recorded for this key and these layers (its caller then records the norms again)."""
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        stored = json.loads(f.metadata()["conceptprune_norms"])
        if stored.get("key") != key or stored.get("layers") != lmeta:
            raise ValueError("recorded for other settings or layers")
        norms = {w: [f.get_tensor(f"{w}.{l}") for l in range(len(lmeta))] for w in ("base", "target")}
    calls = {n.shape[0] for ns in norms.values() for n in ns}
    if len(calls) != 1 or any(n.ndim != 2 or not torch.isfinite(n).all() for ns in norms.values() for n in ns):
        raise ValueError("norms of inconsistent shapes or non-finite values")
    return norms


def run_discover(settings: DiscoverSettings, plan: DiscoverPlan | None = None) -> dict:
    """Record the norms (or reuse them) and write the masks; returns the summary written to ``discover.json``.
    ``plan``: :func:`check`'s of these settings, when the caller has it (else it is made here)."""
    from ldm.checkpoint import save_state_dict
    from prune.hooks import ActivationRecorder, ff2_layers
    from prune.wanda import compute_masks, layer_meta, save_masks
    from runtime.files import read_cache

    plan = plan or check(settings)
    s, pairs, outdir = plan.settings, plan.pairs, Path(plan.settings.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    model = _load(plan)
    layers = ff2_layers(model)
    lmeta = layer_meta(layers)
    norms_path = outdir / f"norms-{plan.norms_key}.safetensors"
    norms = read_cache(norms_path, lambda p: _read_norms(p, plan.norms_key, lmeta), "the norms cache")
    reused = norms is not None
    if reused:
        print(f"reusing norms {norms_path}")
    else:  # absent, or damaged (read_cache warned): recorded again and replaced atomically by save_state_dict
        norms = {}
        for which, prompts in (("base", pairs.base), ("target", pairs.target)):
            rec = ActivationRecorder(layers)
            with rec:
                images = sample_prompts(model, prompts, s, hooks=rec, decode=s.save_images, seeds=pairs.seeds)
            norms[which] = rec.norms()
            for i, im in enumerate(images):
                _save_png(im, outdir / "images" / f"{which}_{i}.png")
        meta = {"key": plan.norms_key, "layers": lmeta, "settings": plan.sampling,
                "base": pairs.base, "target": pairs.target, "ckpt": s.ckpt, "delta": s.delta_ckpt}
        save_state_dict({f"{w}.{l}": n for w, ns in norms.items() for l, n in enumerate(ns)}, norms_path,
                        metadata={"conceptprune_norms": json.dumps(meta)})
    n_calls = norms["target"][0].shape[0]
    weights = [x.module.weight.detach() for x in layers]
    masks = compute_masks(weights, [n.to(weights[0].device) for n in norms["base"]],
                          [n.to(weights[0].device) for n in norms["target"]], s.skill_ratio, s.arithmetic)
    sr = s.skill_ratio
    suffix = "" if s.arithmetic == "ours" else f"-{s.arithmetic}"  # never overwrite the other arithmetic's masks
    masks_path = outdir / f"masks_sr{sr:g}{suffix}.safetensors"
    meta = {"concept": pairs.concept, "family": pairs.family, "skill_ratio": sr, "tau": pairs.defaults[1],
            "n_calls": n_calls, "layers": lmeta, "prompts_sha256": plan.prompts_sha256,
            "norms_key": plan.norms_key, "settings": plan.sampling, "target_prompts": pairs.target,
            "ckpt": s.ckpt, "delta": s.delta_ckpt}
    if s.arithmetic != "ours":
        meta["arithmetic"] = s.arithmetic
    save_masks(masks_path, masks, meta)
    counts = [[int(masks[(t, l)].numel()) for l in range(len(layers))] for t in range(n_calls)]
    summary = {"masks": str(masks_path), "norms": str(norms_path), "norms_reused": reused,
               "concept": pairs.concept, "family": pairs.family, "skill_ratio": sr, "n_calls": n_calls,
               "masked_per_call": [sum(c) for c in counts], "n_pairs": len(pairs.base)}
    if s.arithmetic != "ours":
        summary["arithmetic"] = s.arithmetic
    write_text_atomic(outdir / "discover.json", json.dumps(summary, indent=1))
    print(f"masks ({n_calls} calls x {len(layers)} layers, skill_ratio {sr:g}) -> {masks_path}")
    return summary


def run_check(settings: CheckSettings, plan: CheckPlan | None = None) -> list[Path]:
    """Sample the target prompts with and without the masks; returns the side-by-side images written."""
    import numpy as np

    from prune.hooks import MaskApplier, ff2_layers
    from prune.wanda import MaskError, to_dense

    plan = plan or check(settings)
    meta, masks, outdir = plan.meta, plan.masks, Path(plan.settings.outdir)
    model = _load(plan)
    layers = ff2_layers(model)
    if [x.name for x in layers] != [x["name"] for x in meta["layers"]]:
        raise MaskError("the masks' layer order differs from the model's execution order")
    shapes = [x.shape for x in layers]
    prompts = plan.prompts
    original = sample_prompts(model, prompts, plan.settings, decode=len(prompts))
    applier = MaskApplier(layers, lambda t, l: to_dense(masks[(t, l)], shapes[l], model.device), meta["n_calls"])
    with applier:
        pruned = sample_prompts(model, prompts, plan.settings, hooks=applier, decode=len(prompts))
    written = []
    for i, (a, b) in enumerate(zip(original, pruned)):
        gap = np.full((a.shape[0], 4, 3), 255, np.uint8)
        path = outdir / "check" / f"{i:03d}.png"
        _save_png(np.concatenate([a, gap, b], axis=1), path)
        written.append(path)
    write_text_atomic(outdir / "check" / "prompts.txt", "".join(p + "\n" for p in prompts))
    print(f"{len(written)} original|pruned pairs -> {outdir / 'check'}")
    return written


def run_prune(settings: PruneSettings, plan: PrunePlan | None = None) -> Path:
    """Zero the union of the masks over the first tau calls; returns the delta's path."""
    from ldm.checkpoint import load_state_dict
    from prune.wanda import check_fit, pruned_weights, union_of, union_over_calls
    from runtime.delta import save_delta

    plan = plan or check(settings)
    s, loaded, out = plan.settings, plan.loaded, Path(plan.settings.out)
    sd = dict(load_state_dict(s.ckpt))
    delta = dict(load_state_dict(s.delta_ckpt)) if s.delta_ckpt else {}
    sd.update({k: v for k, v in delta.items() if k in sd})
    layers = loaded[0][2]["layers"]
    check_fit(loaded[0][2], {k: tuple(v.shape) for k, v in sd.items()}, f"checkpoint {s.ckpt}")
    shapes = [(x["out_features"], x["in_features"]) for x in layers]
    unions = union_of(union_over_calls(m, shapes, tau, meta["n_calls"]) for _, m, meta, tau in loaded)
    pruned = pruned_weights(sd, [x["name"] for x in layers], unions)
    out_sd = {**delta, **pruned}
    n = sum(int(u.sum()) for u in unions)
    total = sum(u.numel() for u in unions)
    info = {"concepts": [m["concept"] for _, _, m, _ in loaded], "tau": [t for *_, t in loaded],
            "skill_ratio": [m["skill_ratio"] for _, _, m, _ in loaded], "masks": [str(p) for p, *_ in loaded],
            "pruned_weights": n, "ff2_weights": total, "base_ckpt": str(s.ckpt), "base_delta": s.delta_ckpt}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_delta(out, out_sd, metadata={"conceptprune": json.dumps(info)})
    per_layer = {x["name"]: round(int(u.sum()) / u.numel(), 6) for x, u in zip(layers, unions)}
    write_text_atomic(out.with_name(out.stem + ".json"),
                      json.dumps({**info, "density_per_layer": per_layer}, indent=1))
    if out.parent.name == "checkpoints":  # a run folder: evaluate.py --root finds the model config there
        from omegaconf import OmegaConf

        cfg = out.parent.parent / "configs" / f"{out.stem}-project.yaml"
        cfg.parent.mkdir(exist_ok=True)
        OmegaConf.save(OmegaConf.create({"model": plan.model_config}), cfg)
    print(f"pruned {n} of {total} ff.net.2 weights ({100 * n / total:.3f}%) -> {out}")
    return out


def run(settings: Settings, plan: Plan | None = None):
    """The job of ``settings``' type: :func:`run_discover`, :func:`run_check` or :func:`run_prune`."""
    if isinstance(settings, DiscoverSettings):
        return run_discover(settings, plan)
    if isinstance(settings, CheckSettings):
        return run_check(settings, plan)
    if isinstance(settings, PruneSettings):
        return run_prune(settings, plan)
    raise TypeError(f"expected DiscoverSettings, CheckSettings or PruneSettings, not {type(settings).__name__}")


def main(argv=None) -> int:
    """``conceptprune.py``: a bad input is one ``error:`` line and exit status 2, before any work."""
    plan = cli.exit_on_usage_error(lambda: check(parse_argv(argv)))  # CheckpointError/MaskError included
    cli.exit_on_run_error(lambda: run(plan.settings, plan))  # a broken model (status 2), a full disk (status 1)
    return 0


if __name__ == "__main__":  # python -m prune.jobs (an installed copy without its bin/ on PATH)
    raise SystemExit(main())
