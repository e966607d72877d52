"""Config helpers shared by every entry point (CompVis names kept for yaml compatibility)."""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Mapping

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Resolve a dotted path such as ``ldm.models.autoencoder.AutoencoderKL``."""
    module, cls = string.rsplit(".", 1)
    mod = importlib.import_module(module)
    if reload:
        mod = importlib.reload(mod)
    try:
        return getattr(mod, cls)
    except AttributeError as e:
        raise ImportError(f"module {module!r} has no attribute {cls!r} (config target {string!r})") from e


def instantiate_from_config(config: Mapping) -> Any:
    """Build ``config['target'](**config.get('params', {}))``.

    The CompVis sentinels ``__is_first_stage__`` / ``__is_unconditional__`` return ``None``;
    callers that support them check for the sentinel themselves.
    """
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError("expected key 'target' to instantiate, "
                       f"got {dict(config) if hasattr(config, 'keys') else config!r}")
    params = config.get("params", None) or {}
    return get_obj_from_str(config["target"])(**params)


def default(val, d):
    """``val`` unless it is None; ``d`` may be a zero-argument callable."""
    if val is not None:
        return val
    return d() if callable(d) else d


class ModelConfigError(ValueError):
    """A model config file that cannot be used: missing, not YAML text, or without a ``model:`` mapping.
    The message is one line that names the file and what is wrong."""


def load_model_config(path: str | os.PathLike) -> dict:
    """The ``model:`` section of a CompVis model yaml (``configs/stable-diffusion/v1-inference.yaml``) as a
    plain dict, interpolations resolved (also those that point outside ``model:``).

    The one loader for model configs, so that every entry point reads the same file the same way and
    reports a bad one in the same words.

    Args:
        path: the yaml file.
    Returns:
        ``{"target": ..., "params": {...}}``, ready for :func:`instantiate_from_config`.
    Raises:
        ModelConfigError: the file is missing or unreadable, is not UTF-8 YAML, has no ``model:`` mapping,
            or an interpolation in it does not resolve.
    """
    path = Path(path)
    if not path.exists():
        raise ModelConfigError(f"model config {path}: no such file")
    if not path.is_file():
        raise ModelConfigError(f"model config {path}: not a file")
    try:
        config = OmegaConf.load(path)
    except UnicodeDecodeError:
        raise ModelConfigError(f"model config {path}: not a text file (UTF-8 YAML expected)") from None
    except yaml.YAMLError as e:
        raise ModelConfigError(f"model config {path}: not valid YAML ({_yaml_problem(e)})") from None
    except OSError as e:
        raise ModelConfigError(f"model config {path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(config, DictConfig):
        raise ModelConfigError(f"model config {path}: the top level is a list, not a mapping with a 'model:' "
                               f"section")
    if "model" not in config:
        raise ModelConfigError(f"model config {path}: no 'model:' section")
    try:
        model = config.model  # an interpolation itself (model: ${base}) resolves here
        if not OmegaConf.is_dict(model):
            what = ("empty" if model is None else "a list" if OmegaConf.is_list(model)
                    else f"{type(model).__name__} {model!r:.40}")
            raise ModelConfigError(f"model config {path}: 'model:' is {what}, not a mapping")
        return OmegaConf.to_container(model, resolve=True)
    except OmegaConfBaseException as e:  # an interpolation that does not resolve
        raise ModelConfigError(f"model config {path}: {_first_line(e)}") from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    """``problem at line L, column C`` of a PyYAML error (its str spans several lines)."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if problem is None:
        return _first_line(e)
    return problem + (f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "")


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
