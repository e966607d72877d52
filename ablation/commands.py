"""Console entry points (``ablate-train``, ``ablate-sample``, ``ablate-evaluate``, ``ablate-export``,
``conceptprune``, ``toyworld-mission``) and :func:`script`, which imports a top-level script of the
repository (``train.py``, ...) as a module from any working directory.

The scripts stay files in the repository root, so the paper's commands (``python train.py ...``) are
unchanged; they are not installed as top-level modules, since names like ``evaluate`` or ``sample``
would clash with other packages (Hugging Face's ``evaluate``). They read ``configs/`` and ``assets/``
of the clone, hence an editable install (``pip install -e .``).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"train": "train.py", "sample": "sample.py", "evaluate": "evaluate.py",
           "conceptprune": "conceptprune.py", "export": "tools/export.py", "benchmark": "benchmark.py"}


def script(name: str):
    """The repository script ``name`` as a module; the same object ``import name`` gives with the
    repository root on ``sys.path``, so both ways of importing share one module."""
    path = REPO / SCRIPTS[name]
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: the commands run the repository's scripts; "
                         "install from a clone with `pip install -e .`")
    have = sys.modules.get(name)
    if have is not None and Path(getattr(have, "__file__", "") or "").resolve() == path:
        return have
    # Another module already holds the plain name (e.g. Hugging Face `evaluate`): use a private one.
    mod_name = name if have is None else f"_ablation_script_{name}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(mod_name, None)
        raise
    return module


def _run(name: str) -> int:
    """Run the script as ``python <script> ...`` does (its ``__main__`` block: one-line usage errors, exit 2)."""
    import runpy

    path = REPO / SCRIPTS[name]
    if not path.is_file():
        script(name)  # the clear error
    sys.argv[0] = str(path)
    runpy.run_path(str(path), run_name="__main__")
    return 0


def train() -> int:
    return _run("train")


def sample() -> int:
    return _run("sample")


def evaluate() -> int:
    return _run("evaluate")


def export() -> int:
    return _run("export")


def conceptprune() -> int:
    return _run("conceptprune")


def benchmark() -> int:
    return _run("benchmark")
