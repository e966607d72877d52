"""AutoencoderKL / Encoder / Decoder / DiagonalGaussianDistribution against the CompVis fixtures."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import REF, ref_case, tol, weights

from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.diffusionmodules.model import AttnBlock, Decoder, Downsample, Encoder, ResnetBlock, Upsample
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

SD_V1_DDCONFIG = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                      ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
IDENTITY_LOSS = {"target": "torch.nn.Identity"}


def _tiny_attn_config(**extra):
    dd = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32,
              ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
    dd.update(extra)
    return {"target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {"embed_dim": 4, "lossconfig": IDENTITY_LOSS, "ddconfig": dd}}


def _assert_close(name, actual, expected, **t):
    dev = (actual - expected).abs().max().item()
    torch.testing.assert_close(actual, expected, **t, msg=lambda m: f"{name}: max abs dev {dev:.3g}\n{m}")


# --------------------------------------------------------------------------------------------------
# golden fixture
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_case():
    meta, t = ref_case("autoencoder_tiny")
    ae = instantiate_from_config(meta["config"]).eval()
    ae.load_state_dict(weights(t), strict=True)
    return meta, t, ae


def test_fixture_config_and_param_count(tiny_case):
    meta, t, ae = tiny_case
    assert isinstance(ae, AutoencoderKL)
    assert isinstance(ae.loss, torch.nn.Identity)
    assert sum(p.numel() for p in ae.parameters()) == meta["num_parameters"] == 658375
    assert len(ae.state_dict()) == 124
    assert ae.monitor == "val/rec_loss"


def test_fixture_encode_decode(tiny_case):
    meta, t, ae = tiny_case
    with torch.no_grad():
        posterior = ae.encode(t["image"])
        sample = posterior.sample(noise=t["posterior_noise"])
        decoded = ae.decode(posterior.mode())
    t_mean, t_logvar, t_dec = tol(meta, "posterior_mean"), tol(meta, "posterior_logvar"), tol(meta, "decoded")
    # outputs without their own tolerance entry: the moments and std carry the log-variance error (the
    # looser of the two); sample = mean + std*noise with |noise| < ~4, so mean atol + 4 * std atol.
    t_sample = {"rtol": t_logvar["rtol"], "atol": t_mean["atol"] + 4 * t_logvar["atol"]}

    _assert_close("moments", posterior.parameters, t["moments"], **t_logvar)
    _assert_close("posterior_mean", posterior.mean, t["posterior_mean"], **t_mean)
    _assert_close("posterior_logvar", posterior.logvar, t["posterior_logvar"], **t_logvar)
    _assert_close("posterior_std", posterior.std, t["posterior_std"], **t_logvar)
    _assert_close("posterior_sample", sample, t["posterior_sample"], **t_sample)
    _assert_close("decoded", decoded, t["decoded"], **t_dec)
    assert torch.equal(posterior.mode(), posterior.mean)


def test_fixture_forward_without_sampling(tiny_case):
    meta, t, ae = tiny_case
    with torch.no_grad():
        dec, posterior = ae(t["image"], sample_posterior=False)
    assert isinstance(posterior, DiagonalGaussianDistribution)
    _assert_close("decoded", dec, t["decoded"], **tol(meta, "decoded"))


# --------------------------------------------------------------------------------------------------
# full SD-v1 layout on the meta device
# --------------------------------------------------------------------------------------------------

def test_sd_v1_first_stage_layout():
    ref = json.loads((REF / "sd-v1-keys.json").read_text())
    prefix = "first_stage_model."
    expected = {k[len(prefix):]: v for k, v in ref["keys"].items() if k.startswith(prefix)}
    assert len(expected) == ref["num_keys_per_prefix"]["first_stage_model"] == 248
    with torch.device("meta"):
        ae = AutoencoderKL(ddconfig=SD_V1_DDCONFIG, lossconfig=IDENTITY_LOSS, embed_dim=4)
    got = {k: list(v.shape) for k, v in ae.state_dict().items()}
    assert set(got) == set(expected), (sorted(set(got) - set(expected)), sorted(set(expected) - set(got)))
    assert got == expected
    assert list(got) == list(expected)  # same state_dict order as upstream
    n = sum(p.numel() for p in ae.parameters() if p.requires_grad)
    assert n == ref["parameter_count_per_prefix"]["first_stage_model"] == 83_653_863
    assert ae.decoder.z_shape == (1, 4, 32, 32)


# --------------------------------------------------------------------------------------------------
# attention, multi-level config with attention
# --------------------------------------------------------------------------------------------------

def _perturb(module, scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_attnblock_sdpa_matches_naive_attention():
    blk = AttnBlock(64)
    _perturb(blk, 0.1, seed=1)
    x = torch.randn(2, 64, 5, 7)
    with torch.no_grad():
        out = blk(x)
        h = blk.norm(x)
        b, c, hh, ww = h.shape
        q = blk.q(h).reshape(b, c, hh * ww).permute(0, 2, 1)  # b, hw, c
        k = blk.k(h).reshape(b, c, hh * ww)  # b, c, hw
        v = blk.v(h).reshape(b, c, hh * ww)  # b, c, hw
        w = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)  # b, hw(query), hw(key)
        ref = x + blk.proj_out(torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, x, atol=1e-3)  # the attention branch actually contributes
    assert set(blk.state_dict()) == {f"{n}.{p}" for n in ("norm", "q", "k", "v", "proj_out")
                                     for p in ("weight", "bias")}


def test_three_level_with_attention_forward_backward():
    ae = instantiate_from_config(_tiny_attn_config())
    keys = set(ae.state_dict())
    # encoder levels run at 16, 8, 4; decoder levels 0, 1, 2 at 16, 8, 4 -> attention only at level 1
    assert "encoder.down.1.attn.0.q.weight" in keys
    assert not any(k.startswith(("encoder.down.0.attn", "encoder.down.2.attn")) for k in keys)
    assert {"decoder.up.1.attn.0.proj_out.weight", "decoder.up.1.attn.1.proj_out.weight"} <= keys
    assert not any(k.startswith(("decoder.up.0.attn", "decoder.up.2.attn")) for k in keys)
    assert "encoder.down.2.downsample.conv.weight" not in keys
    assert "decoder.up.0.upsample.conv.weight" not in keys
    assert "decoder.up.2.upsample.conv.weight" in keys
    assert len(ae.decoder.up[0].block) == 2

    x = torch.rand(2, 3, 16, 24) * 2 - 1  # non-square on purpose
    dec, posterior = ae(x)
    assert posterior.mean.shape == posterior.logvar.shape == (2, 4, 4, 6)
    assert posterior.parameters.shape == (2, 8, 4, 6)
    assert dec.shape == x.shape
    loss = F.mse_loss(dec, x) + 1e-6 * posterior.kl().mean()
    loss.backward()
    for name, p in ae.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert ae.encoder.down[1].attn[0].q.weight.grad.abs().sum() > 0


def test_attn_type_options():
    cfg = _tiny_attn_config(attn_type="none")
    ae = instantiate_from_config(cfg)
    assert not any(".attn" in k for k in ae.state_dict())
    assert ae(torch.randn(1, 3, 16, 16))[0].shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="attn_type"):
        instantiate_from_config(_tiny_attn_config(attn_type="flash"))
    with pytest.raises(NotImplementedError):
        instantiate_from_config(_tiny_attn_config(use_linear_attn=True))
    with pytest.raises(NotImplementedError):
        instantiate_from_config(_tiny_attn_config(attn_type="linear"))


def test_encoder_decoder_flags_and_extra_kwargs():
    dd = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), in_channels=3,
              resolution=16, z_channels=4, some_unused_option=123)
    enc_single = Encoder(double_z=False, **dd)
    assert enc_single.conv_out.out_channels == 4
    dec = Decoder(**dd)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        pre = Decoder(give_pre_end=True, **dd).eval()
        pre.load_state_dict(dec.state_dict())
        assert pre(z).shape == (1, 32, 16, 16)
        tanh_dec = Decoder(tanh_out=True, **dd)
        tanh_dec.load_state_dict(dec.state_dict())
        torch.testing.assert_close(tanh_dec(z), torch.tanh(dec(z)))
    assert dec.last_z_shape == z.shape


def test_building_blocks():
    x = torch.randn(2, 32, 9, 9)
    down = Downsample(32, with_conv=True)
    assert down(x).shape == (2, 32, 4, 4)
    # pad right/bottom only, then a valid stride-2 conv
    ref = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    torch.testing.assert_close(down(x), ref)
    torch.testing.assert_close(Downsample(32, with_conv=False)(x), F.avg_pool2d(x, 2, 2))
    assert len(list(Downsample(32, with_conv=False).parameters())) == 0

    up_plain = Upsample(32, with_conv=False)
    y = up_plain(x)
    assert y.shape == (2, 32, 18, 18)
    torch.testing.assert_close(y[:, :, ::2, ::2], x)
    torch.testing.assert_close(y[:, :, 1::2, 1::2], x)
    assert Upsample(32, with_conv=True)(x).shape == (2, 32, 18, 18)

    rb = ResnetBlock(in_channels=32, out_channels=64, conv_shortcut=True, dropout=0.0, temb_channels=16)
    assert {"norm1.weight", "conv1.weight", "temb_proj.weight", "norm2.weight", "conv2.weight",
            "conv_shortcut.weight"} <= set(rb.state_dict())
    assert rb.conv_shortcut.kernel_size == (3, 3)
    temb = torch.randn(2, 16)
    assert rb(x, temb).shape == (2, 64, 9, 9)
    assert not torch.allclose(rb(x, temb), rb(x, None))
    rb2 = ResnetBlock(in_channels=32, out_channels=64, dropout=0.0, temb_channels=0)
    assert "nin_shortcut.weight" in rb2.state_dict() and rb2.nin_shortcut.kernel_size == (1, 1)
    assert not hasattr(rb2, "temb_proj")
    rb3 = ResnetBlock(in_channels=32, dropout=0.0, temb_channels=0)
    assert not any("shortcut" in k for k in rb3.state_dict())
    with torch.no_grad():
        for m in (rb3.conv2,):
            m.weight.zero_()
            m.bias.zero_()
    torch.testing.assert_close(rb3(x, None), x)  # residual path is the identity


# --------------------------------------------------------------------------------------------------
# DiagonalGaussianDistribution
# --------------------------------------------------------------------------------------------------

def test_diagonal_gaussian_moments_kl_nll():
    g = torch.Generator().manual_seed(0)
    params = torch.randn(2, 6, 3, 5, generator=g)
    params[0, 3, 0, 0] = 50.0
    params[0, 4, 0, 0] = -80.0
    d = DiagonalGaussianDistribution(params)
    torch.testing.assert_close(d.mean, params[:, :3])
    assert d.logvar[0, 0, 0, 0] == 20.0 and d.logvar[0, 1, 0, 0] == -30.0
    torch.testing.assert_close(d.std, torch.exp(0.5 * d.logvar))
    torch.testing.assert_close(d.var, torch.exp(d.logvar))

    ref = torch.distributions.Normal(d.mean.double(), d.std.double())
    std_normal = torch.distributions.Normal(torch.zeros_like(ref.loc), torch.ones_like(ref.scale))
    kl_ref = torch.distributions.kl_divergence(ref, std_normal).sum(dim=[1, 2, 3])
    torch.testing.assert_close(d.kl().double(), kl_ref, rtol=1e-5, atol=1e-3)

    other = DiagonalGaussianDistribution(torch.randn(2, 6, 3, 5, generator=g))
    oref = torch.distributions.Normal(other.mean.double(), other.std.double())
    torch.testing.assert_close(d.kl(other).double(), torch.distributions.kl_divergence(ref, oref).sum(dim=[1, 2, 3]),
                               rtol=1e-5, atol=1e-3)

    x = torch.randn(2, 3, 3, 5, generator=g)
    nll_ref = -ref.log_prob(x.double()).sum(dim=[1, 2, 3])
    torch.testing.assert_close(d.nll(x).double(), nll_ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(d.nll(x, dims=[1, 2]).double(), -ref.log_prob(x.double()).sum(dim=[1, 2]),
                               rtol=1e-5, atol=1e-3)
    # explicit formula (log 2*pi form)
    explicit = 0.5 * (math.log(2 * math.pi) + d.logvar + (x - d.mean) ** 2 / d.var).sum(dim=[1, 2, 3])
    torch.testing.assert_close(d.nll(x), explicit)


def test_diagonal_gaussian_sampling():
    params = torch.randn(1, 8, 4, 4)
    d = DiagonalGaussianDistribution(params)
    noise = torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(d.sample(noise=noise), d.mean + d.std * noise)
    s1 = d.sample(generator=torch.Generator().manual_seed(7))
    s2 = d.sample(generator=torch.Generator().manual_seed(7))
    assert torch.equal(s1, s2) and s1.shape == d.mean.shape and s1.dtype == params.dtype
    torch.testing.assert_close(s1, d.mean + d.std * torch.randn(1, 4, 4, 4,
                                                                generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(d.sample(), d.sample())

    dd = DiagonalGaussianDistribution(params, deterministic=True)
    assert torch.equal(dd.sample(), dd.mean)
    assert torch.equal(dd.std, torch.zeros_like(dd.mean)) and torch.equal(dd.var, torch.zeros_like(dd.mean))
    assert float(dd.kl().sum()) == 0.0 and float(dd.nll(dd.mean).sum()) == 0.0

    half = DiagonalGaussianDistribution(params.double())
    assert half.sample().dtype == torch.float64


# --------------------------------------------------------------------------------------------------
# checkpoint loading through ldm.checkpoint
# --------------------------------------------------------------------------------------------------

def test_ckpt_path_ignore_keys(tmp_path, tiny_case):
    from ldm.checkpoint import save_state_dict

    meta, t, _ = tiny_case
    sd = weights(t)
    save_state_dict({**sd, "model_ema.decay": torch.tensor(0.999)}, tmp_path / "vae.ckpt")
    params = dict(meta["config"]["params"])
    ae = AutoencoderKL(**params, ckpt_path=str(tmp_path / "vae.ckpt"), ignore_keys=["decoder.", "post_quant"])
    for k, v in ae.state_dict().items():
        if k.startswith(("decoder.", "post_quant")):
            assert not torch.equal(v, sd[k]), k  # ignored: left at its fresh init
        else:
            assert torch.equal(v, sd[k]), k

    # a full LatentDiffusion state dict: the first_stage_model.* part is picked out
    sd_full = {"first_stage_model." + k: v for k, v in sd.items()}
    sd_full["model.diffusion_model.out.0.weight"] = torch.zeros(3)
    save_state_dict(sd_full, tmp_path / "sd.safetensors")
    ae2 = AutoencoderKL(**params, ckpt_path=str(tmp_path / "sd.safetensors"))
    for k, v in ae2.state_dict().items():
        assert torch.equal(v, sd_full["first_stage_model." + k]), k
