"""Broken models (issue 30, items 1 and 13): a model with NaN/inf weights, or finite weights that sample NaN, is
refused with one line naming it, exit status 2, and no image of it written (never scored as a perfect eraser);
a path that is a device, not a checkpoint file, says so.

Tiny config (configs/tiny), CPU; the benchmark runs its artist suite (the toy world's CLIP as the scorer, never
reached: every case stops in generation)."""
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG, tiny_model

from evaluation import benchmark
from ldm.checkpoint import CheckpointError, load_state_dict, save_state_dict
from runtime import export, sample
from runtime.delta import save_delta

ROOT = Path(__file__).resolve().parents[2]
CLIP = ROOT / "assets/toyworld/clip"
UNET = "model.diffusion_model."
INF_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"
OUT_KEY = "model.diffusion_model.out.2.weight"  # the UNet's last conv: a huge weight overflows eps


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_ckpt):
    """The tiny base and broken variants of it: one inf tensor (full checkpoint, bare UNet, diffusers-free
    safetensors), and finite weights whose UNet output overflows float32 while sampling."""
    d = tmp_path_factory.mktemp("broken")
    shutil.copy(tiny_ckpt, d / "base.ckpt")
    sd = tiny_model().state_dict()
    inf = dict(sd)
    inf[INF_KEY] = sd[INF_KEY].clone()
    inf[INF_KEY][0, 0] = float("inf")
    save_state_dict(inf, d / "inf_base.ckpt")
    save_state_dict(inf, d / "inf_full.safetensors")
    save_state_dict({k: v for k, v in inf.items() if k.startswith(UNET)}, d / "inf_unet.safetensors")
    huge = dict(sd)
    huge[OUT_KEY] = torch.full_like(sd[OUT_KEY], 3e38)  # finite, but eps = sum of 3e38 * h: inf, then NaN
    save_state_dict(huge, d / "overflow.safetensors")
    assert all(bool(torch.isfinite(v).all()) for v in huge.values() if v.is_floating_point())
    save_delta(d / "delta.safetensors", {INF_KEY: sd[INF_KEY] * 2})
    return d


