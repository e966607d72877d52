"""Packaging: pyproject.toml's dependency files and entry points, the scripts as importable modules, and the
installed package from outside the repository (skipped where the package is not installed, e.g. a venv made
before pyproject.toml; tools/setup.sh and CI install it)."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DIST = PYPROJECT["project"]["name"]


def _installed() -> bool:
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        return False
    return dist is not None


def test_requirement_files_parse_as_plain_requirements():
    """setuptools reads these files line by line: no -r includes, options or inline comments."""
    from packaging.requirements import Requirement

    dyn = PYPROJECT["tool"]["setuptools"]["dynamic"]
    files = set(dyn["dependencies"]["file"])
    for extra in dyn["optional-dependencies"].values():
        files |= set(extra["file"])
    assert {"requirements.txt", "requirements-eval.txt", "requirements-dev.txt", "requirements-bench.txt"} <= files
    for name in files:
        for line in (ROOT / name).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                req = Requirement(line)  # raises on anything that is not one requirement
                assert str(req.specifier).startswith("=="), f"{name}: {line} is not pinned"
    card = {Requirement(line).name for n in files for line in (ROOT / n).read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    assert {"torch", "torchvision", "open_clip_torch", "clean-fid"} <= card


def test_entry_points_resolve():
    from ablation import commands

    scripts = PYPROJECT["project"]["scripts"]
    assert {"ablate-train", "ablate-sample", "ablate-evaluate", "ablate-export", "conceptprune",
            "toyworld-mission"} <= set(scripts)
    for target in scripts.values():
        module, func = target.split(":")
        if module == "toyworld.mission":  # the toy world's own command, not a script
            from toyworld import mission

            assert callable(getattr(mission, func))
            continue
        assert module == "ablation.commands" and callable(getattr(commands, func))


@pytest.mark.parametrize("name", ["train", "sample", "evaluate", "conceptprune", "export"])
def test_script_modules_are_shared(name):
    """script(name) is one module however it is reached (the entry points, toyworld, `import train`)."""
    from ablation.commands import SCRIPTS, script

    mod = script(name)
    assert Path(mod.__file__).resolve() == ROOT / SCRIPTS[name]
    assert script(name) is mod and callable(mod.main)


def test_script_does_not_take_over_a_foreign_module(monkeypatch):
    import types

    from ablation.commands import script

    foreign = types.ModuleType("evaluate")  # e.g. Hugging Face's `evaluate` already imported
    foreign.__file__ = "/elsewhere/evaluate/__init__.py"
    monkeypatch.setitem(sys.modules, "evaluate", foreign)
    monkeypatch.delitem(sys.modules, "_ablation_script_evaluate", raising=False)
    mod = script("evaluate")
    assert mod is not foreign and sys.modules["evaluate"] is foreign and callable(mod.get_parser)


def test_entry_point_help_exits_zero(monkeypatch, capsys):
    from ablation import commands

    monkeypatch.setattr(sys, "argv", ["ablate-evaluate", "--help"])
    with pytest.raises(SystemExit) as e:
        commands.evaluate()
    assert e.value.code == 0 and "--clip_model" in capsys.readouterr().out


@pytest.mark.skipif(not _installed(), reason=f"{DIST} is not installed in this environment (pip install -e .)")
def test_installed_package_works_outside_the_repo(tmp_path):
    code = ("import ldm, ablation, prune, toyworld; from ablation.commands import script; "
            "print(script('train').__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == ROOT / "train.py"
    bindir = Path(sys.executable).parent
    for cmd in (["ablate-train", "--help"], ["conceptprune", "--help"], [sys.executable, "-m", "toyworld.mission", "--help"]):
        exe = cmd if cmd[0] == sys.executable else [str(bindir / cmd[0]), *cmd[1:]]
        out = subprocess.run(exe, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and "usage:" in out.stdout, (cmd, out.stderr[-2000:])


def test_help_shows_defaults_and_no_outside_documents():
    from ablation.commands import script

    text = script("sample").get_parser().format_help()
    assert "(default: 100)" in text and "(default: 1.0)" in text  # --ddim_steps, --ddim_eta
    for name in ("train", "sample", "evaluate", "conceptprune", "export"):
        assert "\u00a7" not in script(name).get_parser().format_help()
    tracked = subprocess.run(["git", "-C", str(ROOT), "grep", "-l", "-I", "\u00a7", "--", "*.py", "*.md", "*.yaml"],
                             capture_output=True, text=True).stdout.split()
    assert not tracked, f"references to documents outside the repository in {tracked}"
