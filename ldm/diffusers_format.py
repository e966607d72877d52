"""Read a diffusers-format Stable Diffusion v1 model as a CompVis-keyed state dict.

Two sources are accepted wherever a base checkpoint is taken (``train.py -rc``, ``sample.py --ckpt``,
``evaluate.py --base_ckpt``, ``conceptprune.py --ckpt``, ``tools/export.py --ckpt``):

* a ``StableDiffusionPipeline`` folder (``unet/``, ``vae/``, ``text_encoder/``, ``scheduler/``; weights as
  ``.safetensors`` or ``.bin``, plain, ``fp16`` variant or sharded with an ``.index.json``);
* a single UNet weights file with diffusers keys (``conv_in.weight``, ``down_blocks.0...``) inside such a
  folder (``<pipeline>/unet/<file>``, e.g. a fine-tuned UNet saved there): the UNet comes from the file,
  the VAE, text encoder and schedule from the folder around it. A UNet file alone holds no VAE or text
  encoder, so outside a pipeline folder it is refused with that reason.

The result has the keys of ``sd-v1-4.ckpt``: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*``
(VAE; diffusers' linear attention projections become 1x1 convolutions), ``cond_stage_model.transformer.
text_model.*`` (with ``position_ids``), and the 12 noise-schedule buffers, computed as ``DDPM`` computes
them (:func:`ldm.modules.diffusionmodules.util.schedule_buffers`) from the pipeline's ``scheduler_config.json``
(``scaled_linear`` is the CompVis ``linear`` schedule). The mapping is the inverse of diffusers' own CompVis converters
(``diffusers.loaders.single_file_utils.convert_ldm_*_checkpoint``, used by ``tools/export.py``), checked by
round trip in ``tests/test_diffusers_format.py``. The layout (levels, res blocks per level, which levels
have attention) is read from the keys, so tiny test configs convert like SD v1.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Mapping

import torch

from ldm.modules.diffusionmodules.util import SCHEDULE_BUFFERS
from ldm.modules.diffusionmodules.util import schedule_buffers as ddpm_schedule_buffers

PathLike = str | os.PathLike

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
COMPONENTS = ("unet", "vae", "text_encoder")
_WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
_FALLBACK_NAMES = {"text_encoder": "pytorch_model"}  # transformers' .bin name


class DiffusersFormatError(ValueError):
    """A diffusers folder or file that cannot be read as an SD-v1 model (what is missing or unknown)."""


# ------------------------------------------------------------------------------------------ detection
def is_pipeline_dir(path: PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "model_index.json").is_file() or (p / "unet").is_dir())


def looks_like_diffusers_unet(keys) -> bool:
    keys = set(keys)
    return "conv_in.weight" in keys and any(k.startswith("down_blocks.") for k in keys) \
        and not any(k.startswith(UNET_PREFIX) for k in keys)


def checkpoint_exists(path: PathLike | None) -> bool:
    """A base checkpoint is there: a file, or a diffusers pipeline folder."""
    return path is not None and (Path(path).is_file() or is_pipeline_dir(path))


def pipeline_of_unet_file(path: PathLike) -> Path | None:
    """The pipeline folder a diffusers UNet file sits in (``<pipeline>/unet/<file>``), else None."""
    folder = Path(path).resolve().parent
    return folder.parent if folder.name == "unet" and is_pipeline_dir(folder.parent) else None


# ------------------------------------------------------------------------------------------ files
def component_files(pipeline: PathLike, component: str) -> list[Path]:
    """The weight files of ``component`` (``unet``, ``vae``, ``text_encoder``) in a pipeline folder: one file,
    or the shards an ``.index.json`` lists. Prefers safetensors, then full precision over an fp16 variant."""
    folder = Path(pipeline) / component
    if not folder.is_dir():
        raise DiffusersFormatError(f"diffusers pipeline {pipeline}: no {component}/ folder")
    names = [_WEIGHT_NAMES[component]] + ([_FALLBACK_NAMES[component]] if component in _FALLBACK_NAMES else [])
    for name in names:
        for variant in ("", ".fp16"):
            for ext in (".safetensors", ".bin"):
                index = folder / f"{name}{variant}{ext}.index.json"
                if index.is_file():
                    try:
                        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
                    except (ValueError, KeyError, TypeError, AttributeError) as e:
                        raise DiffusersFormatError(f"{index}: not a weight index ({e})") from None
                    files = [folder / s for s in shards]
                    missing = [f for f in files if not f.is_file()]
                    if missing:
                        raise DiffusersFormatError(f"{index} lists {missing[0].name}, which is missing")
                    return files
                single = folder / f"{name}{variant}{ext}"
                if single.is_file():
                    return [single]
    raise DiffusersFormatError(f"diffusers pipeline {pipeline}: no weights in {folder} "
                               f"(looked for {names[0]}[.fp16].safetensors / .bin, or a sharded index)")


def weight_files(path: PathLike) -> list[Path]:
    """Every file a diffusers source is read from (for identities and cache keys)."""
    p = Path(path)
    if p.is_file():
        pipe = pipeline_of_unet_file(p)
        files = [p] + ([f for c in ("vae", "text_encoder") for f in component_files(pipe, c)] if pipe else [])
    else:
        files = [f for c in COMPONENTS for f in component_files(p, c)]
        pipe = p
    sched = Path(pipe) / "scheduler" / "scheduler_config.json" if pipe else None
    return files + ([sched] if sched is not None and sched.is_file() else [])


def _read(files: list[Path], reader: Callable) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(reader(f))
    return out


# ------------------------------------------------------------------------------------------ UNet keys
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_key_map(keys, strict: bool = True) -> dict[str, str]:
    """``{diffusers key: CompVis key (without the model.diffusion_model. prefix)}`` for a UNet2DConditionModel
    of the SD-v1 family. Raises :class:`DiffusersFormatError` on a key outside that family (with
    ``strict=False`` such keys are left out of the map instead, for callers that report them all)."""
    keys = list(keys)
    n_res = _res_blocks_per_level(keys)
    up_attn = {int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    step = n_res + 1  # CompVis input/output blocks per level: the res blocks plus a down/upsampler (input) or
    # one more res block (output)
    rules: list[tuple[str, Callable[[re.Match], str]]] = [
        (r"time_embedding\.linear_([12])\.(.+)", lambda m: f"time_embed.{0 if m[1] == '1' else 2}.{m[2]}"),
        (r"conv_in\.(.+)", lambda m: f"input_blocks.0.0.{m[1]}"),
        (r"conv_norm_out\.(.+)", lambda m: f"out.0.{m[1]}"),
        (r"conv_out\.(.+)", lambda m: f"out.2.{m[1]}"),
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)",
         lambda m: f"input_blocks.{int(m[1]) * step + int(m[2]) + 1}.0.{_RESNET[m[3]]}.{m[4]}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda m: f"input_blocks.{int(m[1]) * step + int(m[2]) + 1}.1.{m[3]}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
         lambda m: f"input_blocks.{(int(m[1]) + 1) * step}.0.op.{m[2]}"),
        (r"mid_block\.resnets\.(\d+)\.(\w+)\.(.+)", lambda m: f"middle_block.{2 * int(m[1])}.{_RESNET[m[2]]}.{m[3]}"),
        (r"mid_block\.attentions\.0\.(.+)", lambda m: f"middle_block.1.{m[1]}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)",
         lambda m: f"output_blocks.{int(m[1]) * step + int(m[2])}.0.{_RESNET[m[3]]}.{m[4]}"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda m: f"output_blocks.{int(m[1]) * step + int(m[2])}.1.{m[3]}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
         lambda m: f"output_blocks.{int(m[1]) * step + n_res}.{2 if int(m[1]) in up_attn else 1}.conv.{m[2]}"),
    ]
    return _apply_rules(keys, rules, "UNet", " (an SDXL/SD2-style or otherwise unsupported UNet?)", strict)


def _res_blocks_per_level(keys: list[str]) -> int:
    """Res blocks per level of a UNet from its keys: from ``down_blocks.0.resnets.*``, or, for a part of a UNet
    without res-block keys (Concept Ablation's cross-attention delta), from its attention blocks (one per res
    block in a down level, one more in an up level). Raises :class:`DiffusersFormatError` without either."""
    def highest(pattern: str) -> int | None:
        found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
        return max(found) if found else None

    if (res := highest(r"down_blocks\.0\.resnets\.(\d+)\.")) is not None:
        return res + 1
    if (down := highest(r"down_blocks\.\d+\.attentions\.(\d+)\.")) is not None:
        return down + 1
    if (up := highest(r"up_blocks\.\d+\.attentions\.(\d+)\.")) is not None:
        return up
    if any(k.startswith("mid_block.") for k in keys):
        return 1  # the mid block's keys do not depend on it
    raise DiffusersFormatError("not a diffusers UNet: no down_blocks.*.resnets.* keys")


def convert_unet(unet: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A bare diffusers UNet state dict (tensors or meta tensors; e.g. ``torch.save(unet.state_dict())``) ->
    the same tensors under CompVis keys, ``model.diffusion_model.`` prefix included. Tensors are not copied."""
    return {UNET_PREFIX + ours: unet[k] for k, ours in unet_key_map(unet).items()}


