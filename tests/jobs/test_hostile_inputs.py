"""Regressions of the hostile-input and fault campaign: malicious files, bad numbers and paths, kills mid-run.

Every refusal must come before any work, as one clear message, with nothing written."""
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG, Evil, tiny_model
from omegaconf import OmegaConf
from PIL import Image

from ablation import train
from evaluation import protocol
from ldm.checkpoint import CheckpointError, UnsafeCheckpointError, load_checkpoint, load_state_dict, save_state_dict
from prune import jobs as conceptprune
from runtime import cli, export, sample
from runtime.delta import save_delta
from runtime.export import ExportSettings
from runtime.loading import check_delta
from runtime.sample import SampleSettings

ROOT = Path(__file__).resolve().parents[2]
KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"
UNWRITABLE = "/proc/no-such-dir/out"  # not creatable, for root too



@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_ckpt):
    d = tmp_path_factory.mktemp("hostile")
    shutil.copy(tiny_ckpt, d / "base.ckpt")
    sd = tiny_model().state_dict()
    save_delta(d / "delta.safetensors", {KEY: sd[KEY] * 3})
    (d / "painting.txt").write_text("a painting of a harbour\na portrait of a fisherman\n")
    (d / "cat.txt").write_text("a cat on a sofa\na photo of a cat\n")
    return d


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def _train_argv(d: Path, tmp: Path, *extra):
    return ["--concept_type", "style", "--caption_target", "van gogh", "--prompts", str(d / "painting.txt"),
            "--model_config", str(TINY_CONFIG), "-rc", str(d / "base.ckpt"), "--root", str(tmp / "data"),
            "--logdir", str(tmp / "logs"), "--train_size", "2", "--n_samples", "2", *extra]


def _sample_argv(d: Path, out: Path, *extra):
    return ["--ckpt", str(d / "base.ckpt"), "--config", str(TINY_CONFIG), "--H", "16", "--W", "16",
            "--ddim_steps", "2", "--n_samples", "2", "--outdir", str(out), *extra]


def _sample_settings(d: Path, out: Path, **kw) -> SampleSettings:
    return SampleSettings(**{"ckpt": str(d / "base.ckpt"), "config": str(TINY_CONFIG), "H": 16, "W": 16,
                             "ddim_steps": 2, "n_samples": 2, "outdir": str(out), **kw})


# ------------------------------------------------------------------ 1. evaluate.py never unpickles --outpkl
def test_outpkl_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    outpkl = tmp_path / "metrics" / "evaluation.pkl"
    outpkl.parent.mkdir()
    outpkl.write_bytes(pickle.dumps(Evil(marker)))
    # a pickle without its JSON: refused, not read, not replaced
    with pytest.raises(ValueError, match="not read"):
        protocol.update_table(outpkl, {"run_a": {"KID_x": 0.5}})
    assert not marker.exists()
    # with the JSON beside it, the JSON is the table; the planted pickle is overwritten, never loaded
    outpkl.with_suffix(".json").write_text(json.dumps({"run_old": {"KID_x": 0.25, "FID_x": None}}))
    df = protocol.update_table(outpkl, {"run_a": {"KID_x": 0.5}})
    assert not marker.exists()
    assert df.loc["run_old", "KID_x"] == 0.25 and df.loc["run_a", "KID_x"] == 0.5
    assert np.isnan(df.loc["run_old", "FID_x"]) and np.isnan(df.loc["run_a", "FID_x"])
    stored = json.loads(outpkl.with_suffix(".json").read_text())
    assert stored["run_a"]["KID_x"] == 0.5 and stored["run_old"]["KID_x"] == 0.25
    import pandas as pd

    assert pd.read_pickle(outpkl).loc["run_a", "KID_x"] == 0.5  # the pickle stays for the original's readers
    # a JSON that is not a table is refused with its name
    outpkl.with_suffix(".json").write_text('{"run": [1, 2]')
    with pytest.raises(ValueError, match="evaluation.json"):
        protocol.read_table(outpkl)


