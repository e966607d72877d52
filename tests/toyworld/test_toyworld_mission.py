"""End to end on the shipped toy-world model (assets/toyworld/): short style ablations with train.py (the paper's
recipe and the one with --preserve_prompts), scored by evaluate.py with the toy CLIP and by the judge; the
method's effect is asserted, not just the plumbing."""
import json
from pathlib import Path

import pytest
import torch

from toyworld import mission

pytestmark = pytest.mark.slow  # trains and evaluates the toy world's recipes: minutes

ASSETS = Path(__file__).resolve().parents[2] / "assets/toyworld"


@pytest.fixture(scope="module")
def style_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mission")
    report = mission.run(["style", "style-preserve"], out, ASSETS, quick=True)
    return out, report


def test_style_ablation_removes_the_style_and_keeps_the_others(style_run):
    out, report = style_run
    s = report["summaries"][0]
    base, ablated = s["target_accuracy"]
    assert base >= 0.8 and ablated <= 0.4, s
    # the other textures lose far less than the target (10 images each in the quick run: steps of 0.1)
    drops = [b - a for b, a in s["hard_negative_accuracy"].values()]
    assert sum(drops) / len(drops) <= 0.25 and (base - ablated) >= 2 * max(sum(drops) / len(drops), 0.1), s
    # the judge (trained on ground-truth renders) agrees: stripes were there and are mostly gone, the anchor's
    # images still show what their prompts ask; the metric's floor (plain paintings read as stripes) is low
    (jb, ja), (pb, pa) = s["judge"]["stripes"], s["judge"]["painting"]
    assert jb >= 0.8 and ja <= 0.5 and pa >= pb - 0.2, s["judge"]
    assert 0 <= s["anchor_level"] <= 0.4, s
    assert (out / "grid.png").is_file() and "stripes" in (out / "mission.md").read_text()
    assert json.loads((out / "mission.json").read_text())["summaries"][0]["recipe"] == "style"


def test_preserving_the_world_keeps_the_other_textures(style_run):
    """style-preserve (--preserve_prompts): the target still goes, and the other textures fare at least as well
    as with the paper's recipe, by CLIP and by the judge (10 images each in the quick run)."""
    _, report = style_run
    plain, keep = report["summaries"]
    assert keep["recipe"] == "style-preserve"
    assert keep["target_accuracy"][1] <= 0.5 and keep["judge"]["stripes"][1] <= 0.3, keep
    drops = [b - a for b, a in keep["hard_negative_accuracy"].values()]
    assert max(drops) <= 0.15, keep

    def judged(s):
        return sum(s["judge"][h][1] for h in s["hard_negative_accuracy"])

    assert judged(keep) >= judged(plain), (plain["judge"], keep["judge"])


@torch.no_grad()
def test_target_prediction_collapses_onto_the_anchor(style_run):
    """Issue 3's effect measure, on a trained model: after the run, eps(x_t, target prompt) is much closer to
    eps(x_t, anchor prompt) (both from the ablated model, what the model-based loss asks) than before, while a
    hard negative's prompt keeps most of its distance. x_t: the run's anchor images, encoded and noised (the
    inputs the loss sees; on pure Gaussian inputs the regularized recipe's gap barely moves)."""
    import numpy as np
    from omegaconf import OmegaConf
    from PIL import Image

    from runtime.loading import load_model
    from toyworld.ldm import to_model_range

    out, _ = style_run
    run_dir = next(d for d in (out / "logs").iterdir() if d.name.endswith("_toy_style"))
    delta = sorted((run_dir / "checkpoints").glob("delta_step_*"))[-1]
    config = OmegaConf.to_container(OmegaConf.load(ASSETS / "ldm/ldm.yaml").model, resolve=True)
    weights = ASSETS / "ldm/toyworld-ldm.safetensors"
    base, ablated = load_model(config, weights), load_model(config, weights, delta)
    anchor = ["a painting of a red star on the grass", "a drawing of a blue heart", "a painting of a green cross"] * 2
    target = [p + ", in the style of stripes" for p in anchor]
    negative = [p + ", in the style of polka dots" for p in anchor]
    files = sorted((out / "data/painting_gen/samples").glob("*.png"))[::12][:6]
    x0 = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
    z = base.get_first_stage_encoding(base.encode_first_stage(to_model_range(x0)))
    t = torch.tensor([200, 400, 600, 800, 300, 500])
    x = base.q_sample(z, t, noise=torch.randn(z.shape, generator=torch.Generator().manual_seed(0)))

    def gap(model, prompts):
        eps = lambda p: model.apply_model(x, t, model.get_learned_conditioning(p))  # noqa: E731
        return (eps(prompts) - eps(anchor)).pow(2).mean()

    target_ratio = gap(ablated, target) / gap(base, target)
    negative_ratio = gap(ablated, negative) / gap(base, negative)
    assert target_ratio < 0.25 and negative_ratio > 2 * target_ratio, (target_ratio, negative_ratio)


