"""toyworld.clip: tiny CLIP config, contrastive training, LDM text-tower export, zero-shot accuracy."""
import json
import math

import pytest
import torch

from toyworld.clip import (
    EVAL_SEED,
    ldm_text_config,
    text_features,
    text_state_dict_for_ldm,
    tiny_clip_config,
    train_clip,
    zero_shot_accuracy,
    zero_shot_prompts,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip")
    model, history = train_clip(out, steps=30, batch_size=16, lr=1e-3, seed=0, size=32, log_every=5,
                                pool=256, progress=False)
    return out, model, history


def test_config_builds():
    from transformers import CLIPModel

    cfg = tiny_clip_config()
    tc, vc = cfg.text_config, cfg.vision_config
    assert (tc.vocab_size, tc.max_position_embeddings, tc.eos_token_id, tc.hidden_act) == (49408, 77, 49407,
                                                                                          "quick_gelu")
    assert 64 <= tc.hidden_size <= 128 and 2 <= tc.num_hidden_layers <= 4
    assert (vc.image_size, vc.patch_size) == (32, 4) and 64 <= vc.hidden_size <= 128
    assert cfg.projection_dim == 64
    assert tiny_clip_config(image_size=64).vision_config.patch_size == 8
    model = CLIPModel(cfg)
    n_bytes = sum(p.numel() for p in model.parameters()) * 4
    assert n_bytes < 30e6
    assert model.text_model.embeddings.token_embedding.weight.requires_grad


def test_training_reduces_loss_and_saves(trained):
    out, _, history = trained
    assert history[0]["step"] == 0 and history[-1]["step"] == 29
    assert history[-1]["loss"] < history[0]["loss"]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "loss.png").is_file()
    assert json.loads((out / "loss.json").read_text()) == history
    assert json.loads((out / "train.json").read_text())["steps"] == 30


def test_training_is_deterministic(tmp_path):
    kw = dict(steps=3, batch_size=4, seed=1, size=32, log_every=1, progress=False, save=False)
    _, h1 = train_clip(tmp_path, **kw)
    _, h2 = train_clip(tmp_path, **kw)
    assert [h["loss"] for h in h1] == [h["loss"] for h in h2]


def test_eval_seed_is_reserved(tmp_path):
    with pytest.raises(ValueError):
        train_clip(tmp_path, steps=1, batch_size=2, seed=EVAL_SEED, save=False, progress=False)


def test_saved_folder_loads_with_metrics(trained):
    from scoring.metrics import clip_scores, clip_text_features, load_clip
    from toyworld import make_item

    out, model, _ = trained
    clip = load_clip(out)
    images = [make_item(EVAL_SEED, i, 32)[0] for i in range(3)]
    s = clip_scores(clip, images, ["a red circle", "a blue star"])
    assert s.shape == (3, 2) and torch.isfinite(s).all() and (s >= 0).all()
    # metrics' first-EOS pooling agrees with the training-time pooling
    from ldm.modules.encoders.clip_tokenizer import default_tokenizer

    ids = default_tokenizer()(["a photo of a grumpy cat"])
    with torch.no_grad():
        ours = torch.nn.functional.normalize(text_features(clip, ids), dim=-1)
    torch.testing.assert_close(clip_text_features(clip, ["a photo of a grumpy cat"]), ours, rtol=1e-5, atol=1e-5)


def test_text_tower_loads_into_frozen_clip_embedder(trained):
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder

    _, model, _ = trained
    emb = FrozenCLIPEmbedder(text_config=ldm_text_config(model.config))
    sd = text_state_dict_for_ldm(model)
    assert all(k.startswith("cond_stage_model.transformer.text_model.") for k in sd)
    assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in sd
    local = {k[len("cond_stage_model."):]: v for k, v in sd.items()}
    emb.load_state_dict(local, strict=True)
    prompt = ["a painting of a red star in the style of stripes", "a photo of a cat"]
    ids = emb.tokenizer(prompt, max_length=77)
    with torch.no_grad():
        ref = model.text_model(input_ids=ids).last_hidden_state
        got = emb.encode(prompt)
    assert got.shape == (2, 77, model.config.text_config.hidden_size)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_zero_shot_accuracy_in_unit_interval(trained):
    _, model, _ = trained
    acc, counts = zero_shot_accuracy(model, n=40, size=32, return_counts=True)
    assert set(acc) == {"shape", "cat", "colour", "style"} == set(zero_shot_prompts())
    for fam, a in acc.items():
        assert (counts[fam] == 0 and math.isnan(a)) or 0.0 <= a <= 1.0
    assert counts["shape"] == counts["colour"] > 0


def test_zero_shot_prompts_cover_vocabulary():
    from toyworld import CAT_CLASSES, COLOUR_NAMES, STYLES, SUBJECTS

    p = zero_shot_prompts()
    assert list(p["shape"]) == list(SUBJECTS)
    assert list(p["cat"]) == list(CAT_CLASSES)
    assert list(p["colour"]) == list(COLOUR_NAMES)
    assert set(p["style"]) == set(STYLES)
    assert all("in the style of" not in t for g in p["style"]["painting"] for t in g)
    assert all(f"in the style of {t}" in x for t in STYLES if t != "painting" for g in p["style"][t] for x in g)
    # plain and one prototype per texture for shapes and colours; cats are never textured
    assert len(p["shape"]["star"]) == len(p["colour"]["red"]) == len(STYLES) and len(p["shape"]["cat"]) == 1