# ------------------------------------------------------------------ 2. two runs in the same second
def test_same_second_same_name_runs_get_their_own_folders(files, tmp_path, monkeypatch):
    from datetime import datetime

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(train, "datetime", Frozen)
    fast = ["training.max_steps=1", "training.save_freq=1", "data.size=16", "generation.steps=2",
            "logging.image_every=0", "training.num_workers=0", "training.batch_size=2"]
    settings = train.settings_from_argv(["-t", *_train_argv(files, tmp_path, "--name", "same"), *fast])
    runs = [train.run(settings) for _ in range(2)]
    assert [r.name for r in runs] == ["2026-01-02T03-04-05_same", "2026-01-02T03-04-05_same-2"]
    for r in runs:
        assert len(list((r / "checkpoints").glob("delta_step_1.*"))) == 1
        assert len(list((r / "configs").glob("*-project.yaml"))) == 1
    # a DDP rank > 0 joins rank 0's folder instead of making one
    monkeypatch.setenv("ABLATION_RUN_NAME", runs[1].name)
    assert train.join_or_make_run_dir(tmp_path / "logs", "same", is_rank_zero=False) == runs[1]
    assert len(list((tmp_path / "logs").iterdir())) == 2


# ------------------------------------------------------------------ 3. an output that is an input
def test_output_equal_to_an_input_is_refused(files, tmp_path):
    base = tmp_path / "v.ckpt"
    shutil.copy(files / "base.ckpt", base)
    before = base.read_bytes()
    masks = _tiny_masks(files, tmp_path)
    with pytest.raises(cli.UsageError, match="overwrite the input"):
        conceptprune.settings_from_argv(["prune", "--masks", str(masks), "--ckpt", str(base), "--config",
                                         str(TINY_CONFIG), "--out", str(base), "--tau", "2"])
    link = tmp_path / "alias.ckpt"  # the same file under another name
    link.symlink_to(base)
    with pytest.raises(cli.UsageError, match="overwrite the input"):
        conceptprune.settings_from_argv(["prune", "--masks", str(masks), "--ckpt", str(base), "--config",
                                         str(TINY_CONFIG), "--out", str(link), "--tau", "2"])
    for out in (base, files / "delta.safetensors"):
        with pytest.raises(cli.UsageError, match="overwrite the input"):
            export.run(ExportSettings(ckpt=str(base), delta_ckpt=str(files / "delta.safetensors"),
                                      config=str(TINY_CONFIG), out=str(out)))
    assert base.read_bytes() == before


def _tiny_masks(files, tmp_path) -> Path:
    """A mask file for the tiny model, made by conceptprune.py discover (2 pairs, 2 PLMS steps)."""
    base_f, target_f = tmp_path / "b.txt", tmp_path / "t.txt"
    base_f.write_text("a house\na tree\n")
    target_f.write_text("a house by van gogh\na tree by van gogh\n")
    summary = conceptprune.run_discover(conceptprune.DiscoverSettings(
        concept="vg", base_file=str(base_f), target_file=str(target_f), skill_ratio=0.1, ckpt=str(files / "base.ckpt"),
        config=str(TINY_CONFIG), H=16, W=16, steps=2, save_images=0, outdir=str(tmp_path / "prune"), device="cpu"))
    return Path(summary["masks"])


# ------------------------------------------------------------------ 4. unwritable outputs, found first
@pytest.mark.parametrize("flag", ["--logdir", "--root"])
def test_train_unwritable_output_found_before_work(files, tmp_path, flag):
    argv = _train_argv(files, tmp_path)
    argv[argv.index(flag) + 1] = UNWRITABLE
    with pytest.raises(cli.UsageError, match=f"{flag}.*cannot write"):
        train.settings_from_argv(argv)
    (tmp_path / "file").write_text("x")  # a file where a folder is needed
    argv[argv.index(flag) + 1] = str(tmp_path / "file" / "sub")
    with pytest.raises(cli.UsageError, match="is a file"):
        train.settings_from_argv(argv)
    assert not (tmp_path / "data").exists() and not (tmp_path / "logs").exists()


def test_sample_and_conceptprune_unwritable_outdir(files, tmp_path):
    with pytest.raises(cli.UsageError, match="--outdir"):
        sample.check(_sample_settings(files, Path(UNWRITABLE)))
    with pytest.raises(cli.UsageError, match="--outdir"):
        conceptprune.settings_from_argv(["discover", "--concept", "Van Gogh", "--ckpt", str(files / "base.ckpt"),
                                         "--config", str(TINY_CONFIG), "--outdir", UNWRITABLE, "--device", "cpu"])


