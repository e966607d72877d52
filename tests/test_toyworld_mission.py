"""End to end on the shipped toy-world model (assets/toyworld/): a short style ablation with train.py,
scored by evaluate.py with the toy CLIP; the method's effect is asserted, not just the plumbing."""
import json
from pathlib import Path

import pytest
import torch

from toyworld import mission

ASSETS = Path(__file__).resolve().parents[1] / "assets/toyworld"


@pytest.fixture(scope="module")
def style_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mission")
    report = mission.run(["style"], out, ASSETS, quick=True)
    return out, report


def test_style_ablation_removes_the_style_and_keeps_the_others(style_run):
    out, report = style_run
    s = report["summaries"][0]
    base, ablated = s["target_accuracy"]
    assert base >= 0.8 and ablated <= 0.4, s
    # the other textures lose far less than the target (10 images each in the quick run: steps of 0.1)
    drops = [b - a for b, a in s["hard_negative_accuracy"].values()]
    assert sum(drops) / len(drops) <= 0.25 and (base - ablated) >= 2 * max(sum(drops) / len(drops), 0.1), s
    assert (out / "grid.png").is_file() and "stripes" in (out / "mission.md").read_text()
    assert json.loads((out / "mission.json").read_text())["summaries"][0]["recipe"] == "style"


@torch.no_grad()
def test_target_prediction_collapses_onto_the_anchor(style_run):
    """Issue 3's effect measure, on a trained model: after the run, eps(x_t, target prompt) is much closer to
    eps(x_t, anchor prompt) (both from the ablated model, what the model-based loss asks) than before, while a
    hard negative's prompt keeps most of its distance. x_t: the run's anchor images, encoded and noised (the
    inputs the loss sees; on pure Gaussian inputs the regularized recipe's gap barely moves)."""
    import numpy as np
    from omegaconf import OmegaConf
    from PIL import Image

    from ablation.delta import load_model
    from toyworld.ldm import to_model_range

    out, _ = style_run
    run_dir = next((out / "logs").iterdir())
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
