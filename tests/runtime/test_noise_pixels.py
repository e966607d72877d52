"""Start noise (``Sampling.noise``) and the float-to-8-bit rule (``Sampling.pixels``) of runtime.generate.

* pixels: ``round`` is diffusers' ``numpy_to_pil`` (checked against diffusers itself when installed and against a
  hand computation), ``truncate`` the CompVis scripts'; a folder records ``pixels`` in its plan only when it rounds,
  so every existing plan.json stays byte-identical.
* noise: ``ours`` is the CPU generator draw every folder has used; ``original`` (the originals' CUDA fp16 draw) is
  refused on a device without CUDA, by the API and by benchmark.py / conceptprune.py (one line, exit 2, nothing
  written). On a CUDA machine the last test checks the draw against ``torch.manual_seed`` + diffusers.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CountingFactory
from PIL import Image

from runtime.generate import (
    Sampling,
    check_noise,
    generate_images,
    plan_dict,
    start_noise,
    to_uint8,
    validate_generation_args,
)

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a photo of a cat", "a red car", "a house"]
SAMPLING = Sampling(steps=2, batch_size=2, height=16, width=16, seed=3)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im).astype(np.int16)


# ---------------------------------------------------------------------------------------------------- pixels
def test_to_uint8_by_hand():
    x = np.array([0.0, 0.4 / 255, 0.6 / 255, 1.49 / 255, 1.51 / 255, 100.2 / 255, 100.7 / 255, 254.6 / 255, 1.0],
                 dtype=np.float32)
    assert to_uint8(x, "truncate").tolist() == [0, 0, 0, 1, 1, 100, 100, 254, 255]
    assert to_uint8(x, "round").tolist() == [0, 0, 1, 1, 2, 100, 101, 255, 255]
    assert to_uint8(x).tolist() == to_uint8(x, "truncate").tolist()  # the default is the CompVis rule
    with pytest.raises(ValueError, match="pixels must be one of"):
        to_uint8(x, "floor")


def test_round_is_diffusers_numpy_to_pil():
    image_processor = pytest.importorskip("diffusers.image_processor")
    rng = np.random.default_rng(0)
    x = rng.random((2, 8, 8, 3), dtype=np.float32)
    x[0, 0, 0] = [0.5 / 255, 1.5 / 255, 2.5 / 255]  # halves: numpy rounds them to even, as diffusers
    theirs = np.stack([np.asarray(im) for im in image_processor.VaeImageProcessor.numpy_to_pil(x)])
    assert np.array_equal(to_uint8(x, "round"), theirs)
    assert not np.array_equal(to_uint8(x, "truncate"), theirs)


def test_plan_records_pixels_and_noise_only_when_not_the_default():
    default = plan_dict(SAMPLING, PROMPTS)
    assert "pixels" not in default and default["noise"] == "per-image CPU generator seeded seed+index"
    assert plan_dict(Sampling(**{**SAMPLING.__dict__, "pixels": "truncate", "noise": "ours"}), PROMPTS) == default
    rounded = plan_dict(Sampling(**{**SAMPLING.__dict__, "pixels": "round"}), PROMPTS)
    assert rounded == {**default, "pixels": "round"}
    original = plan_dict(Sampling(**{**SAMPLING.__dict__, "noise": "original"}), PROMPTS, seeds=[5, 6, 7])
    assert original["noise"] == "per-image CUDA fp16 randn after manual_seed(seeds[index]) (original)"
    for bad in ({"pixels": "floor"}, {"noise": "cuda"}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be one of"):
            Sampling(**{**SAMPLING.__dict__, **bad}).validate()


def test_round_folder_is_the_truncated_one_plus_at_most_one_step(tmp_path):
    trunc = generate_images(CountingFactory(), PROMPTS, tmp_path / "t", SAMPLING)
    rnd = generate_images(CountingFactory(), PROMPTS, tmp_path / "r", Sampling(**{**SAMPLING.__dict__,
                                                                                     "pixels": "round"}))
    steps = np.concatenate([(_pixels(rnd / "samples" / f"{i:05d}.png") - _pixels(trunc / "samples" / f"{i:05d}.png"))
                            .ravel() for i in range(len(PROMPTS))])
    # the same floats: rounding adds one step where the fraction is >= 1/2 (about half the pixels), else nothing
    assert set(np.unique(steps).tolist()) == {0, 1}
    assert 0.3 < steps.mean() < 0.7
    assert json.loads((rnd / "plan.json").read_text())["pixels"] == "round"
    assert "pixels" not in json.loads((trunc / "plan.json").read_text())


# ---------------------------------------------------------------------------------------------------- noise
def test_ours_is_the_cpu_generator_draw_of_every_folder():
    shape = (4, 2, 2)
    want = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    assert torch.equal(start_noise(shape, 11, "cpu"), want)
    assert torch.equal(start_noise(shape, 11, "cpu", "ours"), want)
    with pytest.raises(ValueError, match="noise must be one of"):
        start_noise(shape, 11, "cpu", "global")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_original_noise_is_refused_without_cuda_before_any_model(tmp_path):
    s = Sampling(**{**SAMPLING.__dict__, "noise": "original"})
    with pytest.raises(ValueError) as e:
        validate_generation_args(PROMPTS, s, ("cpu",))
    msg = str(e.value)
    assert "\n" not in msg and "--noise original" in msg and "device cpu" in msg
    with pytest.raises(ValueError, match="--noise original"):
        start_noise((4, 2, 2), 0, "cpu", "original")
    check_noise("ours", ("cpu",))  # ours: any device
    factory = CountingFactory()
    with pytest.raises(ValueError, match="--noise original"):
        generate_images(factory, PROMPTS, tmp_path / "out", s)
    assert factory.calls == 0 and not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
@pytest.mark.parametrize("command", ["benchmark", "conceptprune"])
def test_commands_refuse_original_noise_without_cuda(tmp_path, command, capsys):
    toy = ROOT / "assets" / "toyworld"
    model = ["--config", str(toy / "ldm" / "ldm.yaml")]
    out = tmp_path / "out"
    if command == "benchmark":
        from evaluation.benchmark import main
        args = ["artist", "--base", str(toy / "ldm" / "toyworld-ldm.safetensors"), *model,
                "--clip_model", str(toy / "clip"), "--outdir", str(out), "--limit", "1", "--noise", "original"]
    else:
        from prune.jobs import main
        args = ["discover", "--concept", "Van Gogh", "--ckpt", str(toy / "ldm" / "toyworld-ldm.safetensors"), *model,
                "--outdir", str(out), "--noise", "original"]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --noise original draws the start noise on CUDA"), lines
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the original's draw needs CUDA")
def test_original_noise_is_the_originals_cuda_draw():
    shape = (4, 64, 64)
    for seed in (0, 2219):
        torch.manual_seed(seed)  # what ConceptPrune's scripts do before each one-image pipeline call
        want = torch.randn((1, *shape), device="cuda", dtype=torch.float16)[0]
        got = start_noise(shape, seed, "cuda", "original")
        assert got.dtype == torch.float32 and torch.equal(got, want.float())
    torch_utils = pytest.importorskip("diffusers.utils.torch_utils")
    torch.manual_seed(5)
    theirs = torch_utils.randn_tensor((1, *shape), generator=None, device=torch.device("cuda"), dtype=torch.float16)
    assert torch.equal(start_noise(shape, 5, "cuda", "original"), theirs[0].float())
