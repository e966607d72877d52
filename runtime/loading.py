"""Base (+ delta) model loading, and the cheap checks every command runs on its checkpoints first.

The checks build the model on the meta device and read file headers only, so a wrong file fails in
seconds with a message naming it, before any weights are read or any work starts.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from ldm.checkpoint import (
    CheckpointError,
    load_into,
    load_model_from_config,
    load_state_dict,
    require_checkpoint,
    state_dict_shapes,
)
from runtime.delta import apply_delta, delta_misfits, raise_delta_misfits
from runtime.resources import DEFAULT_BASE_CKPT, DEFAULT_CONFIG


def meta_model(model_config: Mapping) -> nn.Module:
    """``model_config``'s model built on the meta device: names and shapes, no memory, no weights."""
    from ldm.util import instantiate_from_config

    with torch.device("meta"):
        return instantiate_from_config(model_config)


def check_delta(model_config: Mapping, path: str | Path, model: nn.Module | None = None) -> None:
    """Raise :class:`CheckpointError` if the delta at ``path`` cannot apply to ``model_config``'s model,
    or holds a NaN/inf (it would give black images; read whole: a delta is small).

    Cheap: the model is built on the meta device (no weights), so scripts call this before any work.
    """
    delta = load_state_dict(path)  # NaN/inf: refused here, naming the tensor (ldm.checkpoint.check_finite)
    model = meta_model(model_config) if model is None else model
    raise_delta_misfits(path, delta_misfits(model.state_dict(), delta))


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
    model = meta_model(model_config) if model is None else model
    with warnings.catch_warnings():  # pre-hooks may fill buffers with real tensors: a no-op on meta
        warnings.simplefilter("ignore", UserWarning)
        report = load_into(model, shapes)  # meta into meta: key names and shapes only
    if report.missing or report.mismatched:
        raise CheckpointError(f"base checkpoint {path} does not fit the model config:\n{report}")


def check_checkpoints(model_config: Mapping, base: str | Path | None, delta: str | Path | None = None) -> None:
    """:func:`check_base` and :func:`check_delta` for the files a command loads (None: not given), with
    one meta model between them. FileNotFoundError names a missing file (or says what else the path is: a
    folder, a device)."""
    if base is not None:
        require_checkpoint(base, "base checkpoint", pipelines=True)
    if delta is not None:
        require_checkpoint(delta, "delta checkpoint")
    if base is None and delta is None:
        return
    model = meta_model(model_config)
    if base is not None:
        check_base(model_config, base, model)
    if delta is not None:
        check_delta(model_config, delta, model)


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


@dataclass(frozen=True)
class ModelSource:
    """Where a command's model comes from (see :func:`resolve_model`); paths only, nothing loaded."""

    ckpt: str  # the base (or full) checkpoint
    config: Path  # the model config file
    run_config: Path | None  # the saved config of the training run the delta (else the base) lives in


def resolve_model(config: str | Path | None, delta: str | Path | None = None,
                  ckpt: str | Path | None = None) -> ModelSource:
    """The files a command loads its model from, following the training run a delta lives in.

    * ``ckpt``: as given, else the base recorded in the delta's run config (``run.base_ckpt``), else
      :data:`DEFAULT_BASE_CKPT`;
    * the run config: the one of the run ``delta`` lives in (``{run}/checkpoints/x``), else the one of the
      run ``ckpt`` (as given) lives in, else None;
    * ``config``: as given, else the run config, else :data:`DEFAULT_CONFIG`.

    Cheap: reads at most the run config; whether the files exist is left to the caller (see
    :func:`ldm.util.load_model_config`, :func:`check_checkpoints`).
    """
    base = str(ckpt) if ckpt is not None else (run_base_ckpt(delta) or str(DEFAULT_BASE_CKPT))
    run_config = find_run_config(delta) or find_run_config(ckpt)
    config_path = Path(config) if config else (run_config or DEFAULT_CONFIG)
    return ModelSource(base, config_path, run_config)
