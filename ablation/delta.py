"""Delta checkpoints: only the trained tensors, with CompVis key names.

Format (``.ckpt`` or ``.safetensors``): ``{'state_dict': {key: tensor}}`` where keys are full
``LatentDiffusion`` names (``model.diffusion_model....attn2.to_k.weight``). Embedding deltas add
``embed`` (rows [K, D]) and ``embed_ids`` (their token ids [K]); a reference delta with ``embed``
but no ids is written into the *last* K rows, as the reference did.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from ldm.checkpoint import (CheckpointError, load_into, load_model_from_config, load_state_dict, save_state_dict,
                            state_dict_shapes)

TOKEN_EMBEDDING = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"


def delta_state_dict(trainable: Mapping[str, torch.Tensor], embedding_ids: torch.Tensor | None = None) -> dict:
    """What a delta file stores for these trained parameters (CPU copies)."""
    sd = {}
    for name, p in trainable.items():
        if name == TOKEN_EMBEDDING:
            ids = embedding_ids.detach().cpu().long()
            sd["embed_ids"] = ids
            sd["embed"] = p.detach()[ids.to(p.device)].float().cpu().clone()
        else:
            sd[name] = p.detach().cpu().clone()
    return sd


def save_delta(path: str | Path, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None):
    """Atomic write of a delta (``.ckpt`` -> ``{'state_dict': sd}``, or ``.safetensors``)."""
    save_state_dict(state_dict, path, metadata=metadata)


def _misfits(own: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> list[str]:
    """Why ``delta`` cannot be written into a model with state dict ``own`` (empty if it fits)."""
    problems = [f"{k}: not in the model" for k in delta if k not in own and k not in ("embed", "embed_ids")]
    problems += [f"{k}: delta {list(v.shape)} vs model {list(own[k].shape)}"
                 for k, v in delta.items() if k in own and v.shape != own[k].shape]
    embed, embed_ids, weight = delta.get("embed"), delta.get("embed_ids"), own.get(TOKEN_EMBEDDING)
    if embed is not None:
        if weight is None or embed.numel() % weight.shape[1] or embed.numel() // weight.shape[1] > weight.shape[0]:
            problems.append(f"embed: {list(embed.shape)} does not fit the token embedding "
                            f"{list(weight.shape) if weight is not None else '(absent)'}")
        elif embed_ids is not None and (embed_ids.numel() != embed.numel() // weight.shape[1]
                                        or int(embed_ids.max()) >= weight.shape[0]):
            problems.append("embed_ids do not match the embed rows or exceed the vocabulary")
    return problems


def _raise_misfits(path, problems: list[str]):
    if problems:
        raise CheckpointError(f"delta {path} does not fit the base model:\n  " + "\n  ".join(problems[:10]))


def _meta_model(model_config: Mapping) -> nn.Module:
    from ldm.util import instantiate_from_config

    with torch.device("meta"):
        return instantiate_from_config(model_config)


def check_delta(model_config: Mapping, path: str | Path, model: nn.Module | None = None) -> None:
    """Raise :class:`CheckpointError` if the delta at ``path`` cannot apply to ``model_config``'s model,
    or holds a NaN/inf (it would give black images).

    Cheap: the model is built on the meta device (no weights), so scripts call this before any work.
    """
    delta = load_state_dict(path)
    model = _meta_model(model_config) if model is None else model
    _raise_misfits(path, _misfits(model.state_dict(), delta))
    bad = [k for k, v in delta.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"delta {path} holds NaN or inf values in {len(bad)} tensor(s), e.g. {bad[0]}; "
                              f"it is broken (diverged training?) and would give black images")


def check_base(model_config: Mapping, path: str | Path, model: nn.Module | None = None) -> None:
    """Raise :class:`CheckpointError` unless the base checkpoint at ``path`` is safe to open and holds every
    weight of ``model_config``'s model with the right shape. Reads the header / pickle only, no weights."""
    from ldm.diffusers_format import DiffusersFormatError, check_schedule, is_pipeline_dir, pipeline_of_unet_file

    shapes = state_dict_shapes(path)
    pipeline = path if is_pipeline_dir(path) else pipeline_of_unet_file(path)
    if pipeline is not None:  # a diffusers source: its scheduler must be the config's schedule
        try:
            check_schedule(model_config, pipeline)
        except DiffusersFormatError as e:
            raise CheckpointError(str(e)) from None
    model = _meta_model(model_config) if model is None else model
    with warnings.catch_warnings():  # pre-hooks may fill buffers with real tensors: a no-op on meta
        warnings.simplefilter("ignore", UserWarning)
        report = load_into(model, shapes)  # meta into meta: key names and shapes only
    if report.missing or report.mismatched:
        raise CheckpointError(f"base checkpoint {path} does not fit the model config:\n{report}")