def _one_line_exit_2(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, err
    lines = [ln for ln in err if ln.strip() and not ln.startswith(("sampling", "artist"))]  # tqdm bars
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png")) if folder.exists() else []


# ---------------------------------------------------------------------------------------- loading: NaN/inf weights
def test_loader_names_the_file_and_the_tensor(models):
    for name in ("inf_base.ckpt", "inf_full.safetensors", "inf_unet.safetensors"):
        with pytest.raises(CheckpointError, match=rf"{name}: tensor '{INF_KEY}' holds NaN or inf values \(1 of"):
            load_state_dict(models / name)
    assert INF_KEY in load_state_dict(models / "overflow.safetensors")  # finite: loads


def test_ema_copies_are_not_checked(tmp_path):
    """model_ema.* are never loaded into a model: a NaN there costs nothing and breaks nothing."""
    save_state_dict({"w": torch.ones(2), "model_ema.w": torch.full((2,), float("nan"))}, tmp_path / "e.safetensors")
    assert set(load_state_dict(tmp_path / "e.safetensors")) == {"w", "model_ema.w"}


def test_sample_refuses_an_inf_base(models, tmp_path, capsys):
    out = tmp_path / "out"
    err = _one_line_exit_2(sample.main, ["--ckpt", str(models / "inf_base.ckpt"), "--config", str(TINY_CONFIG),
                                         "--H", "16", "--W", "16", "--ddim_steps", "2", "--n_samples", "2",
                                         "--outdir", str(out)], capsys)
    assert "inf_base.ckpt" in err and INF_KEY in err and "NaN or inf" in err
    assert _pngs(out) == []


def test_export_refuses_an_inf_base(models, tmp_path, capsys):
    merged = tmp_path / "merged.safetensors"
    err = _one_line_exit_2(export.main, ["--ckpt", str(models / "inf_base.ckpt"), "--delta_ckpt",
                                         str(models / "delta.safetensors"), "--config", str(TINY_CONFIG),
                                         "--out", str(merged)], capsys)
    assert "inf_base.ckpt" in err and INF_KEY in err
    assert list(tmp_path.iterdir()) == []  # no merged file, no temporary left


def _bench_argv(models, out, *extra):
    return ["artist", "--limit", "1", "--artist", "Van Gogh", "--base", str(models / "base.ckpt"), "--config",
            str(TINY_CONFIG), "--H", "16", "--W", "16", "--steps", "2", "--batch_size", "2",
            "--clip_model", str(CLIP), "--outdir", str(out), "--gpus", "cpu", *extra]


@pytest.mark.parametrize("flag, file", [("--unet", "inf_unet.safetensors"), ("--compvis", "inf_full.safetensors"),
                                        ("--base", "inf_base.ckpt")])
def test_benchmark_refuses_an_inf_model(models, tmp_path, capsys, flag, file):
    out = tmp_path / "bench"
    argv = _bench_argv(models, out)
    if flag == "--base":
        argv[argv.index("--base") + 1] = str(models / file)
    else:
        argv += [flag, f"broken={models / file}"]
    err = _one_line_exit_2(benchmark.main, argv, capsys)
    assert file in err and INF_KEY in err and "NaN or inf" in err
    model = "base" if flag == "--base" else "broken"
    assert _pngs(out / "images" / "artist" / model) == []
    assert not (out / "artist" / "records").exists() and not (out / "results.md").exists()  # never scored


# ---------------------------------------------------------------------------------------- sampling: NaN/inf outputs
def test_benchmark_stops_a_model_that_samples_nan(models, tmp_path, capsys):
    """Finite weights that overflow while sampling: the run stops at the first batch, names the model as its
    flag does, writes none of its images and scores nothing; the base's images stay (a rerun reuses them)."""
    out = tmp_path / "bench"
    err = _one_line_exit_2(benchmark.main, _bench_argv(models, out, "--compvis",
                                                       f"huge={models / 'overflow.safetensors'}"), capsys)
    assert f"--compvis huge={models / 'overflow.safetensors'}" in err and "NaN or inf" in err
    assert "no image of this batch was written" in err
    assert _pngs(out / "images" / "artist" / "huge") == []
    assert len(_pngs(out / "images" / "artist" / "base")) >= 1
    assert not (out / "artist" / "records").exists() and not (out / "results.md").exists()


def test_sample_stops_a_model_that_samples_nan(models, tmp_path, capsys):
    out = tmp_path / "out"
    err = _one_line_exit_2(sample.main, ["--ckpt", str(models / "overflow.safetensors"), "--config",
                                         str(TINY_CONFIG), "--H", "16", "--W", "16", "--ddim_steps", "2",
                                         "--n_samples", "2", "--outdir", str(out)], capsys)
    assert f"--ckpt {models / 'overflow.safetensors'}" in err and "NaN or inf" in err
    assert _pngs(out) == []


@pytest.mark.slow  # two spawned processes: ~40 s on a shared 2-core machine
def test_worker_processes_hand_the_error_over(models, tmp_path):
    """With several generation processes the parent raises the worker's error as it is (one line), not a
    traceback of the child."""
    import functools

    from omegaconf import OmegaConf

    from runtime.generate import NonFiniteSampleError, Sampling, generate_images
    from runtime.loading import load_model

    config = OmegaConf.to_container(OmegaConf.load(TINY_CONFIG).model, resolve=True)
    factory = functools.partial(load_model, config, str(models / "overflow.safetensors"), None)
    with pytest.raises(NonFiniteSampleError, match="^huge model: sampling gave NaN or inf"):
        generate_images(factory, ["a cat"] * 4, tmp_path / "g", Sampling(steps=2, height=16, width=16, batch_size=2),
                        devices=("cpu", "cpu"), model="huge model")
    assert _pngs(tmp_path / "g") == []


# ---------------------------------------------------------------------------------------- 13: not a regular file
@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_a_device_is_named_as_such(models, tmp_path, capsys):
    from evaluation.models import ModelSpecError, parse_models

    with pytest.raises(ModelSpecError, match="^--delta x=/dev/zero: is a character device, not a checkpoint file$"):
        parse_models(str(models / "base.ckpt"), deltas=["x=/dev/zero"])
    err = _one_line_exit_2(sample.main, ["--ckpt", str(models / "base.ckpt"), "--delta_ckpt", "/dev/zero",
                                         "--config", str(TINY_CONFIG), "--outdir", str(tmp_path / "o")], capsys)
    assert err == "error: --delta_ckpt /dev/zero: is a character device, not a checkpoint file"
    err = _one_line_exit_2(benchmark.main, _bench_argv(models, tmp_path / "b", "--unet", "u=/dev/null"), capsys)
    assert err == "error: --unet u=/dev/null: is a character device, not a checkpoint file"
    err = _one_line_exit_2(sample.main, ["--ckpt", "/dev/zero", "--config", str(TINY_CONFIG), "--outdir",
                                         str(tmp_path / "o")], capsys)
    assert err == "error: --ckpt /dev/zero: is a character device, not a checkpoint file"
    missing = tmp_path / "gone.ckpt"
    err = _one_line_exit_2(sample.main, ["--ckpt", str(models / "base.ckpt"), "--delta_ckpt", str(missing),
                                         "--config", str(TINY_CONFIG), "--outdir", str(tmp_path / "o")], capsys)
    assert err == f"error: --delta_ckpt not found: {missing}"
    fifo = tmp_path / "pipe.ckpt"
    import os

    os.mkfifo(fifo)
    err = _one_line_exit_2(sample.main, ["--ckpt", str(models / "base.ckpt"), "--delta_ckpt", str(fifo),
                                         "--config", str(TINY_CONFIG), "--outdir", str(tmp_path / "o")], capsys)
    assert err == f"error: --delta_ckpt {fifo}: is a named pipe (FIFO), not a checkpoint file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.ckpt"]
