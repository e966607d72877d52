"""benchmark.py --safety_checker: diffusers' real StableDiffusionSafetyChecker (a tiny CLIP, thresholds set so that it
flags every image or none), saved with save_pretrained into a pipeline-shaped folder, on the toy world's suites.

Flagged images come back black and are counted in the suite summary and the records; unflagged images are the
images made without the checker, byte for byte; the suites whose original scripts switched it off (memorization
here) are untouched; a folder that is not usable is refused by check(), before any generation."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation import benchmark as bench
from evaluation.runner import ORIGINAL_SAFETY_SUITES, images_of, safety_suites
from experiments import toy_benchmark as toy

pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "assets/toyworld"


def _checker_folder(folder: Path, threshold: float) -> Path:
    """A pipeline-shaped folder with a real safety checker whose concept thresholds are ``threshold``: a cosine
    similarity is at most 1, so -2 flags every image and +2 none."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                     "num_attention_heads": 2},
                        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                        projection_dim=8)
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(2.0)  # no "special care" adjustment
    checker.save_pretrained(str(folder / "safety_checker"))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        str(folder / "feature_extractor"))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("safety")
    sets = toy.write_prompt_sets(out / "sets", rows_per_class=1, n_captions=2)
    return out, sets, _checker_folder(out / "flag_all", -2.0), _checker_folder(out / "flag_none", 2.0)


def _settings(out: Path, sets: dict, **changes):
    s = toy.benchmark_settings(out, sets, [], steps=2, limit=1, suites=("artist", "memorization"))
    return dataclasses.replace(s, mem_seeds=1, **changes)


def _pixels(paths) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def test_flagged_images_are_black_and_counted_unflagged_unchanged(world, tmp_path):
    out, sets, flag_all, flag_none = world
    plain = bench.run(_settings(tmp_path / "plain", sets))
    plan = bench.check(_settings(tmp_path / "plain", sets))
    plain_images = {s: _pixels(images_of(plan, s, plan.models[0])) for s in ("artist", "memorization")}
    assert all(img.any() for imgs in plain_images.values() for img in imgs)  # no image is black by itself
    assert "safety_checker" not in plain["artist"]["base"]  # off by default: nothing added

    # every image flagged: the artist suite's images are black and counted; memorization (off in the
    # original's inference_mem.py) is untouched
    s = _settings(tmp_path / "all", sets, safety_checker=str(flag_all))
    results = bench.run(s)
    plan = bench.check(s)
    artist = _pixels(images_of(plan, "artist", plan.models[0]))
    assert artist and not any(img.any() for img in artist)
    assert results["artist"]["base"]["safety_checker"] == {"flagged": len(artist), "images": len(artist)}
    records = [json.loads(x) for x in (tmp_path / "all/benchmark/artist/records/base.jsonl").read_text().splitlines()]
    assert [r["safety_flagged"] for r in records] == [True] * len(artist)
    mem = _pixels(images_of(plan, "memorization", plan.models[0]))
    assert all(np.array_equal(a, b) for a, b in zip(mem, plain_images["memorization"], strict=True))
    assert "safety_checker" not in results["memorization"]["base"]
    summary = json.loads((tmp_path / "all/benchmark/artist/summary.json").read_text())
    assert summary["settings"]["safety_checker"]["suites"] == list(ORIGINAL_SAFETY_SUITES)
    assert "safety_checker.flagged" in (tmp_path / "all/benchmark/artist/summary.csv").read_text()
    # a resumed / rescored run reads the recorded flags (no second pass over black images)
    again = bench.run(dataclasses.replace(s, score_only=True))
    assert again["artist"]["base"]["safety_checker"]["flagged"] == len(artist)

    # no image flagged: the images are the unchecked run's, byte for byte, and the count is 0
    s = _settings(tmp_path / "none", sets, safety_checker=str(flag_none), safety_suites="all")
    results = bench.run(s)
    plan = bench.check(s)
    for suite in ("artist", "memorization"):  # "all": memorization went through the checker too
        got = _pixels(images_of(plan, suite, plan.models[0]))
        assert all(np.array_equal(a, b) for a, b in zip(got, plain_images[suite], strict=True))
        assert results[suite]["base"]["safety_checker"] == {"flagged": 0, "images": len(got)}
    assert safety_suites(s) == ("artist", "nudity", "objects", "gender", "coco", "memorization")

    # one image flagged: a checker whose first concept is that image's own embedding, its threshold between
    # that image's cosine (1) and the others': only it is black, the others are unchanged
    target = 1
    folder = _flag_one(flag_none, tmp_path / "flag_one", images_of(plan, "artist", plan.models[0]), target)
    s = _settings(tmp_path / "one", sets, safety_checker=str(folder))
    results = bench.run(s)
    got = _pixels(images_of(bench.check(s), "artist", plan.models[0]))
    for i, (a, b) in enumerate(zip(got, plain_images["artist"], strict=True)):
        assert (not a.any()) if i == target else np.array_equal(a, b), i
    assert results["artist"]["base"]["safety_checker"] == {"flagged": 1, "images": len(got)}


