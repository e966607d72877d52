"""Packaging: pyproject.toml's dependency files and entry points, the root scripts as shells over the jobs, and the
installed package from outside the repository (skipped where the package is not installed, e.g. a venv made
before pyproject.toml; tools/setup.sh and CI install it)."""
from __future__ import annotations

import ast
import importlib
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


# console command -> (root script, the job module both call)
JOBS = {"ablate-train": ("train.py", "ablation.train"), "ablate-sample": ("sample.py", "runtime.sample"),
        "ablate-evaluate": ("evaluate.py", "evaluation.protocol"), "ablate-export": ("tools/export.py", "runtime.export"),
        "conceptprune": ("conceptprune.py", "prune.jobs"), "ablate-benchmark": ("benchmark.py", "evaluation.benchmark")}


def test_entry_points_resolve():
    scripts = PYPROJECT["project"]["scripts"]
    assert set(JOBS) | {"toyworld-mission"} == set(scripts)
    for command, target in scripts.items():
        module, func = target.split(":")
        assert func == "main" and callable(getattr(importlib.import_module(module), func))
        if command in JOBS:
            assert module == JOBS[command][1]


@pytest.mark.parametrize("command", sorted(JOBS))
def test_root_scripts_are_shells_over_the_job(command):
    """A root script imports exactly its job's main and nothing else: the paper's command and the console
    command run the same function, and nothing can import a script for its internals."""
    script, module = JOBS[command]
    tree = ast.parse((ROOT / script).read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    jobs = [n for n in imports if isinstance(n, ast.ImportFrom) and n.module == module]
    assert len(jobs) == 1 and [a.name for a in jobs[0].names] == ["main"]
    others = {(getattr(n, "module", None), a.name) for n in imports if n not in jobs for a in n.names}
    assert others <= {(None, "sys"), ("pathlib", "Path")}  # tools/export.py puts the clone on sys.path
    assert len((ROOT / script).read_text().splitlines()) < 40


def test_a_foreign_evaluate_module_does_not_matter(monkeypatch, capsys):
    """Hugging Face's ``evaluate`` may hold the plain name; the job lives in evaluation.protocol."""
    import types

    foreign = types.ModuleType("evaluate")
    foreign.__file__ = "/elsewhere/evaluate/__init__.py"
    monkeypatch.setitem(sys.modules, "evaluate", foreign)
    from evaluation import protocol

    with pytest.raises(SystemExit) as e:
        protocol.main(["--help"])
    assert e.value.code == 0 and "--clip_model" in capsys.readouterr().out and sys.modules["evaluate"] is foreign


def test_entry_point_help_exits_zero(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["ablate-evaluate", "--help"])
    from evaluation.protocol import main

    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 0 and "--clip_model" in capsys.readouterr().out


@pytest.mark.skipif(not _installed(), reason=f"{DIST} is not installed in this environment (pip install -e .)")
def test_installed_package_works_outside_the_repo(tmp_path):
    code = "import ldm, runtime, scoring, ablation, prune, evaluation, toyworld, ablation.train; print(ablation.train.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == ROOT / "ablation" / "train.py"
    bindir = Path(sys.executable).parent
    for cmd in (["ablate-train", "--help"], ["conceptprune", "--help"], [sys.executable, "-m", "toyworld.mission", "--help"]):
        exe = cmd if cmd[0] == sys.executable else [str(bindir / cmd[0]), *cmd[1:]]
        out = subprocess.run(exe, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and "usage:" in out.stdout, (cmd, out.stderr[-2000:])


def test_help_shows_defaults_and_no_outside_documents():
    from runtime.sample import build_parser

    text = build_parser().format_help()
    assert "(default: 100)" in text and "(default: 1.0)" in text  # --ddim_steps, --ddim_eta
    for _, module in JOBS.values():
        assert "\u00a7" not in importlib.import_module(module).build_parser().format_help()
    tracked = subprocess.run(["git", "-C", str(ROOT), "grep", "-l", "-I", "\u00a7", "--", "*.py", "*.md", "*.yaml"],
                             capture_output=True, text=True).stdout.split()
    assert not tracked, f"references to documents outside the repository in {tracked}"
