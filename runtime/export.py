"""Merge a base checkpoint and an ablation delta into one full checkpoint (optionally a diffusers folder).

    python tools/export.py --ckpt assets/pretrained_models/sd-v1-4.ckpt \\
        --delta_ckpt logs/<run>/checkpoints/delta.ckpt --out ablated.safetensors \\
        [--config CFG] [--half] [--diffusers OUT_DIR] [--scheduler ddim|pndm]

``--out`` (``.safetensors`` or ``.ckpt``) receives the complete ``LatentDiffusion`` state dict in the
CompVis single-file layout (the keys of ``sd-v1-4.ckpt``: ``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.text_model.*`` including ``position_ids``, and
the noise-schedule buffers), so ``sample.py --ckpt merged.safetensors`` and other CompVis-layout tools
load it without the delta. The file is written atomically; safetensors metadata names the base, delta
and config files. ``--half`` stores floating tensors as float16 (integer tensors are kept).

The model config is ``--config``, else the config saved in the delta's training run
(``{run}/configs/*.yaml``), else ``configs/stable-diffusion/v1-inference.yaml``.

``--diffusers OUT_DIR`` (needs the ``diffusers`` package) also writes a ``StableDiffusionPipeline``
folder, built offline: component configs come from the model config (tiny configs work too), weights
are converted with diffusers' own CompVis converters, the tokenizer is made from our CLIP BPE
vocabulary, and the scheduler uses the model's training schedule (SD v1: ``scaled_linear``
0.00085-0.012, 1000 steps, ``steps_offset=1``). transformers' tokenizer does not run ftfy, so its ids
differ from ours only on text that ftfy repairs (curly quotes, full-width letters, ligatures). No safety
checker is included. Load it with ``StableDiffusionPipeline.from_pretrained(OUT_DIR)``. OUT_DIR must not
exist or be empty; ``--half`` also applies to it.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from runtime import cli
from runtime.resources import DEFAULT_CONFIG

__all__ = ["ExportSettings", "ExportError", "build_parser", "settings_from_argv", "check", "run", "main",
           "merged_state_dict", "diffusers_configs", "build_pipeline", "save_pipeline", "SUFFIXES"]

SUFFIXES = (".safetensors", ".ckpt")
CLIP_PREFIX = "cond_stage_model.transformer."  # diffusers' converter strips this; "text_model." remains


class ExportError(ValueError):
    """The requested export cannot be done (bad arguments or an unsupported model config)."""


@dataclass(frozen=True)
class ExportSettings:
    """One ``tools/export.py`` call: a field per flag, with the command line's defaults. :func:`check`
    fills in ``config`` (the delta's run config, else v1-inference.yaml)."""

    ckpt: str | Path  # base checkpoint
    delta_ckpt: str | Path  # delta merged into ckpt
    out: str | Path  # merged checkpoint: .safetensors or .ckpt
    config: str | Path | None = None
    diffusers: str | Path | None = None  # also write a diffusers pipeline folder here
    scheduler: str = "ddim"  # "ddim" or "pndm": the scheduler of the diffusers folder
    half: bool = False  # store floating tensors as float16


# --------------------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    d = ExportSettings  # the defaults are the settings' defaults
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", required=True, help="base checkpoint (.ckpt / .safetensors)")
    p.add_argument("--delta_ckpt", required=True, help="delta checkpoint to merge into --ckpt")
    p.add_argument("--out", required=True, help="merged checkpoint: .safetensors or .ckpt")
    p.add_argument("--config", default=None,
                   help=f"model config (default: the delta's run config, else {DEFAULT_CONFIG.name})")
    p.add_argument("--diffusers", default=None, metavar="OUT_DIR", help="also write a diffusers pipeline folder")
    p.add_argument("--scheduler", choices=["ddim", "pndm"], default=d.scheduler,
                   help="scheduler of the diffusers folder")
    p.add_argument("--half", action="store_true", help="store floating tensors as float16")
    return p


def settings_from_argv(argv=None) -> ExportSettings:
    """Parse the command line and check everything cheap (:func:`check`)."""
    return check(ExportSettings(**vars(build_parser().parse_args(argv))))


def check(settings: ExportSettings) -> ExportSettings:
    """Check everything cheap before loading weights; returns the settings with ``config`` resolved.
    Raises FileNotFoundError, ExportError / UsageError (ValueErrors) or CheckpointError."""
    from ldm.checkpoint import require_checkpoint
    from ldm.util import load_model_config
    from runtime.loading import check_checkpoints, resolve_model

    s = settings
    require_checkpoint(s.ckpt, "--ckpt", pipelines=True)
    require_checkpoint(s.delta_ckpt, "--delta_ckpt")
    out = Path(s.out)
    if out.suffix.lower() not in SUFFIXES:
        raise ExportError(f"--out {out}: the suffix must be .safetensors or .ckpt")
    config_path = resolve_model(s.config, s.delta_ckpt).config  # the delta's run config (not the base's)
    try:
        model_config = load_model_config(config_path)
    except ValueError as e:  # no model: section
        raise ExportError(str(e)) from None
    if s.diffusers is not None:
        if importlib.util.find_spec("diffusers") is None:
            raise ExportError("--diffusers needs the 'diffusers' package (pip install -r requirements-dev.txt)")
        target = Path(s.diffusers)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise ExportError(f"--diffusers {target} exists and is not an empty directory")
        cli.check_output(target, "--diffusers", kind="dir")
        diffusers_configs(model_config)  # unsupported architectures fail here, before any work
    cli.check_output(out, "--out", inputs=[s.ckpt, s.delta_ckpt, config_path])
    check_checkpoints(model_config, s.ckpt, s.delta_ckpt)
    return dataclasses.replace(s, config=config_path)


# --------------------------------------------------------------------------- single file

def merged_state_dict(model: torch.nn.Module, half: bool = False) -> dict[str, torch.Tensor]:
    """The full CompVis-layout state dict; with ``half``, floating tensors in float16."""
    sd = model.state_dict()
    if half:
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    return sd


# --------------------------------------------------------------------------- diffusers

def _params(node: Mapping | None, what: str) -> dict:
    if not node or "params" not in node:
        raise ExportError(f"model config has no {what}.params")
    return dict(node["params"])


def diffusers_configs(model_config: Mapping) -> dict[str, dict]:
    """diffusers/scheduler kwargs equivalent to a CompVis LatentDiffusion config (SD v1 family).

    Returns ``{"unet": ..., "vae": ..., "scheduler": ...}``. Raises :class:`ExportError` for features
    with no diffusers ``StableDiffusionPipeline`` counterpart.
    """
    ld = dict(model_config.get("params", {}))
    unet = _params(ld.get("unet_config"), "unet_config")
    vae = _params(ld.get("first_stage_config"), "first_stage_config")
    dd = dict(vae.get("ddconfig", {}))

    # ---- UNet
    if ld.get("conditioning_key", "crossattn") != "crossattn":
        raise ExportError(f"conditioning_key {ld.get('conditioning_key')!r}: only 'crossattn' exports to diffusers")
    for key, ok in (("num_classes", None), ("dims", 2), ("resblock_updown", False), ("conv_resample", True),
                    ("use_spatial_transformer", True), ("disable_self_attentions", None),
                    ("use_scale_shift_norm", False)):
        if key in unet and unet[key] != ok:
            raise ExportError(f"unet_config.params.{key}={unet[key]!r} has no diffusers UNet2DConditionModel mapping")
    context_dim = unet.get("context_dim")
    if not isinstance(context_dim, int):
        raise ExportError(f"unet_config.params.context_dim must be an int, got {context_dim!r}")
    mult = list(unet["channel_mult"])
    chans = [unet["model_channels"] * m for m in mult]
    n_heads, head_ch = unet.get("num_heads", -1), unet.get("num_head_channels", -1)
    if unet.get("num_heads_upsample", -1) not in (-1, n_heads):
        raise ExportError("unet_config.params.num_heads_upsample differs from num_heads: not mappable")
    if head_ch == -1:
        heads = [n_heads] * len(chans)
    else:
        if unet.get("legacy", True):
            raise ExportError("legacy=True with num_head_channels is not supported")
        heads = [c // head_ch for c in chans]
    attn = [2 ** i in set(unet["attention_resolutions"]) for i in range(len(mult))]
    unet_cfg = dict(
        sample_size=ld.get("image_size", 64), in_channels=unet["in_channels"], out_channels=unet["out_channels"],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        block_out_channels=chans, layers_per_block=unet["num_res_blocks"],
        transformer_layers_per_block=unet.get("transformer_depth", 1), cross_attention_dim=context_dim,
        attention_head_dim=heads,  # diffusers' SD v1 naming quirk: the number of heads per level
        use_linear_projection=bool(unet.get("use_linear_in_transformer", False)),
        norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
        downsample_padding=1, upcast_attention=False, center_input_sample=False, dropout=0.0,
    )

    # ---- VAE
    if dd.get("attn_resolutions"):
        raise ExportError("first_stage_config ddconfig.attn_resolutions must be empty (diffusers' AutoencoderKL "
                          "has attention only in the mid blocks)")
    if not dd.get("double_z", True) or vae.get("embed_dim", dd.get("z_channels")) != dd.get("z_channels"):
        raise ExportError("first_stage_config: diffusers' AutoencoderKL needs double_z and embed_dim == z_channels")
    factor = 2 ** (len(dd["ch_mult"]) - 1)
    vae_cfg = dict(
        sample_size=ld.get("image_size", 64) * factor, in_channels=dd["in_channels"], out_channels=dd["out_ch"],
        down_block_types=["DownEncoderBlock2D"] * len(dd["ch_mult"]),
        up_block_types=["UpDecoderBlock2D"] * len(dd["ch_mult"]),
        block_out_channels=[dd["ch"] * m for m in dd["ch_mult"]], layers_per_block=dd["num_res_blocks"],
        latent_channels=dd["z_channels"], norm_num_groups=32, act_fn="silu",
        scaling_factor=float(ld.get("scale_factor", 1.0)),
    )

    # ---- scheduler (CompVis "linear" = linspace of sqrt(beta), squared = diffusers "scaled_linear")
    if ld.get("beta_schedule", "linear") != "linear" or ld.get("given_betas") is not None:
        raise ExportError(f"beta_schedule {ld.get('beta_schedule')!r}: only the SD v1 'linear' schedule exports")
    param = ld.get("parameterization", "eps")
    sched_cfg = dict(
        num_train_timesteps=int(ld.get("timesteps", 1000)), beta_start=float(ld.get("linear_start", 1e-4)),
        beta_end=float(ld.get("linear_end", 2e-2)), beta_schedule="scaled_linear", steps_offset=1,
        set_alpha_to_one=False, prediction_type={"eps": "epsilon", "x0": "sample"}[param],
    )
    return {"unet": unet_cfg, "vae": vae_cfg, "scheduler": sched_cfg}


def _load_strict(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or wrong:
        raise ExportError(f"converted {what} weights do not fit diffusers' model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")
    module.load_state_dict(sd, strict=True)


def _hf_clip_tokenizer(ours, max_length: int):
    """transformers' CLIPTokenizer with our BPE vocabulary (no download)."""
    from transformers import CLIPTokenizer

    merges = sorted(ours.bpe_ranks, key=ours.bpe_ranks.get)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps(ours.encoder, ensure_ascii=False), encoding="utf-8")
        Path(tmp, "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                           encoding="utf-8")
        tok = CLIPTokenizer.from_pretrained(tmp, local_files_only=True, model_max_length=max_length,
                                            pad_token="<|endoftext|>")
    return tok


def build_pipeline(model: torch.nn.Module, model_config: Mapping, scheduler: str = "ddim"):
    """A diffusers ``StableDiffusionPipeline`` holding copies of ``model``'s weights (CPU, float32)."""
    try:
        import diffusers
        from diffusers.loaders.single_file_utils import (
            convert_ldm_clip_checkpoint,
            convert_ldm_unet_checkpoint,
            convert_ldm_vae_checkpoint,
        )
        from transformers import CLIPTextConfig, CLIPTextModel
    except ImportError as e:
        raise ExportError(f"--diffusers needs the 'diffusers' package, which could not be imported ({e})") from e

    from ldm.checkpoint import skip_init

    cfgs = diffusers_configs(model_config)
    sd = model.state_dict()

    with skip_init():
        unet = diffusers.UNet2DConditionModel(**cfgs["unet"])
        vae = diffusers.AutoencoderKL(**cfgs["vae"])
    _load_strict(unet, convert_ldm_unet_checkpoint(sd, cfgs["unet"]), "UNet")
    _load_strict(vae, convert_ldm_vae_checkpoint(sd, cfgs["vae"]), "VAE")

    enc = model.cond_stage_model
    text_config = CLIPTextConfig.from_dict(enc.transformer.text_model.config.to_dict())
    with skip_init():
        text_encoder = CLIPTextModel(text_config)
    clip_sd = convert_ldm_clip_checkpoint({k: v for k, v in sd.items() if k.startswith(CLIP_PREFIX)})
    wanted = text_encoder.state_dict()
    if not any(k.startswith("text_model.") for k in wanted):  # transformers 5 dropped the text_model level
        clip_sd = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in clip_sd.items()}
    clip_sd = {k: v for k, v in clip_sd.items() if not k.endswith("position_ids") or k in wanted}
    _load_strict(text_encoder, clip_sd, "text encoder")

    tokenizer = _hf_clip_tokenizer(enc.tokenizer, enc.max_length)
    if scheduler == "ddim":
        sched = diffusers.DDIMScheduler(clip_sample=False, **cfgs["scheduler"])
    else:
        sched = diffusers.PNDMScheduler(skip_prk_steps=True, **cfgs["scheduler"])
    return diffusers.StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(), scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_pipeline(pipe, out_dir: str | os.PathLike, half: bool = False) -> None:
    """``pipe.save_pretrained`` into a temporary sibling folder, moved to ``out_dir`` when complete."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the folder is for sharing, as mkdir would make it
    try:
        if half:  # pipe.to(torch_dtype=...) does not cast on CPU; cast the modules themselves
            for module in (pipe.unet, pipe.vae, pipe.text_encoder):
                module.to(dtype=torch.float16)
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        for path in tmp.rglob("*"):  # diffusers writes its shards 0600 (temporary files): normal modes
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        if out.exists():
            out.rmdir()  # check() made sure it is empty
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # disk full: one line naming the folder
            from runtime.files import write_error

            raise write_error(e, out, "the diffusers folder") from None
        raise


# --------------------------------------------------------------------------- main

def _size(n_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.1f} {unit}" if unit != "B" else f"{n_bytes} B"
        n_bytes /= 1024
    return ""


def run(settings: ExportSettings) -> Path:
    """Check ``settings`` (:func:`check`), merge and write; returns the merged checkpoint's path."""
    return _export(check(settings))


def _export(s: ExportSettings) -> Path:
    """:func:`run` for settings that :func:`check` returned."""
    from ldm.checkpoint import save_state_dict
    from ldm.util import load_model_config
    from runtime.loading import load_model

    config_path = Path(s.config)
    print(f"config: {config_path}")
    model_config = load_model_config(config_path)
    model = load_model(model_config, s.ckpt, s.delta_ckpt, device="cpu")

    sd = merged_state_dict(model, half=s.half)
    metadata = {"base_ckpt": Path(s.ckpt).name, "delta_ckpt": Path(s.delta_ckpt).name,
                "config": config_path.name, "dtype": "float16" if s.half else "float32",
                "format": "pt", "exported_by": "tools/export.py"}
    out = Path(s.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_state_dict(sd, out, metadata=metadata)  # atomic: a failed write leaves no temporary file
    except OSError as e:
        from runtime.files import write_error

        raise write_error(e, out, "the merged checkpoint") from None
    n_params = sum(v.numel() for v in sd.values())
    print(f"wrote {out}: {len(sd)} tensors, {n_params / 1e6:.1f}M values, {_size(out.stat().st_size)} "
          f"({metadata['dtype']}; base {metadata['base_ckpt']} + delta {metadata['delta_ckpt']})")

    if s.diffusers is not None:
        pipe = build_pipeline(model, model_config, scheduler=s.scheduler)
        save_pipeline(pipe, s.diffusers, half=s.half)
        total = sum(p.stat().st_size for p in Path(s.diffusers).rglob("*") if p.is_file())
        print(f"wrote diffusers pipeline {s.diffusers} ({_size(total)}, {s.scheduler} scheduler)")
    return out


def main(argv=None) -> int:
    """``python tools/export.py ...``: a bad input is one ``error:`` line and exit status 2, before any work."""
    settings = cli.exit_on_usage_error(lambda: settings_from_argv(argv))
    cli.exit_on_run_error(lambda: _export(settings))  # a NaN/inf weight in the base (2), a full disk (1)
    return 0


if __name__ == "__main__":  # python -m runtime.export (an installed copy without its bin/ on PATH)
    raise SystemExit(main())
