"""toyworld/quality.py: prompt set and scoring rule (the measured numbers come from the shipped models)."""
import math

import torch

from toyworld import CAT_CLASSES, COLOUR_NAMES, SHAPES, SUBJECTS, TEXTURES
from toyworld.quality import markdown, quality_prompts, score_samples


def test_prompts_cover_every_subject_colour_and_texture():
    items = quality_prompts()
    plain = [w for w in items if w["style"] == "painting"]
    styled = [w for w in items if w["style"] != "painting"]
    assert {(w["subject"], w["colour"]) for w in plain} == {(s, c) for s in SUBJECTS for c in COLOUR_NAMES}
    assert {(w["subject"], w["style"]) for w in styled} == {(s, t) for s in SHAPES for t in TEXTURES}
    for w in items:
        assert w["subject"] in w["prompt"] and w["colour"] in w["prompt"]
        assert (f"in the style of {w['style']}" in w["prompt"]) == (w["style"] != "painting")


def test_score_samples():
    wanted = [{"subject": "star", "colour": "red", "style": "stripes"},
              {"subject": "grumpy cat", "colour": "blue", "style": "painting"},
              {"subject": "circle", "colour": "green", "style": "painting"}]
    predicted = [{"subject": "star", "colour": "red", "style": "polka dots"},
                 {"subject": "happy cat", "colour": "blue", "style": "painting"},
                 {"subject": "circle", "colour": "green", "style": "painting"}]
    s = score_samples(wanted, predicted)
    assert s["n"] == 3 and math.isclose(s["subject"], 2 / 3) and s["shape"] == 1.0 and s["colour"] == 1.0
    assert s["style"] == 0.0 and s["plain_fill"] == 1.0 and s["cat_variant"] == 0.0
    assert math.isclose(s["all"], 1 / 3)
    assert "grumpy cat" in CAT_CLASSES
    table = markdown({"diffusion": s, "memorization": {"copy_rate_memorized_caption": 0.9,
                                                       "copy_rate_other_prompts": 0.0},
                      "clip_zero_shot": {"shape": 0.91}})
    assert "| samples showing the prompted colour | 1.00 |" in table and "zero-shot accuracy, shape | 0.91" in table


def test_colour_by_seed_on_the_shipped_model():
    """The seed/colour diagnostic runs on the shipped weights and judge, and the shipped UNet (trained with
    offset noise) takes the colour from the prompt; the diagnostic's start noise without its spatial mean is
    what it says (the samplers themselves never remove it)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from runtime.loading import load_model
    from toyworld.judge import load_judge
    from toyworld.quality import colour_by_seed, start_noise

    assets = Path(__file__).resolve().parents[2] / "assets/toyworld"
    config = OmegaConf.to_container(OmegaConf.load(assets / "ldm/ldm.yaml").model, resolve=True)
    model, judge = load_model(config, assets / "ldm/toyworld-ldm.safetensors").eval(), load_judge(assets / "judge")
    plain = colour_by_seed(model, judge, seeds=range(2), shapes=("circle",), steps=10)
    centred = colour_by_seed(model, judge, seeds=range(2), shapes=("circle",), steps=10, zero_mean_start=True)
    for r in (plain, centred):
        assert r["n"] == 12 and 0 <= r["accuracy"] <= 1 and 1 <= r["distinct_per_seed"] <= 6
    assert plain["accuracy"] >= 0.75, plain  # the seed no longer picks the colour (0.94 on the full measure)
    x, x0 = start_noise([3, 4], (16, 8, 8)), start_noise([3, 4], (16, 8, 8), zero_mean=True)
    assert x0.mean(dim=(2, 3)).abs().max() < 1e-6 and x.mean(dim=(2, 3)).abs().max() > 0.05
    assert torch.allclose(x - x0, x.mean(dim=(2, 3), keepdim=True).expand_as(x), atol=1e-6)
