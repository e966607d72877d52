"""sample.py (runtime.sample) on the tiny model: layouts, determinism, run-config discovery, deltas, errors."""
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG as TINY
from conftest import tiny_model
from omegaconf import OmegaConf

from ldm.checkpoint import CheckpointError
from runtime.delta import save_delta
from runtime.sample import SampleSettings, check, run


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_ckpt):
    d = tmp_path_factory.mktemp("sample")
    shutil.copy(tiny_ckpt, d / "base.ckpt")
    k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"
    save_delta(d / "delta.safetensors", {k: tiny_model().state_dict()[k] * 3})
    return d


def fast(base, **kw) -> SampleSettings:
    return SampleSettings(**{"ckpt": str(base / "base.ckpt"), "config": str(TINY), "H": 16, "W": 16,
                             "ddim_steps": 2, "n_samples": 2, **kw})


def pngs(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted((folder / "samples").glob("*.png"))}


def test_prompt_layout_numbering_metadata_and_determinism(base, tmp_path):
    out = tmp_path / "a"
    run(fast(base, prompt="a cat", outdir=str(out), metadata=True))
    first = pngs(out)
    assert list(first) == ["00000.png", "00001.png"]
    assert list(out.glob("*.jpg"))  # grid
    run(fast(base, prompt="a dog", outdir=str(out), metadata=True, skip_grid=True))
    assert list(pngs(out)) == [f"{i:05}.png" for i in range(4)]
    assert (out / "images.txt").read_text().split() == [f"samples/{i:05}.png" for i in range(4)]
    assert (out / "caption.txt").read_text().splitlines() == ["a cat"] * 2 + ["a dog"] * 2
    assert not list(out.glob(".staging-*"))
    run(fast(base, prompt="a cat", outdir=str(tmp_path / "b")))
    assert pngs(tmp_path / "b") == first  # same seed, same images


def test_from_file_copies_iter_and_plms(base, tmp_path):
    (tmp_path / "p.txt").write_text("a red cube\na blue ball\n")
    out = tmp_path / "f"
    run(fast(base, from_file=str(tmp_path / "p.txt"), n_copies=2, n_iter=2, outdir=str(out), metadata=True,
             plms=True))
    assert (out / "caption.txt").read_text().splitlines() == ["a red cube"] * 2 + ["a blue ball"] * 2 + \
        ["a red cube"] * 2 + ["a blue ball"] * 2
    assert len(pngs(out)) == 8
    assert any("plms" in p.name for p in out.glob("*.jpg"))


def test_delta_changes_images_and_run_dir_is_found(base, tmp_path):
    run_dir = tmp_path / "logs" / "2026_run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "configs").mkdir()
    OmegaConf.save(OmegaConf.load(TINY), run_dir / "configs" / "2026-project.yaml")
    delta = run_dir / "checkpoints" / "delta_step_2.safetensors"
    delta.write_bytes((base / "delta.safetensors").read_bytes())
    args = dict(ckpt=str(base / "base.ckpt"), H=16, W=16, ddim_steps=2, n_samples=2, prompt="a cat", skip_grid=True)
    run(SampleSettings(**args, delta_ckpt=str(delta)))  # config and outdir from the run
    with_delta = pngs(run_dir)
    assert len(with_delta) == 2
    run(SampleSettings(**args, config=str(TINY), outdir=str(tmp_path / "plain")))
    assert pngs(tmp_path / "plain") != with_delta


def test_errors(base, tmp_path):
    with pytest.raises(FileNotFoundError, match="--ckpt"):
        check(SampleSettings(ckpt=str(tmp_path / "none.ckpt"), config=str(TINY)))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        check(fast(base, from_file=str(tmp_path / "empty.txt")))
    save_delta(tmp_path / "bad.ckpt", {"model.diffusion_model.out.2.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="does not fit"):
        run(fast(base, delta_ckpt=str(tmp_path / "bad.ckpt"), outdir=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="CUDA"):
        check(fast(base, gpus="0"))


def test_command_line_defaults_are_the_settings_defaults_and_errors_exit_2(tmp_path, capsys):
    from runtime.sample import build_parser, main

    assert SampleSettings(**vars(build_parser().parse_args([]))) == SampleSettings()
    with pytest.raises(SystemExit) as e:
        main(["--ckpt", str(tmp_path / "none.ckpt"), "--config", str(TINY)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --ckpt not found") and len(err.splitlines()) == 1