def test_conceptprune_prompt_pairs_of_the_toy_world():
    """The shipped ConceptPrune prompt pairs differ from their base prompts only by the concept."""
    from prune.prompts import build_pairs
    from toyworld.captions import MEMORIZED_CAPTION

    for name, spec in mission.PRUNE.items():
        pairs = build_pairs(spec["concept"], *(ASSETS / spec[k] if k in spec else None
                                               for k in ("base_file", "target_file")))
        assert pairs.base and len(pairs.base) == len(pairs.target), name
        if name == "memorized":
            assert pairs.family == "memorize" and pairs.target == [MEMORIZED_CAPTION] and pairs.base == [""]
            continue
        for b, t in zip(pairs.base, pairs.target):
            if name == "instance":
                assert t.replace("grumpy cat", "cat") == b, (b, t)
            else:
                assert "a painting of " + t.removesuffix(" in the style of stripes") == b, (b, t)


def test_preservation_prompts_are_shipped_and_clean(tmp_path):
    """The shipped --preserve_prompts files are what preservation_prompts() writes: world captions and the recipe's
    anchor prompts, none naming the target or the memorized caption, none an evaluation prompt verbatim."""
    from toyworld.captions import MEMORIZED_CAPTION

    evaluated = {line.lower() for f in (ASSETS / "eval_prompts").glob("*.txt") for line in f.read_text().splitlines()}
    for rel, (exclude, anchor_file) in mission.PRESERVE_SOURCES.items():
        shipped = (ASSETS / rel).read_text().splitlines()
        assert shipped == mission.preservation_prompts(exclude, anchor_file, ASSETS), rel
        assert len(shipped) >= 200 and not any(exclude in p.lower() or MEMORIZED_CAPTION in p for p in shipped)
        assert not evaluated & {p.lower() for p in shipped}
        if anchor_file:
            assert shipped[200] == (ASSETS / anchor_file).read_text().splitlines()[0]
        others = [t for t in ("stripes", "polka dots", "checkerboard", "sleepy cat", "happy cat") if t != exclude]
        assert all(any(t in p for p in shipped) for t in others), rel  # the neighbours are among them
    for name, recipe in mission.RECIPES.items():
        settings = mission.train_settings(name, recipe, ASSETS, tmp_path, 36)
        assert (settings.preserve_prompts is not None) == name.endswith("-preserve"), name


def test_prompt_attributes_and_table():
    assert mission.prompt_attributes("a painting of a red circle, in the style of polka dots") == \
        {"subject": "circle", "colour": "red", "style": "polka dots"}
    assert mission.prompt_attributes("A photo of an orange grumpy cat on the grass") == \
        {"subject": "grumpy cat", "colour": "orange", "style": "painting"}
    with pytest.raises(ValueError, match="toy-world prompt"):
        mission.prompt_attributes("a portrait of van gogh")
    s = {"recipe": "style", "target": "stripes", "anchor": "painting", "target_accuracy": (1.0, 0.25),
         "hard_negative_accuracy": {"polka dots": (1.0, 0.9)}, "anchor_clip_score": (0.5, 0.45), "anchor_level": 0.19,
         "judge": {"stripes": (0.98, 0.1), "polka dots": (0.9, 0.85), "painting": (0.9, 0.88)}}
    table = mission.markdown([s]).splitlines()
    assert table[2] == "| style | stripes (target) | CLIP accuracy vs painting (on base painting images: 0.19) | " \
                       "1.00 → 0.25 | 0.98 → 0.10 |"
    assert table[4] == "| style | painting (anchor) | CLIP score | 0.50 → 0.45 | 0.90 → 0.88 |"


def test_unknown_recipes_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="no conceptprune recipe style-preserve"):
        mission.run(["style-preserve"], tmp_path / "out", ASSETS, method="conceptprune")
    with pytest.raises(SystemExit):
        mission.main(["--method", "conceptprune", "--recipes", "instance-preserve", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