def _apply_rules(keys, rules, what: str, hint: str = "", strict: bool = True) -> dict[str, str]:
    """``{key: CompVis key}`` by the first rule whose pattern matches the whole key; a key that no rule maps
    (or whose rule has no entry for it) raises :class:`DiffusersFormatError` (``strict=False``: is skipped)."""
    out = {}
    for k in keys:
        for pattern, fn in rules:
            m = re.fullmatch(pattern, k)
            if m:
                try:
                    out[k] = fn(m)
                except KeyError:
                    pass
                break
        if k not in out and strict:
            raise DiffusersFormatError(f"{what} key {k!r} has no CompVis SD-v1 counterpart{hint}")
    return out


# ------------------------------------------------------------------------------------------ VAE keys
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "query": "q", "to_k": "k", "key": "k", "to_v": "v", "value": "v",
             "to_out.0": "proj_out", "proj_attn": "proj_out"}


def vae_key_map(keys) -> dict[str, str]:
    """``{diffusers key: CompVis key (without first_stage_model.)}`` for an AutoencoderKL of the SD-v1 family."""
    keys = list(keys)
    ups = {int(m.group(1)) for k in keys if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
    n_up = max(ups) + 1 if ups else 0
    res = lambda name: "nin_shortcut" if name == "conv_shortcut" else name  # noqa: E731
    rules: list[tuple[str, Callable[[re.Match], str]]] = [
        (r"(quant_conv|post_quant_conv)\.(.+)", lambda m: f"{m[1]}.{m[2]}"),
        (r"(encoder|decoder)\.(conv_in|conv_out)\.(.+)", lambda m: f"{m[1]}.{m[2]}.{m[3]}"),
        (r"(encoder|decoder)\.conv_norm_out\.(.+)", lambda m: f"{m[1]}.norm_out.{m[2]}"),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)",
         lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{res(m[3])}.{m[4]}"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
         lambda m: f"encoder.down.{m[1]}.downsample.conv.{m[2]}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)",
         lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{res(m[3])}.{m[4]}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
         lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)\.(.+)",
         lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{res(m[3])}.{m[4]}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0|query|key|value|proj_attn)"
         r"\.(weight|bias)", lambda m: f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"),
    ]
    return _apply_rules(keys, rules, "VAE")


