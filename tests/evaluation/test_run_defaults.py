"""Defaults that follow the run (issue 20, items 4-5): sample.py and evaluate.py take the base checkpoint the
run's config records, metrics default into the run folder, the base-image cache stays out of the repository,
and folders generated with other settings are refused in setup, named."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
from omegaconf import OmegaConf
from test_evaluate import GEN, env, evaluate_argv  # noqa: F401 (fixture)

from evaluation import protocol
from runtime.sample import SampleSettings, check


@pytest.fixture()
def recorded_run(env, tmp_path):  # noqa: F811
    """A copy of the evaluation run whose config records its base checkpoint, as train.py writes it."""
    run = tmp_path / "logs" / env["run"].name
    shutil.copytree(env["run"], run, ignore=shutil.ignore_patterns("eval"))
    cfg_path = next((run / "configs").glob("*.yaml"))
    cfg = OmegaConf.load(cfg_path)
    cfg.run = {"base_ckpt": str(env["base"])}
    OmegaConf.save(cfg, cfg_path)
    return run


def _without(argv, *flags):
    out = list(argv)
    for f in flags:
        i = out.index(f)
        del out[i:i + 2]
    return out


def test_evaluate_defaults_follow_the_run(env, recorded_run):  # noqa: F811
    argv = _without(evaluate_argv(env, root=recorded_run), "--base_ckpt", "--outpkl")
    plan = protocol.plan(protocol.parse_settings(argv))
    assert plan.settings.base_ckpt == str(env["base"])
    assert plan.outpkl == recorded_run / "metrics" / "evaluation.pkl"
    p = protocol.build_parser()
    assert "assets" not in p.get_default("base_outpath")


def test_sample_takes_the_runs_base(env, recorded_run, tmp_path):  # noqa: F811
    delta = next((recorded_run / "checkpoints").glob("delta_step_*"))
    settings = check(SampleSettings(delta_ckpt=str(delta), prompt="a cat", H=16, W=16, ddim_steps=2, n_samples=1,
                                    outdir=str(tmp_path / "o")))
    assert settings.ckpt == str(env["base"])


def test_folder_made_with_other_settings_fails_in_setup(env, recorded_run, tmp_path):  # noqa: F811
    base = tmp_path / "baseline"
    argv = evaluate_argv(env, root=recorded_run)
    argv[argv.index("--base_outpath") + 1] = str(base)
    plan = protocol.plan(protocol.parse_settings(argv))
    folder = protocol.base_dir(plan, plan.concepts[0])
    folder.mkdir(parents=True)
    from runtime.generate import PLAN_FILE, plan_dict

    a = plan.settings
    old = plan_dict(replace(a.sampling(), steps=a.steps + 1), plan.concepts[0].prompts)
    (folder / PLAN_FILE).write_text(json.dumps(old))
    with pytest.raises(ValueError, match=rf"{folder.name} was generated with other settings \(differs in: steps\)"):
        protocol.settings_from_argv(argv)