def test_check_output_probe_leaves_nothing(tmp_path):
    assert cli.check_output(tmp_path / "a" / "b" / "out.pkl", "--out") == tmp_path / "a" / "b" / "out.pkl"
    assert cli.check_output(tmp_path / "new", "--dir", kind="dir") == tmp_path / "new"
    assert list(tmp_path.iterdir()) == []  # no folder created, no probe left
    with pytest.raises(cli.UsageError, match="directory, not a file"):
        cli.check_output(tmp_path, "--out")
    with pytest.raises(cli.UsageError, match="same path"):
        cli.check_distinct_outputs({"--a": tmp_path / "x", "--b": tmp_path / "." / "x"})


# ------------------------------------------------------------------ 5. a kill during sample.py's hand-over
def test_sample_killed_during_final_move_resumes_without_duplicates(files, tmp_path, monkeypatch):
    out = tmp_path / "s"
    settings = _sample_settings(files, out, n_samples=4, n_iter=5, metadata=True)  # 20 images
    real_replace, calls = os.replace, []

    def dying_replace(src, dst):
        if str(dst).endswith(".png") and Path(dst).parent.name == "samples" and ".staging-" not in str(dst):
            calls.append(dst)
            if len(calls) == 7:
                raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(sample.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        sample.run(settings)
    monkeypatch.setattr(sample.os, "replace", real_replace)
    assert len(list((out / "samples").glob("*.png"))) == 6
    sample.run(settings)
    pngs = sorted(p.name for p in (out / "samples").glob("*.png"))
    assert pngs == [f"{i:05d}.png" for i in range(20)]
    assert (out / "images.txt").read_text().splitlines() == [f"samples/{n}" for n in pngs]
    assert len((out / "caption.txt").read_text().splitlines()) == 20
    assert not list(out.glob(".staging-*"))
    # the resumed images are the ones an uninterrupted call makes
    ref = tmp_path / "ref"
    sample.run(_sample_settings(files, ref, n_samples=4, n_iter=5))
    assert all((out / "samples" / n).read_bytes() == (ref / "samples" / n).read_bytes() for n in pngs)


# ------------------------------------------------------------------ 6./7. bad base checkpoints, up front
def _bad_bases(files, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Evil(marker)}, evil)
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes((files / "base.ckpt").read_bytes()[:5000])
    wrong = tmp_path / "wrong.safetensors"
    save_state_dict({"model.diffusion_model.out.2.weight": torch.zeros(2, 2)}, wrong)
    return marker, {"malicious": (evil, "execute code"), "corrupt": (corrupt, "could not read"),
                    "wrong model": (wrong, "does not fit")}


def test_bad_base_checkpoint_refused_before_anything_is_written(files, tmp_path):
    marker, bad = _bad_bases(files, tmp_path)
    work = tmp_path / "work"
    for name, (path, match) in bad.items():
        with pytest.raises(CheckpointError, match=match):
            sample.check(_sample_settings(files, work / "s", ckpt=str(path)))
        argv = _train_argv(files, work)
        argv[argv.index("-rc") + 1] = str(path)
        with pytest.raises(CheckpointError, match=match):
            train.settings_from_argv(argv)
        with pytest.raises(CheckpointError, match=match):
            conceptprune.settings_from_argv(["discover", "--concept", "Van Gogh", "--ckpt", str(path), "--config",
                                             str(TINY_CONFIG), "--outdir", str(work / "p"), "--device", "cpu"])
    assert not marker.exists()
    assert _listing(work) == []


