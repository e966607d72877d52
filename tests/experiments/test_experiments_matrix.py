"""experiments.matrix: every concept as the target. One short Concept Ablation run on a target the recipes were never
tuned for (checkerboard, with the style recipe), every concept measured by the judge on paired base / edited
images; and the derived prompt files, which for the tuned targets must be the shipped ones."""
import json
from pathlib import Path

import pytest

from experiments import matrix
from toyworld import mission

pytestmark = pytest.mark.slow  # trains and judges a short matrix run

ASSETS = Path(__file__).resolve().parents[2] / "assets/toyworld"
CONCEPTS = ["stripes", "polka dots", "checkerboard", "painting", "grumpy cat", "sleepy cat", "happy cat", "cat"]


@pytest.fixture(scope="module")
def checkerboard_run(tmp_path_factory):
    """The style recipe on checkerboard, shortened: 36 anchor images from DPM++ 2M 20 steps (a tenth of the anchor
    UNet calls; docs/experiments/anchor-study.md), the recipe's 100 training steps, 6 evaluation images per concept."""
    out = tmp_path_factory.mktemp("matrix")
    report = matrix.run(["ablation"], ["checkerboard"], out, ASSETS, quick=True, numgen=6, train_size=36,
                        train_extra=["generation.sampler=dpmpp_2m", "generation.steps=20"])
    return out, report


def test_untuned_target_falls_and_every_concept_is_measured(checkerboard_run):
    out, report = checkerboard_run
    assert report["concepts"] == CONCEPTS
    (cell,) = report["cells"]
    assert (cell["method"], cell["target"], cell["recipe"]) == ("ablation", "checkerboard", "style")
    assert set(cell["scores"]) == set(CONCEPTS) == set(report["base"])
    for c, s in cell["scores"].items():  # the base half of every pair is the base row (one set of base images)
        assert s["judge"][0] == report["base"][c]["judge"] and 0 <= s["judge"][1] <= 1, c
        assert ("clip_accuracy" in s) == (c not in ("painting", "cat")), c
    (jb, ja) = cell["scores"]["checkerboard"]["judge"]
    assert jb >= 0.5 and ja <= jb - 0.5, cell["scores"]["checkerboard"]
    assert jb - ja > matrix.others_loss(cell) + 0.3, cell["scores"]  # the target pays most
    assert cell["scores"]["checkerboard"]["clip_accuracy"][1] <= 0.5, cell["scores"]["checkerboard"]
    # the paired images: the base and the edited folder hold the same prompts
    run_dir = Path(cell["run"])
    for c in CONCEPTS:
        base_captions = (out / "baseline" / matrix.slug(c) / "caption.txt").read_text()
        assert base_captions == (run_dir / "matrix_eval" / matrix.slug(c) / "caption.txt").read_text(), c
        assert len(base_captions.splitlines()) == 6
    table = (out / "matrix.md").read_text()
    assert all(f"| {c} " in table.splitlines()[2] for c in CONCEPTS), table
    assert "| ablation | checkerboard |" in table and "| base model |" in table
    assert json.loads((out / "matrix.json").read_text())["cells"][0]["target"] == "checkerboard"
    assert (out / "grid.png").is_file() and cell["seconds"]["edit"] > 0


def test_rerun_skips_done_runs_and_refuses_other_settings(checkerboard_run):
    out, report = checkerboard_run
    again = matrix.run(["ablation"], ["checkerboard"], out, ASSETS, quick=True, numgen=6, train_size=36,
                       train_extra=["generation.sampler=dpmpp_2m", "generation.steps=20"])
    assert again["cells"] == json.loads(json.dumps(report["cells"]))
    with pytest.raises(ValueError, match="other settings"):
        matrix.run(["ablation"], ["checkerboard"], out, ASSETS, quick=True, numgen=4)


def test_a_texture_the_judge_has_no_class_for_needs_a_reader(checkerboard_run, monkeypatch):
    """Extra textures (render.FFN_TEXTURES) are read by their own style reader; the judge's other heads stay."""
    out, _ = checkerboard_run
    with pytest.raises(ValueError, match="no class for ripples"):
        matrix.style_reader(ASSETS, ("ripples",))
    assert matrix.style_reader(ASSETS, ()) is None
    folder = out / "baseline" / "checkerboard"
    monkeypatch.setattr(matrix, "style_reader", lambda assets, extra: lambda images: ["waves"] * len(images))
    assert matrix.judge_share(folder, "waves", ASSETS, ("waves",)) == 1.0
    assert matrix.judge_share(folder, "checkerboard", ASSETS, ("waves",)) == 0.0
    assert matrix.judge_share(out / "baseline" / "cat", "cat", ASSETS, ("waves",)) == 0.0  # cats are "painting"


