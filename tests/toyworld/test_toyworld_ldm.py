"""toyworld/ldm.py: the toy world's VAE + UNet trainer (tiny runs; the real run is tools/train_toyworld.sh)."""
import json

import pytest
import torch

from ldm.checkpoint import load_model_from_config, load_state_dict
from toyworld import ldm as tl


@pytest.fixture(scope="module")
def pool():
    return tl.render_pool(48, seed=3, size=32, progress=False)


def test_render_pool_matches_the_data_set(pool):
    from toyworld import make_item

    images, captions, labels = pool
    assert images.shape == (48, 3, 32, 32) and images.dtype == torch.uint8
    im, text, label = make_item(3, 7, 32)
    assert captions[7] == text and labels[7] == label
    assert torch.equal(images[7], torch.from_numpy(__import__("numpy").array(im)).permute(2, 0, 1))


def test_cached_pool_is_the_rendered_pool(pool, tmp_path):
    first = tl.cached_pool(48, seed=3, size=32, cache_dir=tmp_path, progress=False)
    (cached,) = list(tmp_path.glob("pool-3-48-32-*.pt"))
    again = tl.cached_pool(48, seed=3, size=32, cache_dir=tmp_path, progress=False)
    for a, b, c in zip(pool, first, again):
        assert (torch.equal(a, b) and torch.equal(a, c)) if isinstance(a, torch.Tensor) else a == b == c
    assert cached.is_file() and not list(tmp_path.glob("*.tmp"))


def test_vae_training_lowers_the_reconstruction_error(pool):
    images = pool[0]
    ldm, _ = tl.build_ldm()
    vae = ldm.first_stage_model
    x = tl.to_model_range(images[:16])
    with torch.no_grad():
        before = (vae.decode(vae.encode(x).mode()) - x).abs().mean().item()
    torch.manual_seed(0)
    history = tl.train_vae(vae, images, steps=40, batch_size=16, lr=2e-3, progress=False, log_every=10)
    with torch.no_grad():
        after = (vae.decode(vae.encode(x).mode()) - x).abs().mean().item()
    assert after < 0.8 * before, (before, after)
    assert [h["step"] for h in history] == [0, 10, 20, 30, 39]
    assert not any(p.requires_grad for p in vae.parameters())  # frozen again, as LatentDiffusion expects