def test_zip_checkpoint_named_safetensors_loads_by_content(files, tmp_path):
    renamed = tmp_path / "really_a_zip.safetensors"
    shutil.copy(files / "base.ckpt", renamed)
    a, b = load_state_dict(renamed), load_state_dict(files / "base.ckpt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sample.check(_sample_settings(files, tmp_path / "s", ckpt=str(renamed)))  # the up-front check passes too


# ------------------------------------------------------------------ 8. legitimate Lightning contents
def test_dictconfig_path_and_numpy_array_load_safely(tmp_path):
    cfg = OmegaConf.create({"model": {"lr": 1e-5, "layers": [1, 2]}, "name": "run", "ref": "${name}"})
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": cfg, "log_dir": pathlib.Path("/a/b"),
                "stats": np.arange(3.0), "global_step": 7}, path)
    obj = load_checkpoint(path)
    assert obj["hyper_parameters"] == {"model": {"lr": 1e-5, "layers": [1, 2]}, "name": "run", "ref": "${name}"}
    assert obj["log_dir"] == pathlib.PurePosixPath("/a/b") and not isinstance(obj["log_dir"], pathlib.Path)
    assert np.array_equal(obj["stats"], np.arange(3.0)) and obj["global_step"] == 7
    # still refused: object arrays, and code hidden next to a DictConfig
    torch.save({"state_dict": {"w": torch.ones(2)}, "a": np.array([object()], dtype=object)}, tmp_path / "o.ckpt")
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(tmp_path / "o.ckpt")
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": cfg, "x": Evil(marker)}, tmp_path / "e.ckpt")
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(tmp_path / "e.ckpt")
    assert not marker.exists()


# ------------------------------------------------------------------ 9. NaN / inf
def test_non_finite_delta_refused(files, tmp_path):
    nan = tmp_path / "nan.safetensors"
    save_delta(nan, {KEY: torch.full_like(tiny_model().state_dict()[KEY], float("nan"))})
    model_config = OmegaConf.to_container(OmegaConf.load(TINY_CONFIG).model, resolve=True)
    with pytest.raises(CheckpointError, match="NaN or inf"):
        check_delta(model_config, nan)
    with pytest.raises(CheckpointError, match="NaN or inf"):
        sample.check(_sample_settings(files, tmp_path / "s", delta_ckpt=str(nan)))
    with pytest.raises(CheckpointError, match="NaN or inf"):
        export.run(ExportSettings(ckpt=str(files / "base.ckpt"), delta_ckpt=str(nan), config=str(TINY_CONFIG),
                                  out=str(tmp_path / "merged.safetensors")))
    assert _listing(tmp_path) == ["nan.safetensors"]


# ------------------------------------------------------------------ 10. numeric arguments, one class
@pytest.mark.parametrize("script,argv,flag", [
    (sample, ["--scale", "nan"], "--scale"),
    (sample, ["--H", "12"], "--H"),
    (sample, ["--ddim_eta", "-1"], "--ddim_eta"),
    (sample, ["--n_samples", "0"], "--n_samples"),
    (sample, ["--ddim_steps", "inf"], "--ddim_steps"),
    (train, ["--concept_type", "style", "--caption_target", "x", "--prompts", "p", "--n_samples", "0"],
     "--n_samples"),
    (train, ["--concept_type", "style", "--caption_target", "x", "--prompts", "p", "--base_lr", "-1"], "--base_lr"),
    (conceptprune, ["discover", "--concept", "x", "--steps", "abc"], "--steps"),
    (conceptprune, ["prune", "--masks", "m", "--tau", "0"], "--tau"),
])
def test_numeric_flags_one_line_exit_2(script, argv, flag, capsys):
    build_parser = script.build_parser
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err and "error:" in err


