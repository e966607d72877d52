"""runtime.generate: layout, determinism, batch-split invariance, resume, plan checks, multi-process."""
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import CountingFactory, tiny_factory
from PIL import Image

from runtime.files import image_is_complete
from runtime.generate import GenerationPlanError, Sampling, generate_images, plan_dict, validate_generation_args

PROMPTS = ["a photo of a cat", "a dog on a beach", "a photo of a cat", "a red car", "a house"]
SAMPLING = Sampling(steps=2, batch_size=2, height=16, width=16, seed=7)


def failing_factory(device):
    raise RuntimeError(f"boom from the factory on {device}")


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "samples").glob("*.png"))}


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "run"
    factory = CountingFactory()
    assert generate_images(factory, PROMPTS, out, SAMPLING) == out
    assert factory.calls == 1
    return out


def test_layout_and_text_files(first_run):
    out = first_run
    names = [f"samples/{i:05d}.png" for i in range(len(PROMPTS))]
    assert (out / "images.txt").read_text().splitlines() == names
    assert (out / "caption.txt").read_text().splitlines() == PROMPTS
    assert sorted(p.name for p in (out / "samples").iterdir()) == [n.split("/")[1] for n in names]  # no temp files
    for n in names:
        with Image.open(out / n) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (16, 16)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["prompts"] == PROMPTS and plan["steps"] == 2 and plan["seed"] == 7
    # the images are not all the same (different prompts and per-image noise)
    assert len(set(_bytes(out).values())) == len(PROMPTS)


def test_plan_json_keeps_the_bytes_of_version_1_folders(first_run):
    # folders made before Sampling existed are still this plan, byte for byte (keys, their order, floats)
    assert (first_run / "plan.json").read_text() == """{
 "version": 1,
 "noise": "per-image CPU generator seeded seed+index",
 "steps": 2,
 "eta": 1.0,
 "scale": 6.0,
 "height": 16,
 "width": 16,
 "seed": 7,
 "n_images": 5,
 "prompts": [
  "a photo of a cat",
  "a dog on a beach",
  "a photo of a cat",
  "a red car",
  "a house"
 ]
}
"""
    # settings that are not the default come after the prompts; batch_size and precision are not in the plan
    plan = plan_dict(Sampling(sampler="dpmpp_2m", steps=4, eta=1, scale=7, fixed_code=True, batch_size=3,
                              precision="full"), ["a cat"], seeds=[3])
    assert list(plan) == ["version", "noise", "steps", "eta", "scale", "height", "width", "seed", "n_images",
                          "prompts", "sampler", "fixed_code", "seeds"]
    assert (plan["noise"], plan["eta"], json.dumps(plan["scale"]), plan["seeds"]) == \
        ("per-image CPU generator seeded seeds[index]", None, "7.0", [3])


def test_deterministic_and_independent_of_batch_split(first_run, tmp_path):
    ref = _bytes(first_run)
    generate_images(tiny_factory, PROMPTS, tmp_path / "same", SAMPLING)
    assert _bytes(tmp_path / "same") == ref  # same settings: bit-identical files

    # noise is per image: another batch split gives the same images (up to BLAS rounding)
    generate_images(tiny_factory, PROMPTS, tmp_path / "split", replace(SAMPLING, batch_size=3))
    for name in ref:
        diff = np.abs(_pixels(tmp_path / "split" / "samples" / name) - _pixels(first_run / "samples" / name))
        assert diff.max() <= 1, name

    generate_images(tiny_factory, PROMPTS, tmp_path / "seed", replace(SAMPLING, seed=8))
    assert all(_bytes(tmp_path / "seed")[n] != ref[n] for n in ref)