def test_scale_factor_gives_unit_variance():
    # other seed than measure_scale_factor's own, so mean and noise are independent
    mean = 3.0 * torch.randn(200, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    s = tl.measure_scale_factor(mean, torch.full((200, 4, 8, 8), 0.5), seed=0)
    assert abs(s * (9 + 0.25) ** 0.5 - 1) < 0.02


def test_clip_that_does_not_fit_is_refused(tmp_path):
    from transformers import CLIPModel

    from toyworld.clip import tiny_clip_config

    CLIPModel(tiny_clip_config(image_size=32, text_hidden=32)).save_pretrained(tmp_path)
    ldm, _ = tl.build_ldm()
    with pytest.raises(ValueError, match="does not fit"):
        tl.load_clip_text(ldm, tmp_path)


def test_unet_training_learns_and_keeps_the_ema(pool, toy_clip_dir):
    images, captions, _ = pool
    torch.manual_seed(0)
    ldm, _ = tl.build_ldm()
    tl.load_clip_text(ldm, toy_clip_dir)
    mean, std = tl.latent_moments(ldm.first_stage_model, images)
    before = {k: v.clone() for k, v in ldm.model.state_dict().items()}
    history = tl.train_unet(ldm, mean, std, captions, steps=30, batch_size=8, lr=1e-3, ema_decay=0.9,
                            progress=False, log_every=10)
    assert len(history) == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    after = ldm.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # the text encoder and the VAE are not trained
    assert not any(p.requires_grad for p in ldm.cond_stage_model.parameters())


def test_main_writes_a_loadable_model_and_reuses_the_vae_stage(tmp_path, toy_clip_dir, capsys, monkeypatch):
    monkeypatch.setenv("TOYWORLD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ldm"
    argv = ["--clip", str(toy_clip_dir), "--out", str(out), "--pool", "24", "--vae_steps", "3", "--unet_steps", "3",
            "--batch_size", "4", "--preview_steps", "2"]
    report = tl.main(argv)
    for name in ("ldm.yaml", tl.WEIGHTS_NAME, "vae_loss.png", "unet_loss.png", "samples.png", "train.json",
                 "vae.json", "vae.safetensors"):
        assert (out / name).is_file(), name
    sd = load_state_dict(out / tl.WEIGHTS_NAME)
    assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())
    from omegaconf import OmegaConf

    config = OmegaConf.load(out / "ldm.yaml")
    assert config.model.params.scale_factor == pytest.approx(report["scale_factor"])
    model = load_model_from_config(config.model, out / tl.WEIGHTS_NAME, verbose=False)
    assert model.scale_factor == pytest.approx(report["scale_factor"])
    assert torch.equal(model.cond_stage_model.transformer.text_model.embeddings.token_embedding.weight,
                       sd["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].float())
    vae_meta = (out / "vae.json").read_text()
    capsys.readouterr()
    tl.main(argv)
    assert "reusing" in capsys.readouterr().out and (out / "vae.json").read_text() == vae_meta
    assert json.loads((out / "train.json").read_text())["unet_steps"] == 3


def test_stage_unet_needs_a_clip(tmp_path):
    with pytest.raises(SystemExit, match="toy CLIP"):
        tl.main(["--clip", str(tmp_path), "--out", str(tmp_path / "o")])


def test_offset_noise_adds_one_constant_per_sample_and_channel(pool, toy_clip_dir, monkeypatch):
    """The UNet's training noise gets a per-(sample, channel) constant of std ``offset_noise``: its spatial
    means then vary far more than white noise's 1/8 on the 8x8 latent."""
    images, captions, _ = pool
    ldm, _ = tl.build_ldm()
    tl.load_clip_text(ldm, toy_clip_dir)
    mean, std = tl.latent_moments(ldm.first_stage_model, images)
    seen = []
    real = ldm.q_sample

    def spy(z, t, noise=None):
        seen.append(noise.clone())
        return real(z, t, noise)

    monkeypatch.setattr(ldm, "q_sample", spy)

    def mean_std(offset):
        seen.clear()
        tl.train_unet(ldm, mean, std, captions, steps=4, batch_size=16, offset_noise=offset, progress=False)
        return torch.cat(seen).mean(dim=(2, 3)).std().item()

    white, offset = mean_std(0.0), mean_std(0.5)
    assert white == pytest.approx(1 / 8, rel=0.2)
    assert offset == pytest.approx((1 / 64 + 0.25) ** 0.5, rel=0.2)


def test_vae_stage_is_keyed_on_the_first_stage_config_only(tmp_path):
    import argparse

    from omegaconf import OmegaConf

    args = argparse.Namespace(pool=10, seed=0, vae_steps=3, vae_lr=1e-3, batch_size=4, vae_crop=16,
                              vae_crop_frac=0.85)
    config = OmegaConf.load(tl.DEFAULT_CONFIG)
    config.model.params.linear_end = 0.03  # another schedule, same autoencoder
    OmegaConf.save(config, tmp_path / "schedule.yaml")
    config.model.params.first_stage_config.params.ddconfig.ch = 16
    OmegaConf.save(config, tmp_path / "vae.yaml")
    base = tl.vae_settings(args, tl.DEFAULT_CONFIG)
    assert tl.vae_settings(args, tmp_path / "schedule.yaml") == base
    assert tl.vae_settings(args, tmp_path / "vae.yaml") != base


def test_min_snr_weights_cap_the_clean_timesteps():
    ldm, _ = tl.build_ldm()
    abar = ldm.alphas_cumprod
    snr = abar / (1 - abar)
    w = tl.min_snr_weights(abar, 5.0)
    assert torch.equal(tl.min_snr_weights(abar, 0.0), torch.ones_like(abar))
    noisy = snr <= 5.0
    assert noisy.any() and (~noisy).any()  # SD's schedule crosses SNR 5 (near t = 100)
    assert torch.allclose(w[noisy], torch.ones_like(w[noisy]))
    assert torch.allclose(w[~noisy], 5.0 / snr[~noisy])
    assert w[0] < 0.01  # t = 0: SNR ~ 1000


def test_unet_loss_with_unit_weights_is_the_ldm_loss(toy_clip_dir):
    torch.manual_seed(0)
    ldm, _ = tl.build_ldm()
    tl.load_clip_text(ldm, toy_clip_dir)
    z = torch.randn(4, ldm.channels, ldm.image_size, ldm.image_size)
    c = ldm.get_learned_conditioning(["a red circle", "a blue star", "", "a photo of a cat"])
    t, noise = torch.tensor([0, 10, 500, 999]), torch.randn_like(z)
    ones = torch.ones(ldm.num_timesteps)
    expected, _ = ldm.p_losses(z, c, t, noise=noise)
    assert tl.unet_loss(ldm, z, c, t, noise, ones).item() == pytest.approx(expected.item(), rel=1e-5)
    weight = tl.min_snr_weights(ldm.alphas_cumprod, 5.0)
    per_sample = torch.stack([tl.unet_loss(ldm, z[i:i + 1], c[i:i + 1], t[i:i + 1], noise[i:i + 1], ones)
                              for i in range(4)])
    assert tl.unet_loss(ldm, z, c, t, noise, weight).item() == pytest.approx(
        (weight[t] * per_sample).mean().item(), rel=1e-5)
