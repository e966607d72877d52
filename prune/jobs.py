#!/usr/bin/env python
"""ConceptPrune on our Stable Diffusion v1: three steps.

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
from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from pathlib import Path

from runtime import cli

REPO = Path(__file__).resolve().parent
DEFAULT_CONFIG = REPO / "configs/stable-diffusion/v1-inference.yaml"
DEFAULT_CKPT = REPO / "assets/pretrained_models/sd-v1-4.ckpt"
PAPER_CKPT = REPO / "assets/pretrained_models/v1-5-pruned-emaonly.safetensors"  # ConceptPrune's base: SD v1.5
NORMS_VERSION = 1  # bump if the recorded statistic changes


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
        p.add_argument("--scale", type=cli.finite_float, default=7.5, help="classifier-free guidance scale")
        p.add_argument("--seed", type=cli.nonnegative_int, default=0,
                       help="seed of the start noise of every generation (gender: of the per-pair seeds)")
        p.add_argument("--precision", choices=["autocast", "full"], default="autocast",
                       help="autocast: fp16 on CUDA (norms are accumulated in fp32 either way)")
        p.add_argument("--batch_size", type=cli.positive_int, default=4,
                       help="prompts per UNet batch; every prompt gets the same seed-`seed` start noise "
                            "(gender pairs: their own seeds)")
        p.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def get_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__)
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


# ----------------------------------------------------------------------------- cheap checks
def _model_config(args):
    from omegaconf import OmegaConf

    from ldm.diffusers_format import checkpoint_exists

    if not checkpoint_exists(args.ckpt):
        raise FileNotFoundError(f"--ckpt not found: {args.ckpt} (a checkpoint file or a diffusers pipeline folder)")
    for what, path in (("--delta_ckpt", args.delta_ckpt), ("--config", args.config)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{what} not found: {path}")
    config = OmegaConf.load(args.config)
    if "model" not in config:
        raise ValueError(f"{args.config} has no 'model:' section")
    model_config = OmegaConf.to_container(config.model, resolve=True)
    from runtime.loading import check_checkpoints

    check_checkpoints(model_config, args.ckpt, args.delta_ckpt)
    return model_config


def _check_sampling(args):
    import torch

    from runtime.generate import validate_generation_args

    if args.batch_size < 1:
        raise ValueError("--batch_size must be >= 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    validate_generation_args(["x"], steps=args.steps, eta=0.0, scale=args.scale, batch_size=args.batch_size,
                             height=args.H, width=args.W, seed=args.seed, devices=(device,),
                             precision=args.precision)
    args.device = device


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


def resolve(argv=None) -> dict:
    """Parse and check everything cheap (no weights are loaded). Returns the plan of the command."""
    from prune.prompts import build_pairs
    from prune.wanda import check_fit, load_masks, n_skilled, sha256_json

    args = get_parser().parse_args(argv)
    if args.paper_base and args.ckpt is not None:
        raise ValueError(f"give --ckpt or --paper_base (which means --ckpt {PAPER_CKPT}), not both")
    args.ckpt = str(args.ckpt or (PAPER_CKPT if args.paper_base else DEFAULT_CKPT))
    model_config = _model_config(args)
    plan = {"args": args, "model_config": model_config}
    if args.command == "discover":
        _check_sampling(args)
        pairs = build_pairs(args.concept, args.base_file, args.target_file, seed=args.seed)
        skill_ratio = pairs.defaults[0] if args.skill_ratio is None else args.skill_ratio
        n_skilled(skill_ratio, 1)  # range check
        settings = {"sampler": "plms", "steps": args.steps, "scale": args.scale, "seed": args.seed,
                    "H": args.H, "W": args.W, "precision": args.precision, "negative_prompt": ""}
        if pairs.seeds is not None:  # gender: pair i starts from seed pairs.seeds[i] (base and target)
            settings["pair_seeds"] = pairs.seeds
        identity = {"version": NORMS_VERSION, "base": pairs.base, "target": pairs.target, "settings": settings,
                    "ckpt": _file_identity(args.ckpt), "delta": _file_identity(args.delta_ckpt),
                    "config": sha256_json(model_config)}
        outdir = cli.check_output(args.outdir or f"outputs/prune/{pairs.concept.replace(' ', '_')}", "--outdir",
                                  kind="dir")
        plan.update(pairs=pairs, skill_ratio=skill_ratio, settings=settings, outdir=outdir,
                    norms_key=sha256_json(identity)[:16],
                    prompts_sha256=sha256_json({"base": pairs.base, "target": pairs.target}))
    elif args.command == "check":
        _check_sampling(args)
        masks, meta = load_masks(args.masks)
        check_fit(meta, _meta_shapes(model_config), f"the model of {args.config}")
        if args.steps + 1 != meta["n_calls"]:
            raise ValueError(f"the masks were recorded over {meta['n_calls']} UNet calls; sample with "
                             f"--steps {meta['n_calls'] - 1} (PLMS makes steps + 1 calls), not {args.steps}")
        prompts = meta["target_prompts"][: args.n_prompts] if args.n_prompts else meta["target_prompts"]
        if not prompts:
            raise ValueError("no target prompts to check")
        outdir = cli.check_output(args.outdir or Path(args.masks).parent, "--outdir", kind="dir")
        plan.update(masks=masks, meta=meta, prompts=prompts, outdir=outdir)
    else:  # prune
        shapes = _meta_shapes(model_config)
        loaded = []
        for path in args.masks:
            masks, meta = load_masks(path)
            check_fit(meta, shapes, f"the model of {args.config}")
            tau = args.tau if args.tau is not None else int(meta.get("tau", 10))
            if tau > meta["n_calls"]:
                raise ValueError(f"tau={tau} is beyond the {meta['n_calls']} UNet calls recorded in {path}")
            loaded.append((path, masks, meta, tau))
        names = [x["name"] for x in loaded[0][2]["layers"]]
        for path, _, meta, _ in loaded[1:]:
            if [x["name"] for x in meta["layers"]] != names:
                raise ValueError(f"{path} covers other layers (or another order) than {loaded[0][0]}")
        out = Path(args.out) if args.out else Path(args.outdir or Path(args.masks[0]).parent) / "delta_pruned.ckpt"
        if out.suffix.lower() not in (".ckpt", ".safetensors", ".pt", ".pth"):
            raise ValueError(f"--out must end in .ckpt or .safetensors: {out}")
        inputs = [args.ckpt, args.delta_ckpt, args.config, *args.masks]
        outputs = {"--out": out, "its summary": out.with_name(out.stem + ".json")}
        if out.parent.name == "checkpoints":
            outputs["its run config"] = out.parent.parent / "configs" / f"{out.stem}-project.yaml"
        for what, path in outputs.items():
            cli.check_output(path, what if what == "--out" else f"{what} (from --out)", inputs=inputs)
        cli.check_distinct_outputs(outputs)
        plan.update(loaded=loaded, out=out)
    return plan


# ----------------------------------------------------------------------------- sampling
def _load(plan):
    from runtime.loading import load_model

    args = plan["args"]
    return load_model(plan["model_config"], args.ckpt, args.delta_ckpt, args.device).eval()


def _amp(args):
    import torch

    if args.precision == "autocast" and str(args.device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def sample_prompts(model, prompts, args, hooks=None, decode: int = 0, seeds=None):
    """PLMS-sample ``prompts`` in batches, every prompt from the seed-``args.seed`` start noise (with
    ``seeds``, prompt ``i`` from the seed-``seeds[i]`` one).

    ``hooks.start_generation()`` runs before every batch. Returns uint8 HWC arrays of the first
    ``decode`` images.
    """
    import numpy as np
    import torch

    from runtime.generate import latent_shape
    from ldm.models.diffusion.plms import PLMSSampler

    shape = latent_shape(model, args.H, args.W)
    seeds = [args.seed] * len(prompts) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    noise = {s: torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in set(seeds)}
    images = []
    with torch.no_grad(), _amp(args):
        for s in range(0, len(prompts), args.batch_size):
            batch = prompts[s: s + args.batch_size]
            n = len(batch)
            c = model.get_learned_conditioning(list(batch))
            uc = model.get_learned_conditioning([""] * n) if args.scale != 1.0 else None
            x_T = torch.stack([noise[k] for k in seeds[s: s + n]]).to(model.device)
            if hooks is not None:
                hooks.start_generation()
            z, _ = PLMSSampler(model).sample(S=args.steps, batch_size=n, shape=shape, conditioning=c,
                                             unconditional_conditioning=uc,
                                             unconditional_guidance_scale=args.scale, eta=0.0, x_T=x_T,
                                             verbose=False, progress=False)
            need = max(0, min(n, decode - len(images)))
            if need:
                x = ((model.decode_first_stage(z[:need]).float() + 1) / 2).clamp(0, 1)
                images += list((255.0 * x.permute(0, 2, 3, 1).cpu().numpy()).astype(np.uint8))
    return images


def _save_png(array, path: Path):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# ----------------------------------------------------------------------------- commands
def run_discover(plan) -> dict:
    from safetensors import safe_open

    from ldm.checkpoint import save_state_dict
    from prune.hooks import ActivationRecorder, ff2_layers
    from prune.wanda import compute_masks, layer_meta, save_masks

    args, pairs, outdir = plan["args"], plan["pairs"], plan["outdir"]
    outdir.mkdir(parents=True, exist_ok=True)
    model = _load(plan)
    layers = ff2_layers(model)
    lmeta = layer_meta(layers)
    norms_path = outdir / f"norms-{plan['norms_key']}.safetensors"
    reused = norms_path.is_file()
    if reused:
        with safe_open(str(norms_path), framework="pt") as f:
            stored = json.loads(f.metadata()["conceptprune_norms"])
            if stored["layers"] != lmeta:
                raise RuntimeError(f"{norms_path} was recorded on other layers; delete it")
            norms = {w: [f.get_tensor(f"{w}.{l}") for l in range(len(layers))] for w in ("base", "target")}
        print(f"reusing norms {norms_path}")
    else:
        norms = {}
        for which, prompts in (("base", pairs.base), ("target", pairs.target)):
            rec = ActivationRecorder(layers)
            with rec:
                images = sample_prompts(model, prompts, args, hooks=rec, decode=args.save_images, seeds=pairs.seeds)
            norms[which] = rec.norms()
            for i, im in enumerate(images):
                _save_png(im, outdir / "images" / f"{which}_{i}.png")
        meta = {"key": plan["norms_key"], "layers": lmeta, "settings": plan["settings"],
                "base": pairs.base, "target": pairs.target, "ckpt": args.ckpt, "delta": args.delta_ckpt}
        save_state_dict({f"{w}.{l}": n for w, ns in norms.items() for l, n in enumerate(ns)}, norms_path,
                        metadata={"conceptprune_norms": json.dumps(meta)})
    n_calls = norms["target"][0].shape[0]
    weights = [x.module.weight.detach() for x in layers]
    masks = compute_masks(weights, [n.to(weights[0].device) for n in norms["base"]],
                          [n.to(weights[0].device) for n in norms["target"]], plan["skill_ratio"])
    sr = plan["skill_ratio"]
    masks_path = outdir / f"masks_sr{sr:g}.safetensors"
    meta = {"concept": pairs.concept, "family": pairs.family, "skill_ratio": sr, "tau": pairs.defaults[1],
            "n_calls": n_calls, "layers": lmeta, "prompts_sha256": plan["prompts_sha256"],
            "norms_key": plan["norms_key"], "settings": plan["settings"], "target_prompts": pairs.target,
            "ckpt": args.ckpt, "delta": args.delta_ckpt}
    save_masks(masks_path, masks, meta)
    counts = [[int(masks[(t, l)].numel()) for l in range(len(layers))] for t in range(n_calls)]
    summary = {"masks": str(masks_path), "norms": str(norms_path), "norms_reused": reused,
               "concept": pairs.concept, "family": pairs.family, "skill_ratio": sr, "n_calls": n_calls,
               "masked_per_call": [sum(c) for c in counts], "n_pairs": len(pairs.base)}
    (outdir / "discover.json").write_text(json.dumps(summary, indent=1))
    print(f"masks ({n_calls} calls x {len(layers)} layers, skill_ratio {sr:g}) -> {masks_path}")
    return summary


def run_check(plan) -> list[Path]:
    import numpy as np

    from prune.hooks import MaskApplier, ff2_layers
    from prune.wanda import MaskError, to_dense

    args, meta, masks, outdir = plan["args"], plan["meta"], plan["masks"], plan["outdir"]
    model = _load(plan)
    layers = ff2_layers(model)
    if [x.name for x in layers] != [x["name"] for x in meta["layers"]]:
        raise MaskError("the masks' layer order differs from the model's execution order")
    shapes = [x.shape for x in layers]
    prompts = plan["prompts"]
    original = sample_prompts(model, prompts, args, decode=len(prompts))
    applier = MaskApplier(layers, lambda t, l: to_dense(masks[(t, l)], shapes[l], model.device), meta["n_calls"])
    with applier:
        pruned = sample_prompts(model, prompts, args, hooks=applier, decode=len(prompts))
    written = []
    for i, (a, b) in enumerate(zip(original, pruned)):
        gap = np.full((a.shape[0], 4, 3), 255, np.uint8)
        path = outdir / "check" / f"{i:03d}.png"
        _save_png(np.concatenate([a, gap, b], axis=1), path)
        written.append(path)
    (outdir / "check" / "prompts.txt").write_text("".join(p + "\n" for p in prompts))
    print(f"{len(written)} original|pruned pairs -> {outdir / 'check'}")
    return written


def run_prune(plan) -> Path:
    from runtime.delta import save_delta
    from ldm.checkpoint import load_state_dict
    from prune.wanda import check_fit, pruned_weights, union_of, union_over_calls

    args, loaded, out = plan["args"], plan["loaded"], plan["out"]
    sd = dict(load_state_dict(args.ckpt))
    delta = dict(load_state_dict(args.delta_ckpt)) if args.delta_ckpt else {}
    sd.update({k: v for k, v in delta.items() if k in sd})
    layers = loaded[0][2]["layers"]
    check_fit(loaded[0][2], {k: tuple(v.shape) for k, v in sd.items()}, f"checkpoint {args.ckpt}")
    shapes = [(x["out_features"], x["in_features"]) for x in layers]
    unions = union_of(union_over_calls(m, shapes, tau, meta["n_calls"]) for _, m, meta, tau in loaded)
    pruned = pruned_weights(sd, [x["name"] for x in layers], unions)
    out_sd = {**delta, **pruned}
    n = sum(int(u.sum()) for u in unions)
    total = sum(u.numel() for u in unions)
    info = {"concepts": [m["concept"] for _, _, m, _ in loaded], "tau": [t for *_, t in loaded],
            "skill_ratio": [m["skill_ratio"] for _, _, m, _ in loaded], "masks": [str(p) for p, *_ in loaded],
            "pruned_weights": n, "ff2_weights": total, "base_ckpt": str(args.ckpt), "base_delta": args.delta_ckpt}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_delta(out, out_sd, metadata={"conceptprune": json.dumps(info)})
    per_layer = {x["name"]: round(int(u.sum()) / u.numel(), 6) for x, u in zip(layers, unions)}
    out.with_name(out.stem + ".json").write_text(json.dumps({**info, "density_per_layer": per_layer}, indent=1))
    if out.parent.name == "checkpoints":  # a run folder: evaluate.py --root finds the model config there
        from omegaconf import OmegaConf

        cfg = out.parent.parent / "configs" / f"{out.stem}-project.yaml"
        cfg.parent.mkdir(exist_ok=True)
        OmegaConf.save(OmegaConf.create({"model": plan["model_config"]}), cfg)
    print(f"pruned {n} of {total} ff.net.2 weights ({100 * n / total:.3f}%) -> {out}")
    return out


RUNNERS = {"discover": run_discover, "check": run_check, "prune": run_prune}


def main(argv=None):
    plan = resolve(argv)
    return RUNNERS[plan["args"].command](plan)


if __name__ == "__main__":
    checked = cli.exit_on_usage_error(resolve)  # CheckpointError/MaskError included
    RUNNERS[checked["args"].command](checked)
