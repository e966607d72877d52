"""benchmark.py (evaluation.benchmark) end to end on the toy world (real toy CLIP, judge, copy descriptor, NudeNet
3.0.8), the cache and resume rules, the outputs, and the early errors."""
import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evaluation import benchmark as bench
from experiments import toy_benchmark as toy

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "assets/toyworld"
FAST_STEPS = 10


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The toy prompt sets and a delta that zeroes every ff.net.2 weight (the strongest possible 'prune')."""
    out = tmp_path_factory.mktemp("bench")
    sets = toy.write_prompt_sets(out / "sets", rows_per_class=2, n_captions=4)
    sd = load_file(str(ASSETS / "ldm/toyworld-ldm.safetensors"))
    from runtime.delta import save_delta

    zero = {k: torch.zeros_like(v) for k, v in sd.items() if k.endswith("ff.net.2.weight")}
    assert zero
    save_delta(out / "zero_ffn.safetensors", zero)
    return out, sets


def _judge():
    return toy.JudgeClassifier(ASSETS / "judge/judge.safetensors")


def _settings(out, sets, suites=toy.SUITES, **changes):
    settings = toy.benchmark_settings(out, sets, [f"zero-ffn={out / 'zero_ffn.safetensors'}"], steps=10, limit=2,
                                      suites=suites)
    return dataclasses.replace(settings, **changes)


@pytest.fixture(scope="module")
def toy_run(world):
    """``python -m experiments.toy_benchmark`` with our zero-FFN delta instead of trained ones (no training in CI)."""
    out, sets = world
    report = toy.run(out, recipes=(), methods=(), steps=10, limit=2,
                     extra_deltas=[f"zero-ffn={out / 'zero_ffn.safetensors'}"])
    md = (out / "benchmark.md").read_text()
    assert md.startswith("| model | artist: stripes CLIP sim") and md.count("\n") == 4
    assert report["table"]["zero-ffn"]["objects: grumpy cat acc"] == report["summaries"]["objects"]["zero-ffn"][
        "accuracy_erase"]
    return out, out / "prompt_sets", report["summaries"]


def test_every_toy_suite_end_to_end(toy_run):
    out, sets, results = toy_run
    b = out / "benchmark"
    assert set(results) == set(toy.SUITES)
    for suite, by_model in results.items():
        assert list(by_model) == ["base", "zero-ffn"]
        for f in ("summary.json", "summary.csv", "summary.png"):
            assert (b / suite / f).is_file(), (suite, f)
        doc = json.loads((b / suite / "summary.json").read_text())
        assert doc["models"] == json.loads(json.dumps(by_model))
        rows = list(csv.DictReader((b / suite / "summary.csv").open()))
        assert [r["model"] for r in rows] == ["base", "zero-ffn"]
        for model in by_model:
            records = [json.loads(line)
                       for line in (b / suite / "records" / f"{model}.jsonl").read_text().splitlines()]
            assert len(records) == doc["n_rows"] and all({"id", "prompt", "seed", "image"} <= set(r) for r in records)
            assert all(Path(r["image"]).is_file() for r in records)
    md = (b / "results.md").read_text()
    table, made_by = md.split("\n\n")  # the table, then one line per suite saying how its numbers were made
    assert table.count("\n") == 3 and "| base |" in md and "| zero-ffn |" in md and "memorization: SSCD max" in md
    assert made_by.count("\n") == len(toy.SUITES) and "- artist: no preset: sampler=plms" in made_by
    # artist: 3 textures x 2 prompts, seed 0 each; "below base" is the share of pairs where the edited image is
    # less similar to its prompt than the base image of the same prompt and seed
    records = [json.loads(x) for x in (b / "artist/records/zero-ffn.jsonl").read_text().splitlines()]
    assert len(records) == 6 and {r["seed"] for r in records} == {0}
    per = results["artist"]["zero-ffn"]["per_artist"]
    for t in ("stripes", "polka dots", "checkerboard"):
        mine = [r for r in records if r["artist"] == t]
        assert per[t]["avg_score"] == pytest.approx(sum(r["clip_similarity"] < r["base_clip_similarity"]
                                                        for r in mine) / len(mine))
        assert per[t]["avg_similarity"] == pytest.approx(sum(r["clip_similarity"] for r in mine) / len(mine))
    assert results["artist"]["base"]["below_base"] is None
    # objects: 10 subjects x 2 rows, the judge as classifier; accuracy = share of records whose prediction is the class
    obj = [json.loads(x) for x in (b / "objects/records/base.jsonl").read_text().splitlines()]
    assert len(obj) == 20
    acc = results["objects"]["base"]
    assert acc["accuracy"] == pytest.approx(sum(r["correct"] for r in obj) / 20)
    grumpy = [r for r in obj if r["class"] == "grumpy cat"]
    assert acc["accuracy_erase"] == pytest.approx(sum(r["correct"] for r in grumpy) / len(grumpy))
    # memorization: the base copies the memorized picture (the copy descriptor sees it), the FID is vs the base
    assert results["memorization"]["base"]["share_above_0.5"] == 1.0
    assert results["coco"]["base"].get("fid_vs_base") is None and results["coco"]["zero-ffn"]["fid_vs_base"] > 0


def test_same_rows_and_seeds_for_every_model_and_resume(toy_run, capsys):
    out, _, results = toy_run
    sets = toy.write_prompt_sets(out / "prompt_sets")  # the same files again (deterministic)
    images = out / "benchmark" / "images" / "objects"
    plans = {m: json.loads(next((images / m).glob("*/plan.json")).read_text()) for m in ("base", "zero-ffn")}
    assert plans["base"]["prompts"] == plans["zero-ffn"]["prompts"]
    assert plans["base"]["seeds"] == plans["zero-ffn"]["seeds"]
    with Path(sets["objects"]).open() as f:  # --rows_per_class 2: the first two rows of each class, their seeds
        table = list(csv.DictReader(f))
    taken: dict = {}
    expected = [int(r["evaluation_seed"]) for r in table
                if taken.setdefault(r["class"], []).append(r) or len(taken[r["class"]]) <= 2]
    assert plans["base"]["seeds"] == expected and len(expected) == 20
    # a rerun makes nothing and scores the same
    capsys.readouterr()
    again = bench.run(_settings(out, sets, suites=("artist",)), classifier=_judge())
    assert "generating" not in capsys.readouterr().out
    assert again["artist"] == results["artist"]
    # an interrupted run: a deleted image is remade, bit for bit, and nothing else
    img = next((out / "benchmark/images/artist/zero-ffn").glob("*/samples/00001.png"))
    before = img.read_bytes()
    img.unlink()
    bench.run(_settings(out, sets, suites=("artist",)), classifier=_judge())
    assert "generating 1 of 6" in capsys.readouterr().out and img.read_bytes() == before
    # other settings: a new cache folder, the old one stays
    n = len(list((out / "benchmark/images/artist/base").iterdir()))
    bench.run(_settings(out, sets, suites=("artist",), steps=5), classifier=_judge())
    assert len(list((out / "benchmark/images/artist/base").iterdir())) == n + 1


def test_nudity_and_gender_suites_on_the_toy_model(world, tmp_path):
    out, sets = world
    i2p = tmp_path / "i2p.csv"
    with i2p.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "categories", "hard", "evaluation_seed", "evaluation_guidance", "sd_image_width",
                    "sd_image_height"])
        w.writerow(["a red circle on the grass", "sexual", "1", "7", "9", "32", "32"])
        w.writerow(["a painting of a blue cat\nunder a blue sky", "sexual, violence", "0", "8", "7", "32", "32"])
        w.writerow(["a green star", "violence", "0", "9", "7", "32", "32"])
    p = toy.asset_paths(ASSETS)
    settings = bench.BenchmarkSettings(
        suites=("nudity", "gender"), base=str(p["weights"]), config=str(p["config"]), outdir=str(tmp_path / "b"),
        H=32, W=32, precision="full", clip_model=str(p["clip"]), steps=FAST_STEPS, prompts=str(i2p),
        categories=("sexual",), professions=("doctor", "nurse"), gender_seeds=2,
        delta=(f"zero-ffn={out / 'zero_ffn.safetensors'}",), score_device="cpu")
    res = bench.run(settings)
    nud = res["nudity"]["zero-ffn"]
    assert nud["n_images"] == 2 and nud["images_with_nudity"] == 0 and nud["flagged_prompts"] == []
    rec = [json.loads(x) for x in (tmp_path / "b/nudity/records/base.jsonl").read_text().splitlines()]
    assert rec[1]["prompt"] == "a painting of a blue cat under a blue sky" and rec[1]["seed"] == 0
    assert all(set(r["exposed"]) and not any(r["exposed"].values()) for r in rec)
    gen = res["gender"]
    assert gen["base"]["n_images"] == 4 and "m_to_f" in gen["zero-ffn"] and "m_to_f" not in gen["base"]
    g = [json.loads(x) for x in (tmp_path / "b/gender/records/zero-ffn.jsonl").read_text().splitlines()]
    assert {r["prompt"] for r in g} == {"a headshot of a doctor", "a headshot of a nurse"}
    base_men = [r for r in g if r["base_gender"] == "man"]
    if base_men:
        assert gen["zero-ffn"]["m_to_f"] == pytest.approx(sum(r["gender"] == "woman" for r in base_men)
                                                          / len(base_men))
    # --row_settings: each row's own seed and guidance (two folders: guidance 9 and 7)
    bench.run(dataclasses.replace(settings, suites=("nudity",), row_settings=True))
    folders = sorted(d.name.split("-")[0] for d in (tmp_path / "b/images/nudity/base").iterdir())
    assert folders == ["cfg7", "cfg7.5", "cfg9"]


def _fails(argv, capsys, match, classifier=None):
    from runtime.cli import exit_on_usage_error

    with pytest.raises(SystemExit) as e:
        exit_on_usage_error(lambda: bench.check(bench.parse_argv(argv), classifier=classifier))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert match in err, err
    return err


def test_early_errors(world, tmp_path, capsys, monkeypatch):
    out, sets = world
    p = toy.asset_paths(ASSETS)
    base = ["--base", str(p["weights"]), "--config", str(p["config"]), "--outdir", str(tmp_path / "o"),
            "--H", "32", "--W", "32", "--clip_model", str(p["clip"])]
    _fails(["painting", *base], capsys, "invalid choice")
    bad = tmp_path / "bad.csv"
    bad.write_text("text,seed\na cat,1\n")
    _fails(["nudity", "--prompts", str(bad), *base], capsys, "prompt")
    _fails(["nudity", *base], capsys, "--prompts")
    junk = tmp_path / "junk.pt"
    torch.save({"conv.weight": torch.zeros(3, 3)}, junk)
    err = _fails(["artist", "--limit", "1", "--unet", f"esd={junk}", *base], capsys, "junk.pt")
    assert "conv.weight" in err
    _fails(["objects", "--target_class", "zebra", "--object_prompts", str(sets["objects"]), *base], capsys, "zebra",
           classifier=_judge())
    _fails(["coco", *base], capsys, "--captions")
    # scorers that cannot be loaded offline fail in the checks, saying what to get
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("TORCH_HUB_OFFLINE", "1")
    _fails(["objects", "--rows_per_class", "1", *base], capsys, "resnet50-11ad3fa6.pth")
    import sys
    monkeypatch.setitem(sys.modules, "nudenet", None)
    i2p = tmp_path / "i2p.csv"
    i2p.write_text("prompt,categories\na red circle,sexual\n")
    _fails(["nudity", "--prompts", str(i2p), *base], capsys, "requirements-nudity.txt")
    assert not (tmp_path / "o").exists()  # nothing was written


def test_one_model_load_per_process_and_picklable_for_workers():
    import pickle

    from evaluation.runner import OnceFactory

    calls = []

    def build(device):
        calls.append(device)
        return torch.nn.Linear(2, 2)

    f = OnceFactory(build)
    assert f("cpu") is f("cpu") and calls == ["cpu"]  # every suite of a run reuses the model
    f.clear()
    f("cpu")
    assert calls == ["cpu", "cpu"]
    g = OnceFactory(len)  # a picklable factory: the spawned workers get it without the loaded models
    g.models["cpu"] = torch.nn.Linear(2, 2)
    assert pickle.loads(pickle.dumps(g)).models == {}


def test_command_line_defaults_are_the_settings_defaults():
    assert bench.parse_argv(["artist"]) == bench.BenchmarkSettings(suites=("artist",))
    s = bench.parse_argv(["nudity", "coco", "--categories", "sexual, violence", "--professions", "a,b", "--delta",
                          "x=y", "--delta", "z", "--artist", "Monet"])
    assert s.suites == ("nudity", "coco") and s.categories == ("sexual", "violence") and s.professions == ("a", "b")
    assert s.delta == ("x=y", "z") and s.artist == ("Monet",)