def check_checkpoints(model_config: Mapping, base: str | Path | None, delta: str | Path | None = None) -> None:
    """:func:`check_base` and :func:`check_delta` for the files a command loads (None: not given), with
    one meta model between them. FileNotFoundError names a missing file."""
    from ldm.diffusers_format import checkpoint_exists

    for what, path in (("base checkpoint", base), ("delta checkpoint", delta)):
        exists = checkpoint_exists(path) if what == "base checkpoint" else Path(path or "").is_file()
        if path is not None and not exists:
            raise FileNotFoundError(f"{what} not found: {path} (a checkpoint file or a diffusers pipeline folder)"
                                    if what == "base checkpoint" else f"{what} not found: {path}")
    if base is None and delta is None:
        return
    model = _meta_model(model_config)
    if base is not None:
        check_base(model_config, base, model)
    if delta is not None:
        check_delta(model_config, delta, model)


def apply_delta(model: nn.Module, path: str | Path) -> list[str]:
    """Overwrite ``model``'s tensors with those of a delta; every key must exist with the same shape.

    Returns the keys written. Raises :class:`CheckpointError` (before changing anything) if the
    delta does not fit the model.
    """
    delta = dict(load_state_dict(path))
    own = model.state_dict()
    _raise_misfits(path, _misfits(own, delta))
    embed, embed_ids = delta.pop("embed", None), delta.pop("embed_ids", None)
    with torch.no_grad():
        for k, v in delta.items():
            own[k].copy_(v)
        if embed is not None:
            weight = own[TOKEN_EMBEDDING]
            embed = embed.reshape(-1, weight.shape[1])
            ids = embed_ids.long() if embed_ids is not None else torch.arange(weight.shape[0] - embed.shape[0], weight.shape[0])
            weight[ids.to(weight.device)] = embed.to(weight)
    return list(delta) + (["embed"] if embed is not None else [])


def load_model(model_config: Mapping, ckpt: str | Path, delta: str | Path | None = None,
               device: str | torch.device = "cpu") -> nn.Module:
    """A full checkpoint, or base + delta, on ``device`` in eval mode (module-level: picklable for workers)."""
    model = load_model_from_config(model_config, ckpt, device="cpu", verbose=False)
    if delta:
        apply_delta(model, delta)
    return model.to(device)


def run_base_ckpt(path: str | Path | None) -> str | None:
    """The base checkpoint recorded in the config of the training run ``path`` (a delta) lives in, else None."""
    config = find_run_config(path)
    if config is None:
        return None
    from omegaconf import OmegaConf

    return OmegaConf.select(OmegaConf.load(config), "run.base_ckpt", default=None)


def find_run_config(path: str | Path | None) -> Path | None:
    """The saved config of the training run a checkpoint lives in (``{run}/checkpoints/x`` ->
    the last ``{run}/configs/*.yaml``), else None."""
    if path is None:
        return None
    p = Path(path).resolve()
    if p.parent.name != "checkpoints":
        return None
    configs = sorted((p.parent.parent / "configs").glob("*.yaml"))
    return configs[-1] if configs else None
