"""The multi-process paths, run for real on CPU: Lightning DDP on gloo (`--gpus cpu:N`), generation shared by
several processes, and the launcher-independent helpers."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG, tiny_factory
from PIL import Image

from ldm.checkpoint import load_state_dict
from runtime import cli
from runtime.dist import external_shard, is_rank_zero
from runtime.generate import Sampling, generate_images

pytestmark = pytest.mark.slow  # several processes (gloo DDP, torchrun): minutes

ROOT = Path(__file__).resolve().parents[2]
FAST = ["training.max_steps=2", "training.save_freq=0", "data.size=16", "generation.steps=2", "logging.image_every=0",
        "training.num_workers=0", "--ckpt_format", "safetensors"]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _train(d: Path, logdir: str, *extra, launcher=(sys.executable,)) -> subprocess.CompletedProcess:
    cmd = [*launcher, str(ROOT / "train.py"), "-t", "--concept_type", "style", "--caption_target", "van gogh",
           "--prompts", str(d / "painting.txt"), "--train_size", "8", "--model_config", str(TINY_CONFIG),
           "-rc", str(d / "base.ckpt"), "--root", str(d / "data"), "--logdir", str(d / logdir), "--n_samples", "2",
           *FAST, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=d)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_ckpt):
    d = tmp_path_factory.mktemp("ddp")
    (d / "base.ckpt").write_bytes(tiny_ckpt.read_bytes())
    (d / "painting.txt").write_text("a painting of a harbour\na portrait of an old fisherman\n")
    # two DDP processes with batch 2 (their anchor images made by two generation processes), then one process
    # with batch 4 on the same images
    two = _train(d, "logs2", "--gpus", "cpu:2", "training.batch_size=2")
    one = _train(d, "logs1", "training.batch_size=4")
    return d, two, one


def _run_dir(logdir: Path) -> Path:
    dirs = list(logdir.iterdir())
    assert len(dirs) == 1, dirs  # exactly one run folder, shared by both ranks
    return dirs[0]


def test_two_processes_equal_one_with_twice_the_batch(runs):
    d, two, one = runs
    assert "Starting with 2 processes" in two.stdout + two.stderr and "gloo" in two.stdout + two.stderr
    assert "lr 8e-06" in two.stdout and "lr 8e-06" in one.stdout  # base_lr x processes x batch: 2e-6 x 2 x 2 = x 1 x 4
    # equal up to float rounding: the gradient mean is summed in another order (and Adam's first steps turn
    # near-zero gradients into +-lr, so a handful of such entries may differ by a fraction of lr)
    _deltas_close(load_state_dict(next((_run_dir(d / "logs2") / "checkpoints").iterdir())),
                  load_state_dict(next((_run_dir(d / "logs1") / "checkpoints").iterdir())),
                  load_state_dict(d / "base.ckpt"))


def test_rank_zero_writes_everything_once(runs):
    d, two, _ = runs
    run = _run_dir(d / "logs2")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["delta_step_2.safetensors"]
    assert len(list((run / "configs").glob("*.yaml"))) == 1
    assert len(list(run.rglob("events.out.tfevents.*"))) == 1  # logging from rank 0 only
    assert two.stdout.count("delta checkpoints:") == 1
    # the anchor images, made by two generation processes: every image once, none missing
    gen = d / "data" / "painting_gen"
    names = (gen / "images.txt").read_text().splitlines()
    assert names == [f"samples/{i:05d}.png" for i in range(8)]
    assert sorted(p.name for p in (gen / "samples").iterdir()) == [f"{i:05d}.png" for i in range(8)]


def _deltas_close(a: dict, b: dict, base: dict) -> None:
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a]).abs()
    moved = torch.cat([(a[k] - base[k]).flatten() for k in a]).abs()
    assert moved.mean() > 5e-6
    assert diff.mean() < 1e-3 * moved.mean() and (diff > 1e-6).float().mean() < 1e-3


def test_torchrun_train_same_delta_one_folder(runs):
    """torchrun starts both ranks itself: they share the (existing) anchor images, rank 0 names the run
    folder for both, Lightning reuses their process group; the delta is the one-process delta."""
    d, _, _ = runs
    r = _train(d, "logs3", "--gpus", "cpu:2", "training.batch_size=2", launcher=TORCHRUN)
    assert r.stdout.count("delta checkpoints:") == 1
    run = _run_dir(d / "logs3")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["delta_step_2.safetensors"]
    _deltas_close(load_state_dict(run / "checkpoints" / "delta_step_2.safetensors"),
                  load_state_dict(next((_run_dir(d / "logs1") / "checkpoints").iterdir())),
                  load_state_dict(d / "base.ckpt"))


def test_torchrun_sample_makes_each_image_once(runs, tmp_path):
    d = runs[0]
    common = [str(ROOT / "sample.py"), "--ckpt", str(d / "base.ckpt"), "--config", str(TINY_CONFIG), "--H", "16",
              "--W", "16", "--ddim_steps", "2", "--n_samples", "2", "--n_iter", "5", "--metadata"]
    r = subprocess.run([*TORCHRUN, *common, "--outdir", str(tmp_path / "two"), "--gpus", "cpu:2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    shares = re.findall(r"generating (\d+) of 10 images .* \(rank (\d) of 2\)", r.stdout)
    assert sorted(rank for _, rank in shares) == ["0", "1"] and sum(int(n) for n, _ in shares) == 10
    names = [f"{i:05d}.png" for i in range(10)]
    assert sorted(p.name for p in (tmp_path / "two" / "samples").iterdir()) == names
    assert (tmp_path / "two" / "images.txt").read_text().splitlines() == [f"samples/{n}" for n in names]
    one = subprocess.run([sys.executable, *common, "--outdir", str(tmp_path / "one")], capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    for n in names:  # seeded by index: the same images as one process (up to kernel rounding)
        a = np.asarray(Image.open(tmp_path / "two" / "samples" / n), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "one" / "samples" / n), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, n


FAILING_RANK = """
import os, sys
sys.path.insert(0, {root!r})
if os.environ.get("LOCAL_RANK") == "1":  # Lightning's launcher re-runs this file for rank 1
    from ablation import module

    def boom(self, batch, batch_idx):
        raise RuntimeError("rank 1 fails on purpose")

    module.ConceptAblation.training_step = boom