def test_derived_prompt_files_are_the_shipped_ones_for_the_tuned_targets(tmp_path):
    """The rules that write the prompt files of a new target reproduce every shipped file of the tuned ones."""
    shipped = lambda rel: (ASSETS / rel).read_text().splitlines()  # noqa: E731
    for texture in ("stripes", "polka dots", "checkerboard"):
        assert matrix.texture_eval_lines(texture, ASSETS) == shipped(f"eval_prompts/{matrix.slug(texture)}_eval.txt")
    assert matrix.eval_lines("sleepy cat", ASSETS)[0] == shipped("eval_prompts/cat_eval.txt")[0].replace(
        "cat", "sleepy cat")
    for target, stem in (("stripes", "stripes"), ("grumpy cat", "grumpy_cat")):
        base, tgt = matrix.prune_pairs(target, ASSETS)
        assert base == shipped(f"prune_prompts/{stem}_base.txt") and tgt == shipped(f"prune_prompts/{stem}_target.txt")
    for target, rel in (("stripes", "preserve_prompts/style.txt"), ("grumpy cat", "preserve_prompts/instance.txt")):
        assert matrix.preserve_exclude(target) == mission.PRESERVE_SOURCES[rel][0]
        spec = matrix.recipe("ablation-preserve", target, tmp_path, ASSETS)
        assert Path(spec["preserve"]).read_text().splitlines() == shipped(rel), target
    # a tuned target's derived recipe is the mission's recipe itself
    for method, name, target in (("ablation", "style", "stripes"), ("ablation", "instance", "grumpy cat")):
        spec = matrix.recipe(method, target, tmp_path, ASSETS)
        assert {k: v for k, v in spec.items() if k != "mission_recipe"} == mission.RECIPES[name]


def test_recipes_of_new_targets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --out: the files train.py and conceptprune.py get are absolute paths
    spec = matrix.recipe("ablation-preserve", "happy cat", Path("out/prompts"), ASSETS)
    settings = mission.train_settings("x", spec, ASSETS, Path("out"), 36)
    assert Path(settings.preserve_prompts).is_file()
    assert spec["caption_target"] == "cat+happy cat" and spec["overrides"] == mission.PRESERVE_OVERRIDES
    kept = Path(spec["preserve"]).read_text().splitlines()
    assert not any("happy" in p.lower() for p in kept) and any("grumpy cat" in p for p in kept)
    anchors = (ASSETS / "prompts/cat.txt").read_text().splitlines()  # the instance file's anchor prompts follow
    assert kept[200] == anchors[0] and set(kept[200:]) <= set(anchors)
    prune = matrix.recipe("conceptprune", "polka dots", tmp_path, ASSETS)
    target = Path(prune["target_file"]).read_text().splitlines()
    assert prune["concept"] == "polka dots" and target[0] == "a red circle in the style of polka dots"
    # a texture outside the shipped world joins by name: style recipe, derived evaluation prompts, one more column
    assert matrix.world_concepts(("waves",)) == CONCEPTS[:3] + ["waves"] + CONCEPTS[3:]
    assert matrix.recipe("ablation", "waves", tmp_path, ASSETS, ("waves",))["caption_target"] == "waves"
    assert matrix.eval_lines("waves", ASSETS)[0] == "a painting of a red circle, in the style of waves"
    assert matrix.extra_textures_default(None) == ()
    assert matrix.extra_textures_default(tmp_path / "base_waves.safetensors") == ("waves",)  # another base learned it


def test_unknown_targets_and_methods_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="no recipe for target 'dog'"):
        matrix.run(["ablation"], ["dog"], tmp_path / "ffn", ASSETS, ffn_base="units")  # nor builds base + waves
    assert not (tmp_path / "ffn").exists()
    with pytest.raises(ValueError, match="two base models"):
        matrix.run(["ablation"], ["waves"], tmp_path / "ffn", ASSETS, ckpt=tmp_path / "x.ckpt", ffn_base="units")
    with pytest.raises(ValueError, match="no recipe for target 'dog'"):
        matrix.run(["ablation"], ["dog"], tmp_path / "out", ASSETS)
    with pytest.raises(ValueError, match="no method"):
        matrix.run(["erase"], ["stripes"], tmp_path / "out", ASSETS)
    with pytest.raises(ValueError, match="no recipe for target 'waves'"):
        matrix.run(["ablation"], ["waves"], tmp_path / "out", ASSETS, extra_textures=())
    assert not (tmp_path / "out").exists()