def _vae_tensor(compvis_key: str, v: torch.Tensor) -> torch.Tensor:
    # diffusers' VAE attention projections are Linear [C, C]; CompVis' are 1x1 Conv2d [C, C, 1, 1]
    if ".mid.attn_1." in compvis_key and compvis_key.endswith("weight") and v.ndim == 2:
        return v.reshape(*v.shape, 1, 1)
    return v


# ------------------------------------------------------------------------------------------ text, schedule
def text_key(key: str) -> str | None:
    """CompVis key of a transformers CLIPTextModel key (transformers 5 drops the ``text_model.`` level);
    None for keys SD v1 has no place for (a projection head)."""
    if key.startswith("text_projection."):
        return None
    return TEXT_PREFIX + (key if key.startswith("text_model.") else "text_model." + key)


def scheduler_config(pipeline: PathLike) -> dict:
    path = Path(pipeline) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise DiffusersFormatError(f"diffusers pipeline {pipeline}: {path} not found (the noise schedule)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DiffusersFormatError(f"{path}: not valid JSON ({e})") from None


def compvis_schedule(sched: Mapping) -> dict:
    """The CompVis schedule parameters (``timesteps``, ``linear_start``, ``linear_end``) of a diffusers
    scheduler config; only the SD-v1 ``scaled_linear`` schedule (CompVis ``linear``) has a counterpart."""
    kind = sched.get("beta_schedule", "linear")
    if kind != "scaled_linear" or sched.get("trained_betas") is not None:
        raise DiffusersFormatError(f"scheduler beta_schedule {kind!r}: only SD v1's 'scaled_linear' (CompVis "
                                   f"'linear') converts")
    if sched.get("prediction_type", "epsilon") != "epsilon":
        raise DiffusersFormatError(f"scheduler prediction_type {sched.get('prediction_type')!r}: SD v1 predicts "
                                   f"'epsilon'")
    return {"timesteps": int(sched.get("num_train_timesteps", 1000)),
            "linear_start": float(sched.get("beta_start", 0.0001)), "linear_end": float(sched.get("beta_end", 0.02))}


def schedule_buffers(sched: Mapping) -> dict[str, torch.Tensor]:
    """The 12 CompVis schedule buffers for a diffusers scheduler config: the model's own
    :func:`~ldm.modules.diffusionmodules.util.schedule_buffers` (v_posterior 0, as SD v1), so they equal
    the ones our model computes from its config. Raises :class:`DiffusersFormatError` as :func:`compvis_schedule`."""
    buffers = ddpm_schedule_buffers(beta_schedule="linear", **compvis_schedule(sched))
    return {name: buffers[name] for name in SCHEDULE_BUFFERS}


def check_schedule(model_config: Mapping, pipeline: PathLike) -> None:
    """Raise unless the pipeline's noise schedule is the one ``model_config`` trains and samples with."""
    have = compvis_schedule(scheduler_config(pipeline))
    params = model_config.get("params", {})
    want = {"timesteps": int(params.get("timesteps", 1000)), "linear_start": float(params.get("linear_start", 1e-4)),
            "linear_end": float(params.get("linear_end", 2e-2))}
    if params.get("beta_schedule", "linear") != "linear" or any(
            abs(have[k] - want[k]) > 1e-12 * max(1.0, abs(want[k])) for k in want):
        raise DiffusersFormatError(f"diffusers pipeline {pipeline}: its scheduler ({have}) is not the model "
                                   f"config's schedule ({want}, {params.get('beta_schedule', 'linear')!r})")


# ------------------------------------------------------------------------------------------ conversion
def convert(unet: Mapping[str, torch.Tensor], vae: Mapping[str, torch.Tensor], text: Mapping[str, torch.Tensor],
            sched: Mapping | None = None) -> dict[str, torch.Tensor]:
    """diffusers component state dicts (tensors or meta tensors) -> one CompVis-keyed state dict."""
    out = convert_unet(unet)
    for k, ours in vae_key_map(vae).items():
        out[VAE_PREFIX + ours] = _vae_tensor(ours, vae[k])
    for k, v in text.items():
        ours = text_key(k)
        if ours is not None:
            out[ours] = v
    pos = TEXT_PREFIX + "text_model.embeddings.position_ids"
    emb = out.get(TEXT_PREFIX + "text_model.embeddings.position_embedding.weight")
    if pos not in out and emb is not None:  # a non-persistent buffer in transformers: rebuilt as CompVis stores it
        out[pos] = torch.arange(emb.shape[0], device=emb.device).unsqueeze(0)
    if sched is not None:
        buffers = schedule_buffers(sched)
        meta = next(iter(unet.values())).device.type == "meta"
        out.update({k: torch.empty_like(v, device="meta") if meta else v for k, v in buffers.items()})
    return out


# ------------------------------------------------------------------------------------------ Concept Ablation
CA_DELTA_KEYS = ("unet", "text_encoder")


def is_concept_ablation_delta(obj) -> bool:
    """``obj`` (a checkpoint's top-level object) has the shape of Concept Ablation's diffusers ``delta.bin``
    (``CustomDiffusionPipeline.save_pretrained``): ``{'unet': {diffusers UNet parameter name: tensor}}``, optionally
    with ``'text_encoder'`` (a transformers CLIPTextModel state dict), and nothing else."""
    return (isinstance(obj, Mapping) and "unet" in obj and set(obj) <= set(CA_DELTA_KEYS)
            and all(isinstance(obj[k], Mapping) for k in obj))


def convert_concept_ablation_delta(obj: Mapping) -> dict[str, torch.Tensor]:
    """Concept Ablation's ``delta.bin`` content -> its tensors under CompVis keys: the UNet's (any subset of a
    UNet2DConditionModel's parameters: the cross-attention ``attn2.to_k``/``to_v`` of "cross-attn", all of them
    of "full-weight") through :func:`unet_key_map`, the text encoder's through :func:`text_key`. Tensors are not
    copied. Raises :class:`DiffusersFormatError` (one line) on a non-tensor entry or a key with no CompVis
    counterpart."""
    for part in obj:
        bad = [k for k, v in obj[part].items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise DiffusersFormatError(f"Concept Ablation delta: '{part}' entry {bad[0]!r} is not a named tensor")
    if not obj["unet"] and not obj.get("text_encoder"):
        raise DiffusersFormatError("Concept Ablation delta: holds no tensors ('unet' is empty, no 'text_encoder')")
    try:
        out = convert_unet(obj["unet"]) if obj["unet"] else {}
    except DiffusersFormatError as e:
        raise DiffusersFormatError(f"Concept Ablation delta 'unet': {e}") from None
    for k, v in obj.get("text_encoder", {}).items():
        ours = text_key(k)
        if ours is not None:
            out[ours] = v
    return out


def read(path: PathLike, reader: Callable[[Path], Mapping[str, torch.Tensor]],
         unet: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """CompVis-keyed tensors of a pipeline folder, or of a diffusers UNet file (``unet``: its tensors, already
    read) with the rest of its pipeline folder. ``reader`` reads one file's raw tensors (real or meta)."""
    p = Path(path)
    if unet is not None:
        pipe = pipeline_of_unet_file(p)
        if pipe is None:
            raise DiffusersFormatError(
                f"{p} holds a UNet with diffusers keys but no VAE or text encoder: pass the diffusers pipeline "
                f"folder, or put the file in one as <pipeline>/unet/{p.name}")
    else:
        pipe = p
        unet = _read(component_files(pipe, "unet"), reader)
    vae = _read(component_files(pipe, "vae"), reader)
    text = _read(component_files(pipe, "text_encoder"), reader)
    return convert(unet, vae, text, scheduler_config(pipe))


def source_identity(path: PathLike) -> dict:
    """Path, size and mtime of a checkpoint file, or of every file a pipeline folder is read from (caches
    keyed on the base model see a changed component)."""
    p = Path(path).resolve()
    if p.is_file():
        st = p.stat()
        return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    files = [f.resolve() for f in weight_files(p)]
    return {"path": str(p), "files": [{"name": str(f.relative_to(p)), "size": f.stat().st_size,
                                       "mtime_ns": f.stat().st_mtime_ns} for f in files]}
