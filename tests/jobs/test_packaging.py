"""Packaging: pyproject.toml's dependency files and entry points, the root scripts as shells over the jobs, and the
installed package from outside the repository (skipped where the package is not installed, e.g. a venv made
before pyproject.toml; tools/setup.sh and CI install it)."""
from __future__ import annotations

import ast
import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
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
        "ablate-evaluate": ("evaluate.py", "evaluation.protocol"),
        "ablate-export": ("tools/export.py", "runtime.export"),
        "conceptprune": ("conceptprune.py", "prune.jobs"),
        "ablate-benchmark": ("benchmark.py", "evaluation.benchmark"),
        "ablate-attack": ("attack.py", "attacks.job")}


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
    code = ("import ldm, runtime, scoring, ablation, prune, evaluation, toyworld, ablation.train; "
            "print(ablation.train.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == ROOT / "ablation" / "train.py"
    bindir = Path(sys.executable).parent
    for cmd in (["ablate-train", "--help"], ["conceptprune", "--help"],
                [sys.executable, "-m", "toyworld.mission", "--help"]):
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


def test_every_package_is_in_the_wheel():
    """pyproject.toml lists the packages (the data package's mapping rules out discovery): every folder of the
    clone holding Python modules, outside tests/tools/benchmarks, is one of them."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    skip = {"tests", "tools", "benchmarks", "docs", "assets", "configs", "build", "logs", "outputs", "demo",
            "__pycache__"}
    found = set()
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".") and not d.endswith(".egg-info")]
        if Path(folder) != ROOT and any(f.endswith(".py") for f in files):
            found.add(str(Path(folder).relative_to(ROOT)).replace(os.sep, "."))
    assert found == {p for p in listed if not p.startswith("concept_ablation_data")}
    data = PYPROJECT["tool"]["setuptools"]["package-dir"]
    assert data == {"concept_ablation_data.configs": "configs", "concept_ablation_data.assets": "assets"}


# Run from the installed copy (PYTHONPATH=site, a folder outside the clone): every path below must be the wheel's.
_INSTALLED_PROBE = r'''
import json, sys
from pathlib import Path

site = Path(sys.argv[1]).resolve()
import ablation, evaluation, ldm, prune, runtime, scoring, toyworld
from runtime import resources
from runtime.resources import DEFAULT_CONFIG
from ablation.train import TrainSettings, load_config
from evaluation import prompt_sets, protocol
from prune import prompts as prune_prompts
from prune.jobs import DEFAULT_CKPT
from toyworld import mission
from toyworld.ldm import DEFAULT_CONFIG as TOY_CONFIG

def inside(p):
    return Path(p).resolve().is_relative_to(site)

modules = [m.__file__ for m in (ablation, evaluation, ldm, prune, runtime, scoring, toyworld)]
data = {"data_root": resources.DATA_ROOT, "sd_config": DEFAULT_CONFIG, "toy_config": TOY_CONFIG,
        "eval_json": protocol.EvaluateSettings("r", "style", "x").eval_json, "eval_prompts": protocol.PROMPT_DIR,
        "prune_prompts": prune_prompts.PROMPT_DIR, "benchmark": prompt_sets.ASSETS, "toy_assets": mission.ASSETS,
        "toy_weights": mission.ASSETS / "ldm" / "toyworld-ldm.safetensors"}
# Read through the defaults: the concept config (configs/ablation/style.yaml) merged with the default model config,
# an evaluation entry with its prompt file, ConceptPrune's own prompt pairs, a benchmark prompt file.
config = load_config(TrainSettings(concept_type="style", caption_target="van gogh", prompts="p.txt"))
entry = protocol.load_eval_entry(Path(protocol.EvaluateSettings("r", "style", "x").eval_json), "style", "van gogh")
pairs = prune_prompts.build_pairs("church")
print(json.dumps({"in_clone": resources.IN_CLONE, "weights_dir": str(resources.WEIGHTS_DIR),
                  "default_ckpt": str(DEFAULT_CKPT),
                  "outside": [str(p) for p in [*modules, *data.values()] if not inside(p)],
                  "missing": [k for k, p in data.items() if not Path(p).exists()],
                  "unet_channels": config.model.params.unet_config.params.model_channels,
                  "eval_anchor": entry["anchor"], "pairs": len(pairs.target)}))
'''


def _build_and_install(tmp_path: Path) -> Path:
    """The wheel of the clone's files (``git ls-files``: a clone's own weights and outputs stay out), installed
    with ``pip install --target``; returns that folder."""
    src, wheels, site = tmp_path / "src", tmp_path / "wheels", tmp_path / "site"
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():  # a deleted, not yet committed file is still listed
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    def pip(*args):
        out = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *map(str, args)],
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", wheels, src)  # offline: no build isolation
    pip("install", "--no-deps", "--no-index", "--target", site, *wheels.glob("*.whl"))
    return site


@pytest.mark.slow
def test_wheel_install_runs_from_any_folder_on_its_package_data(tmp_path):
    """``pip install .`` (a wheel, not -e): from a folder outside the clone every command starts, its defaults
    point into the installed package data (configs, eval set, prompt files, the toy world's weights), and the toy
    model samples from the installed copy."""
    site = _build_and_install(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "COLUMNS": "120"}

    def run(*cmd, timeout=300):
        out = subprocess.run([str(c) for c in cmd], cwd=elsewhere, env=env, capture_output=True, text=True,
                             timeout=timeout)
        assert out.returncode == 0, (cmd, out.stdout[-2000:], out.stderr[-3000:])
        return out.stdout

    scripts = PYPROJECT["project"]["scripts"]
    for command, target in scripts.items():
        assert "usage:" in run(sys.executable, "-m", target.split(":")[0], "--help")
        assert "usage:" in run(site / "bin" / command, "--help")  # the console script pip generated
    assert "usage:" in run(sys.executable, "-m", "toyworld.quality", "--help")

    probe = json.loads(run(sys.executable, "-c", _INSTALLED_PROBE, site).splitlines()[-1])
    assert probe["in_clone"] is False and probe["outside"] == [] and probe["missing"] == []
    assert probe["weights_dir"] == "assets/pretrained_models"  # the user's weights: relative to the working folder
    assert probe["default_ckpt"] == "assets/pretrained_models/sd-v1-4.ckpt"
    assert probe["unet_channels"] == 320 and probe["eval_anchor"] and probe["pairs"] > 0

    toy = site / "concept_ablation_data" / "assets" / "toyworld" / "ldm"
    run(sys.executable, "-m", "runtime.sample", "--ckpt", toy / "toyworld-ldm.safetensors",
        "--config", toy / "ldm.yaml", "--prompt", "a red circle on the grass", "--H", "32", "--W", "32",
        "--ddim_steps", "2", "--n_samples", "1", "--precision", "full", "--outdir", elsewhere / "samples",
        "--skip_grid")
    assert len(list((elsewhere / "samples" / "samples").glob("*.png"))) == 1
    assert not list(site.glob("concept_ablation_data/assets/pretrained_models/*"))  # the user's weights: never shipped
    assert not list(site.glob("concept_ablation_data/assets/toyworld/**/*.png"))