from ablation.train import main

raise SystemExit(main())
"""


def test_one_failing_rank_fails_the_run_quickly(runs, tmp_path):
    d = runs[0]
    script = tmp_path / "train_rank1_fails.py"
    script.write_text(FAILING_RANK.format(root=str(ROOT)))
    cmd = [sys.executable, str(script), "-t", "--concept_type", "style", "--caption_target", "van gogh",
           "--prompts", str(d / "painting.txt"), "--train_size", "8", "--model_config", str(TINY_CONFIG),
           "-rc", str(d / "base.ckpt"), "--root", str(d / "data"), "--logdir", str(tmp_path / "logs"),
           "--n_samples", "2", *FAST, "--gpus", "cpu:2", "training.batch_size=2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode != 0
    assert "rank 1 fails on purpose" in r.stdout + r.stderr  # the cause is shown, not only rank 0's broken pipe
    assert not list((tmp_path / "logs").rglob("delta_step_*"))


def test_resume_with_two_generation_processes_writes_only_the_missing(tmp_path):
    prompts = [f"a photo of a cat, take {i}" for i in range(6)]
    sampling = Sampling(steps=2, batch_size=2, height=16, width=16, seed=3)
    out = generate_images(tiny_factory, prompts, tmp_path / "g", sampling, devices=("cpu", "cpu"))
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "samples").iterdir()}
    for name in ("00001.png", "00004.png"):
        (out / "samples" / name).unlink()
    (out / "images.txt").unlink()
    generate_images(tiny_factory, prompts, out, sampling, devices=("cpu", "cpu"))
    now = {p.name: p.stat().st_mtime_ns for p in (out / "samples").iterdir()}
    assert sorted(now) == sorted(kept)
    # batches (0, 1) and (4, 5) are resampled whole, on either process, but only their missing images are written
    assert {n for n in now if now[n] != kept.get(n)} == {"00001.png", "00004.png"}
    assert all(np.asarray(Image.open(out / "samples" / n)).shape == (16, 16, 3) for n in now)


def test_parse_devices():
    assert cli.parse_devices("cpu:3") == ("cpu",) * 3
    assert cli.parse_devices("cpu") == ("cpu",)
    assert cli.parse_devices(None, default="cpu") == ("cpu",)
    for bad in ("cpu:0", "cpu:x", "a,b", "0,0"):
        with pytest.raises(cli.UsageError):
            cli.parse_devices(bad)
    if not torch.cuda.is_available():
        with pytest.raises(cli.UsageError, match="CUDA is not available"):
            cli.parse_devices("0,1")


def test_rank_helpers(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert is_rank_zero() and external_shard() is None
    monkeypatch.setenv("LOCAL_RANK", "1")  # a rank Lightning's launcher started
    assert not is_rank_zero() and external_shard() is None
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun
    assert is_rank_zero() and external_shard() == (0, 4)
    monkeypatch.setenv("RANK", "3")
    assert not is_rank_zero() and external_shard() == (3, 4)
