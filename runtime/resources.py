"""Where the shipped data lives: ``configs/`` and ``assets/`` of the clone, or their installed copies.

The clone keeps ``configs/`` and ``assets/`` at its root, and the paper's commands name files there relative to it
(``--prompts assets/finetune_prompts/painting.txt``), so the folders stay where they are. A wheel
(``pip install .``) carries the same files as package data under the name ``concept_ablation_data``:
pyproject.toml maps ``concept_ablation_data.configs`` onto ``configs/`` and ``concept_ablation_data.assets`` onto
``assets/`` (``[tool.setuptools.package-dir]``), so the installed tree holds ``concept_ablation_data/configs/...``
and ``concept_ablation_data/assets/...`` beside ``runtime/``. Code that runs from a clone (a checkout, or
``pip install -e .``) reads the clone's files; code that runs from an installed wheel reads the installed copies.
One rule for both, so a path shown in ``--help`` is the file that a command reads.

``assets/pretrained_models/`` is the user's weights folder, not package data: in a clone the clone's folder,
installed the relative path ``assets/pretrained_models/`` (resolved against the working directory, the folder a
user runs commands from). The CLIP BPE vocabulary is third-party data fetched at set-up;
``ldm.modules.encoders.clip_tokenizer.find_bpe_file`` looks it up (``ldm`` sits below this module).
"""
from __future__ import annotations

from pathlib import Path

DATA_PACKAGE = "concept_ablation_data"

_PACKAGES = Path(__file__).resolve().parents[1]  # the clone's root, or the site-packages folder of an install


def _is_clone(root: Path) -> bool:
    return (root / "pyproject.toml").is_file() and (root / "configs").is_dir() and (root / "assets").is_dir()


IN_CLONE = _is_clone(_PACKAGES)
# The folder that holds configs/ and assets/: the clone's root, or the installed data package.
DATA_ROOT = _PACKAGES if IN_CLONE else _PACKAGES / DATA_PACKAGE
# The user's weights folder (see the module docstring).
WEIGHTS_DIR = DATA_ROOT / "assets" / "pretrained_models" if IN_CLONE else Path("assets") / "pretrained_models"


def config_path(name: str) -> Path:
    """The shipped config ``configs/{name}`` (e.g. ``"stable-diffusion/v1-inference.yaml"``): the clone's file,
    else the installed copy. The path is returned whether or not the file exists (a caller's error names it)."""
    return DATA_ROOT / "configs" / name


def asset_path(name: str) -> Path:
    """The shipped asset ``assets/{name}`` (e.g. ``"eval.json"``, ``"toyworld"``): the clone's file or folder,
    else the installed copy. The path is returned whether or not it exists."""
    return DATA_ROOT / "assets" / name


def weights_path(name: str) -> Path:
    """Default location of the user's weights file ``name`` (e.g. ``"sd-v1-4.ckpt"``): the clone's
    ``assets/pretrained_models/{name}``; installed, ``assets/pretrained_models/{name}`` relative to the working
    directory. Weights are never package data (they are the user's downloads)."""
    return WEIGHTS_DIR / name


# The defaults every command shows: SD v1's model config and base weights.
DEFAULT_CONFIG = config_path("stable-diffusion/v1-inference.yaml")
DEFAULT_BASE_CKPT = weights_path("sd-v1-4.ckpt")