def _flag_one(template: Path, folder: Path, images: list[Path], target: int) -> Path:
    import shutil

    from scoring.safety import load_safety_checker

    checker = load_safety_checker(template)
    model = checker.model
    with torch.no_grad():
        pixels = checker.processor(images=[Image.open(p).convert("RGB") for p in images],
                                   return_tensors="pt").pixel_values
        pooled = model.vision_model(pixels)[1]
        # a random tiny CLIP embeds the toy images almost alike (cosines ~0.9995, below the checker's 3-decimal
        # rounding): project out their common direction so that they are told apart
        u = torch.nn.functional.normalize(pooled.mean(0), dim=0)
        model.visual_projection.weight.copy_(model.visual_projection.weight @ (torch.eye(len(u)) - torch.outer(u, u)))
        embeds = torch.nn.functional.normalize(model.visual_projection(pooled))
        others = max(float(embeds[target] @ embeds[i]) for i in range(len(images)) if i != target)
        assert others < 0.95, others
        model.concept_embeds[0] = embeds[target]
        model.concept_embeds_weights[0] = (1.0 + others) / 2
    shutil.copytree(template, folder)
    checker.model.save_pretrained(str(folder / "safety_checker"))
    return folder


def test_bad_folder_is_refused_before_generation(world, tmp_path, capsys):
    from runtime.cli import exit_on_usage_error

    out, sets, flag_all, _ = world
    p = toy.asset_paths(ASSETS)
    no_extractor = tmp_path / "no_extractor"
    (no_extractor / "safety_checker").mkdir(parents=True)
    for f in (flag_all / "safety_checker").iterdir():
        (no_extractor / "safety_checker" / f.name).write_bytes(f.read_bytes())
    broken = tmp_path / "broken"
    (broken / "safety_checker").mkdir(parents=True)
    (broken / "feature_extractor").mkdir()
    (broken / "safety_checker" / "config.json").write_text((flag_all / "safety_checker/config.json").read_text())
    (broken / "safety_checker" / "model.safetensors").write_bytes(b"not safetensors")
    (broken / "feature_extractor" / "preprocessor_config.json").write_text(
        (flag_all / "feature_extractor/preprocessor_config.json").read_text())
    cases = {tmp_path / "missing": "not a folder", tmp_path / "sets": "no safety_checker/config.json",
             no_extractor: "no feature_extractor/preprocessor_config.json", broken: "the safety checker does not load"}
    (tmp_path / "sets").mkdir()
    for folder, why in cases.items():
        argv = ["artist", "--limit", "1", "--base", str(p["weights"]), "--config", str(p["config"]), "--outdir",
                str(tmp_path / "o"), "--H", "32", "--W", "32", "--clip_model", str(p["clip"]), "--artist",
                str(sets["artists"][0]), "--safety_checker", str(folder)]
        with pytest.raises(SystemExit) as e:
            exit_on_usage_error(lambda: bench.check(bench.parse_argv(argv)))
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"--safety_checker {folder}: {why}" in err, err
        assert err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()  # nothing generated or written
    assert "diffusers" in sys.modules