def test_evaluate_numeric_flag_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        protocol.main(["--root", "x", "--concept_type", "style", "--caption_target", "x", "--numgen", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--numgen" in err and "error:" in err


@pytest.mark.parametrize("override,match", [
    ("generation.steps=-1", "generation.steps"),
    ("generation.steps=3", "DDIM grid"),
    ("data.size=12", "data.size"),
    ("training.max_steps=abc", "training.max_steps"),
    ("training.base_learning_rate=-1", "base_learning_rate"),
    ("training.save_freq=-1", "save_freq"),
    ("generation.eta=nan", "generation.eta"),
])
def test_config_overrides_checked_before_work(files, tmp_path, override, match):
    argv = _train_argv(files, tmp_path, override)
    with pytest.raises(ValueError, match=match):
        train.settings_from_argv(argv)
    assert _listing(tmp_path) == []


def test_cli_bad_input_is_one_line_and_nothing_written(files, tmp_path):
    """The scripts themselves, as users run them: exit 2, one stderr line, no output folder."""
    cases = [
        [ROOT / "sample.py", *_sample_argv(files, tmp_path / "s", "--scale", "nan")],
        [ROOT / "train.py", *_train_argv(files, tmp_path, "data.size=12")],
    ]
    for cmd in cases:
        r = subprocess.run([sys.executable, *map(str, cmd)], capture_output=True, text=True, cwd=tmp_path,
                           timeout=300)
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "error:" in r.stderr
    assert _listing(tmp_path) == []


# ------------------------------------------------------------------ 11. clear messages
def test_messages_name_the_file(files, tmp_path):
    from runtime.files import read_prompts

    bad = tmp_path / "latin1.txt"
    bad.write_bytes("a caf\xe9 in paris\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt.*UTF-8"):
        read_prompts(bad)
    js = tmp_path / "eval.json"
    for text, match in (("[1, 2]", "expected an object"), ('{"object": {"x": "y"}}', "must be an object"),
                        ('{"object": {', "not valid JSON")):
        js.write_text(text)
        with pytest.raises(ValueError, match=match) as e:
            protocol.load_eval_entry(js, "object", "x")
        assert "eval.json" in str(e.value)


def test_truncated_image_in_eval_folder_is_named(tmp_path):
    folder = tmp_path / "f"
    (folder / "samples").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (16, 16), (i, 0, 0)).save(folder / "samples" / f"{i:05d}.png")
    (folder / "images.txt").write_text("samples/00000.png\nsamples/00001.png\n")
    data = (folder / "samples" / "00001.png").read_bytes()
    (folder / "samples" / "00001.png").write_bytes(data[: len(data) // 2])
    from evaluation.runner import folder_images

    with pytest.raises(ValueError, match="00001.png"):
        folder_images(folder, 2)


# ------------------------------------------------------------------ 12. an anchor word no prompt contains
def test_object_anchor_missing_from_prompts(files, tmp_path):
    argv = _train_argv(files, tmp_path)
    argv[argv.index("--concept_type") + 1] = "object"
    argv[argv.index("--prompts") + 1] = str(files / "cat.txt")
    argv[argv.index("--caption_target") + 1] = "dog+grumpy dog"
    with pytest.raises(ValueError, match="'dog'.*none of"):
        train.settings_from_argv(argv)
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("a cat on a sofa\na photo of a garden\n")
    argv[argv.index("--caption_target") + 1] = "cat+grumpy cat"
    argv[argv.index("--prompts") + 1] = str(mixed)
    with pytest.warns(UserWarning, match="only 1 of 2 prompts"):
        train.settings_from_argv(argv)
    assert _listing(tmp_path) == ["mixed.txt"]


@pytest.mark.parametrize("bad, message", [
    (b"\x7fELF\x02\x01\x01\x00\xff\xfe\x00binary", "not a text file"),
    (b"training: {lr: 1}\n", "no 'model:' section"),
])
def test_a_bad_model_config_is_one_line_for_every_command(files, tmp_path, capsys, bad, message):
    """A binary model config or one without ``model:`` is refused by every command in one line that names the
    file (the one loader, ldm.util.load_model_config), exit 2, before anything is written."""
    from evaluation import benchmark

    config = tmp_path / "model.yaml"
    config.write_bytes(bad)
    out = tmp_path / "out"
    base = str(files / "base.ckpt")
    commands = [
        (train.main, _train_argv(files, out, "--model_config", str(config))),
        (sample.main, ["--ckpt", base, "--config", str(config), "--outdir", str(out)]),
        (export.main, ["--ckpt", base, "--delta_ckpt", str(files / "delta.safetensors"), "--config", str(config),
                       "--out", str(out / "merged.safetensors")]),
        (conceptprune.main, ["discover", "--concept", "Van Gogh", "--ckpt", base, "--config", str(config),
                             "--outdir", str(out), "--device", "cpu"]),
        (benchmark.main, ["artist", "--base", base, "--config", str(config), "--outdir", str(out)]),
    ]
    for main, argv in commands:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1, (main.__module__, err)
        assert str(config) in err[0] and message in err[0], (main.__module__, err)
        assert not out.exists(), main.__module__
