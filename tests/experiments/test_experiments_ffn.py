"""Issue 21: a concept that lives in the FFNs (the texture "waves", taught to the shipped toy UNet through its
transformer blocks' feed-forward weights only; experiments/ffn/) and ConceptPrune on it. The effect is
asserted on a short run with the shipped FFN delta: after pruning, the judge sees far fewer waves, and stripes
stay."""
import functools
import random
from pathlib import Path

import pytest
import torch

from experiments import ffn as F
from toyworld.dataset import DEFAULT_MIXTURE, sample_scene
from toyworld.judge import JUDGE_MIXTURE
from toyworld.render import FFN_TEXTURES, STYLES, TEXTURES, Scene, render

ASSETS = Path(__file__).resolve().parents[2] / "assets/toyworld"


def test_waves_render_but_are_not_part_of_the_shipped_world():
    import numpy as np

    a = np.asarray(render(Scene(shape="square", colour="blue", size="large", style="waves"), 32), dtype=float)
    others = [np.asarray(render(Scene(shape="square", colour="blue", size="large", style=s), 32), dtype=float)
              for s in STYLES]
    assert min(np.abs(a - o).mean() for o in others) > 10
    assert FFN_TEXTURES == ("waves",) and "waves" not in STYLES + TEXTURES
    for mixture in (DEFAULT_MIXTURE, JUDGE_MIXTURE):
        rng = random.Random(0)
        assert all(sample_scene(rng, mixture).style != "waves" for _ in range(2000))
    scene, text = F.ffn_item(0, next(i for i in range(50) if F.ffn_item(0, i, 0.5)[0].style == "waves"), 0.5)
    assert "waves" in text and scene.style == "waves"


def test_the_detector_tells_waves_from_the_shipped_textures():
    det = F.load_detector(ASSETS / "ffn")
    rng = random.Random("ci")
    waves = [render(F.texture_scene(rng), 32) for _ in range(40)]
    others = [render(Scene(shape=s, colour=c, size="large", style=st), 32)
              for s in ("circle", "star", "square") for c in ("red", "yellow", "blue") for st in STYLES]
    assert all(F.detect(det, waves)) and not any(F.detect(det, others))


def test_the_shipped_deltas_hold_only_ffn_weights(tmp_path):
    import json

    from ldm.checkpoint import load_state_dict

    base = dict(load_state_dict(ASSETS / "ldm" / "toyworld-ldm.safetensors"))
    for variant, name in F.DELTA_FILES.items():
        delta = dict(load_state_dict(ASSETS / "ffn" / name))
        ends = {k.split(".transformer_blocks.0.", 1)[1] for k in delta}
        assert ends == {"ff.net.0.proj.weight", "ff.net.0.proj.bias", "ff.net.2.weight", "ff.net.2.bias"}, variant
        assert len(delta) == 40 and all(F.is_ffn(k) and k.startswith("model.diffusion_model.") for k in delta)
        full = dict(load_state_dict(F.build_checkpoint(tmp_path, ASSETS, variant)))
        assert set(full) == set(base)
        changed = {k for k in base if not torch.equal(full[k], base[k])}
        assert changed and changed <= set(delta), variant
    # the units delta changed only its taught units: their columns of ff.net.2 (its bias not at all)
    units = json.loads((ASSETS / "ffn" / "ffn_delta.json").read_text())["units"]
    delta = dict(load_state_dict(ASSETS / "ffn" / F.DELTA_FILE))
    for prefix, idx in units.items():
        k = f"model.{prefix}.ff.net.2"
        moved = (delta[k + ".weight"] != base[k + ".weight"]).any(0).nonzero().flatten().tolist()
        assert set(moved) <= set(idx) and len(moved) > 0.9 * len(idx)
        assert torch.equal(delta[k + ".bias"], base[k + ".bias"])


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    out = tmp_path_factory.mktemp("ffn")
    ckpt = F.build_checkpoint(out, ASSETS)
    run_dir = F.prune_run(out, ckpt, assets=ASSETS)  # the shipped prompt pairs and the toy defaults
    return out, ckpt, run_dir


def _shown(out, ckpt, delta, name, concepts, n=24):
    """Judge shares of ``n`` images per concept (evaluation prompts spread over every colour; DDIM 25, the
    same seeds for every model)."""
    from ablation.data import load_image_captions
    from ldm.util import load_model_config
    from runtime.generate import Sampling, generate_images
    from runtime.loading import load_model

    prompts = [p for c in concepts for p in F.sweep_prompts(c, n, F.eval_prompt_dir(out, ASSETS))]
    folder = out / name
    config = load_model_config(ASSETS / "ldm" / "ldm.yaml")
    generate_images(functools.partial(load_model, config, str(ckpt), delta and str(delta)), prompts, folder,
                    Sampling(steps=25, eta=1.0, scale=6.0, batch_size=48, height=32, width=32, seed=42,
                             precision="full"), desc=name)
    images, texts = load_image_captions(folder / "images.txt", folder / "caption.txt")
    scorers = F.scorers(ASSETS)
    return {c: F.shares(*scorers, images[k * n:(k + 1) * n], texts[k * n:(k + 1) * n], c)["shown"]
            for k, c in enumerate(concepts)}


def test_conceptprune_removes_waves_and_keeps_stripes(pruned):
    """The unchanged conceptprune.py with the toy defaults (skill_ratio 0.1, tau 10) on base + waves: the judge
    sees waves in far fewer images, stripes stay (measured: waves 0.83 -> 0.21, stripes 1.00 -> 0.96)."""
    out, ckpt, run_dir = pruned
    concepts = ["waves", "stripes"]
    before = _shown(out, ckpt, None, "base", concepts)
    after = _shown(out, ckpt, run_dir / "checkpoints" / "delta_pruned.safetensors", "pruned", concepts)
    assert before["waves"] >= 0.7, before
    assert after["waves"] <= before["waves"] - 0.35, (before, after)
    assert after["stripes"] >= before["stripes"] - 0.15, (before, after)
    assert 0.05 < F.pruned_fraction(run_dir) < 0.12
