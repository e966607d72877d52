"""Config helpers shared by every entry point (CompVis names kept for yaml compatibility)."""
from __future__ import annotations

import importlib
from typing import Any, Mapping


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
        raise KeyError(f"expected key 'target' to instantiate, got {dict(config) if hasattr(config, 'keys') else config!r}")
    params = config.get("params", None) or {}
    return get_obj_from_str(config["target"])(**params)


def default(val, d):
    """``val`` unless it is None; ``d`` may be a zero-argument callable."""
    if val is not None:
        return val
    return d() if callable(d) else d