def test_resume_regenerates_only_missing_or_damaged(first_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(first_run, out)
    ref = _bytes(first_run)
    samples = out / "samples"
    (samples / "00001.png").unlink()
    data = (samples / "00003.png").read_bytes()
    (samples / "00003.png").write_bytes(data[: len(data) // 2])  # truncated, as if killed mid-write
    assert not image_is_complete(samples / "00003.png")
    untouched = {n: os.stat(samples / n).st_mtime_ns for n in ("00000.png", "00002.png", "00004.png")}
    (samples / ".00004.png.999.tmp").write_bytes(b"partial")  # leftover of a killed run

    factory = CountingFactory()
    generate_images(factory, PROMPTS, out, SAMPLING)
    assert factory.calls == 1
    assert _bytes(out) == ref  # bit-for-bit the uninterrupted result
    assert {n: os.stat(samples / n).st_mtime_ns for n in untouched} == untouched  # only the two were rewritten
    assert not list(samples.glob(".*"))
    assert (out / "images.txt").read_text() == (first_run / "images.txt").read_text()


def test_noop_rerun(first_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(first_run, out)
    factory = CountingFactory()
    generate_images(factory, PROMPTS, out, replace(SAMPLING, batch_size=5))
    assert factory.calls == 0
    assert "nothing to do" in capsys.readouterr().out
    assert _bytes(out) == _bytes(first_run)


def test_mismatched_plan_raises(first_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(first_run, out)
    factory = CountingFactory()
    with pytest.raises(GenerationPlanError, match="prompts"):
        generate_images(factory, PROMPTS[:-1] + ["a boat"], out, SAMPLING)
    with pytest.raises(GenerationPlanError, match="steps"):
        generate_images(factory, PROMPTS, out, replace(SAMPLING, steps=4))
    # a folder without plan.json (e.g. made by the reference code) is judged by caption.txt
    (out / "plan.json").unlink()
    with pytest.raises(GenerationPlanError, match="caption.txt"):
        generate_images(factory, PROMPTS[:3], out, SAMPLING)
    # images of unknown origin are not mixed in
    (out / "caption.txt").unlink()
    with pytest.raises(GenerationPlanError, match="unknown"):
        generate_images(factory, PROMPTS, out, SAMPLING)
    assert factory.calls == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[]), "empty"),
    (dict(prompts="a cat"), "list"),
    (dict(batch_size=0), "batch_size"),
    (dict(height=20), "multiple of 8"),
    (dict(width=0), "multiple of 8"),
    (dict(steps=3), "DDIM grid"),  # range(0, 1000, 333) + 1 reaches t=1000
    (dict(precision="half"), "precision"),
    (dict(devices=()), "devices"),
])
def test_validation(kwargs, match, tmp_path):
    args = {"prompts": ["a cat"], **kwargs}
    prompts, devices = args.pop("prompts"), args.pop("devices", ("cpu",))
    sampling = Sampling(**args)
    with pytest.raises((ValueError, TypeError), match=match):
        validate_generation_args(prompts, sampling, devices)
    with pytest.raises((ValueError, TypeError), match=match):
        generate_images(failing_factory, prompts, tmp_path / "x", sampling, devices=devices)
    assert not (tmp_path / "x").exists()


def test_multi_process_matches_single(first_run, tmp_path):
    out = tmp_path / "mp"
    generate_images(tiny_factory, PROMPTS, out, SAMPLING, devices=("cpu", "cpu"))
    ref = _bytes(first_run)
    assert sorted(_bytes(out)) == sorted(ref)
    for name in ref:  # same batches, other process (thread count): equal up to BLAS rounding
        assert np.abs(_pixels(out / "samples" / name) - _pixels(first_run / "samples" / name)).max() <= 1
    assert (out / "images.txt").read_text() == (first_run / "images.txt").read_text()
    assert (out / "caption.txt").read_text() == (first_run / "caption.txt").read_text()


def test_worker_error_propagates(tmp_path):
    with pytest.raises(Exception, match="boom from the factory") as info:
        generate_images(failing_factory, PROMPTS, tmp_path / "err", SAMPLING, devices=("cpu", "cpu"))
    assert "Traceback" in str(info.value) and "failing_factory" in str(info.value)
    assert not (tmp_path / "err" / "images.txt").exists()


def test_unpicklable_factory_with_several_devices(tmp_path):
    with pytest.raises(TypeError, match="picklable"):
        generate_images(lambda device: tiny_factory(device), PROMPTS, tmp_path / "x", SAMPLING, devices=("cpu", "cpu"))
    assert not (tmp_path / "x").exists()


def test_per_image_seeds(first_run, tmp_path):
    # image i of the default plan is seeded seed + i: the same seeds given explicitly give the same bytes
    seeds = [SAMPLING.seed + i for i in range(len(PROMPTS))]
    generate_images(tiny_factory, PROMPTS, tmp_path / "explicit", SAMPLING, seeds=seeds)
    assert _bytes(tmp_path / "explicit") == _bytes(first_run)
    plan = json.loads((tmp_path / "explicit" / "plan.json").read_text())
    assert plan["seeds"] == seeds
    # one seed for every image of one prompt: identical images; the seed list is part of the plan
    generate_images(tiny_factory, [PROMPTS[0]] * 2, tmp_path / "same", SAMPLING, seeds=[3, 3])
    assert len(set(_bytes(tmp_path / "same").values())) == 1
    with pytest.raises(GenerationPlanError, match="seeds"):
        generate_images(tiny_factory, [PROMPTS[0]] * 2, tmp_path / "same", SAMPLING, seeds=[3, 4])
    with pytest.raises(ValueError, match="one integer"):
        generate_images(tiny_factory, PROMPTS, tmp_path / "bad", SAMPLING, seeds=[1])
