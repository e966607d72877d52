"""toyworld.ldm --transformer_depth / --vae_from and experiments/wide.py's helpers (the wider toy UNet, issue 21
the real run and its numbers: docs/experiments/wide-unet.md)."""
import pytest
import torch

from experiments import wide
from ldm.checkpoint import load_model_from_config, load_state_dict
from ldm.modules.attention import FeedForward, SpatialTransformer
from toyworld import ldm as tl

SHIPPED = wide.ASSETS / "ldm"


def _depths(model):
    return [len(m.transformer_blocks) for m in model.modules() if isinstance(m, SpatialTransformer)]


def test_default_build_is_the_shipped_architecture():
    ldm, _ = tl.build_ldm()
    assert set(_depths(ldm)) == {1}
    shipped = load_state_dict(SHIPPED / tl.WEIGHTS_NAME)
    assert {k: tuple(v.shape) for k, v in ldm.state_dict().items()} == {k: tuple(v.shape) for k, v in shipped.items()}


def test_depth_2_unet_trains_on_the_shipped_autoencoder(tmp_path, toy_clip_dir, monkeypatch):
    monkeypatch.setenv("TOYWORLD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "wide"
    report = tl.main(["--clip", str(toy_clip_dir), "--out", str(out), "--pool", "16", "--unet_steps", "2",
                      "--batch_size", "4", "--preview_steps", "2", "--transformer_depth", "2",
                      "--vae_from", str(SHIPPED)])
    from omegaconf import OmegaConf

    config = OmegaConf.load(out / "ldm.yaml")
    assert config.model.params.unet_config.params.transformer_depth == 2 and report["transformer_depth"] == 2
    shipped_config = OmegaConf.load(SHIPPED / "ldm.yaml")
    assert config.model.params.scale_factor == shipped_config.model.params.scale_factor
    assert not (out / "vae.safetensors").exists()  # stage 1 was not run
    model = load_model_from_config(config.model, out / tl.WEIGHTS_NAME, verbose=False)
    assert set(_depths(model)) == {2}
    n_ff = sum(isinstance(m, FeedForward) for m in model.model.modules())
    shipped_ff = sum(1 for k in load_state_dict(SHIPPED / tl.WEIGHTS_NAME) if k.endswith(".ff.net.2.weight"))
    assert n_ff == 2 * shipped_ff
    shipped = load_state_dict(SHIPPED / tl.WEIGHTS_NAME)
    vae = {k: v for k, v in load_state_dict(out / tl.WEIGHTS_NAME).items() if k.startswith("first_stage_model.")}
    assert vae and all(torch.equal(v, shipped[k]) for k, v in vae.items())


def test_zero_delta_zeroes_exactly_the_ff_net_2_weights(tiny_ckpt, tmp_path):
    from conftest import tiny_model

    from runtime.delta import apply_delta

    path = tmp_path / "zero.safetensors"
    size = wide.zero_delta(tiny_ckpt, wide.ZEROED["ff.net.2"], path)
    model = tiny_model()
    ffs = [m for m in model.modules() if isinstance(m, FeedForward)]
    assert size["tensors"] == len(ffs) and size["weights"] == sum(m.net[2].weight.numel() for m in ffs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    written = apply_delta(model, path)
    assert all(k.endswith(".ff.net.2.weight") for k in written)
    assert all(m.net[2].weight.abs().sum() == 0 and m.net[2].bias.abs().sum() > 0 for m in ffs)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k not in written)
    with pytest.raises(ValueError, match="matches"):
        wide.zero_delta(tiny_ckpt, r"no_such_layer$", tmp_path / "none.safetensors")


def test_assets_view_swaps_only_the_ldm_folder(tmp_path):
    other = tmp_path / "other_ldm"
    other.mkdir()
    view = wide.assets_view(SHIPPED, tmp_path / "view")
    assert (view / "ldm").resolve() == SHIPPED.resolve()
    view = wide.assets_view(other, tmp_path / "view")  # a rerun with another UNet re-points the link
    assert (view / "ldm").resolve() == other.resolve()
    assert (view / "judge").resolve() == (wide.ASSETS / "judge").resolve()
    assert sorted(p.name for p in view.iterdir()) == sorted(p.name for p in wide.ASSETS.iterdir())
