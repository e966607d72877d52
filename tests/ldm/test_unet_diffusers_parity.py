"""Our UNetModel against diffusers' UNet2DConditionModel, an independent implementation.

The reference fixture pins a single configuration; this file checks many other tiny SD-like
configurations (channel multipliers, depths, head rules, context widths, in/out channels,
levels with and without attention) against diffusers with the same random weights. The
weights are converted with diffusers' own public CompVis->diffusers converter
(``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint``), so the key mapping is
not ours either.

diffusers is a declared dev dependency (requirements-dev.txt): when it is missing these tests
fail with an explanation instead of being skipped.
"""
from __future__ import annotations

import pytest
import torch

from ldm.modules.diffusionmodules.openaimodel import UNetModel

LDM_PREFIX = "model.diffusion_model."  # what diffusers' converter expects in front of UNet keys
RTOL = ATOL = 1e-4


@pytest.fixture(scope="module")
def diffusers_api():
    try:
        from diffusers import UNet2DConditionModel
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    except ImportError as e:  # pragma: no cover - depends on the environment
        pytest.fail(f"diffusers is a dev dependency of the test-suite and could not be imported ({e}); "
                    "install it with `pip install -r requirements-dev.txt`", pytrace=False)
    return UNet2DConditionModel, convert_ldm_unet_checkpoint


# ----------------------------------------------------------------------------- configs
def unet_params(model_channels, channel_mult, num_res_blocks, transformer_depth, context_dim,
                num_heads=-1, num_head_channels=-1, legacy=False, attention_resolutions=None,
                in_channels=4, out_channels=4):
    if attention_resolutions is None:  # attention at every level
        attention_resolutions = [2 ** i for i in range(len(channel_mult))]
    return dict(image_size=16, in_channels=in_channels, out_channels=out_channels,
                model_channels=model_channels, num_res_blocks=num_res_blocks,
                attention_resolutions=attention_resolutions, channel_mult=channel_mult,
                num_heads=num_heads, num_head_channels=num_head_channels, use_spatial_transformer=True,
                transformer_depth=transformer_depth, context_dim=context_dim, legacy=legacy)


CONFIGS = {
    "c32_m12_r1_d1_heads2": unet_params(32, [1, 2], 1, 1, 24, num_heads=2),
    "c32_m122_r2_d1_hc16": unet_params(32, [1, 2, 2], 2, 1, 40, num_head_channels=16),
    "c32_m1122_r1_d2_heads4_legacy": unet_params(32, [1, 1, 2, 2], 1, 2, 16, num_heads=4, legacy=True),
    "c64_m12_r2_d2_hc32": unet_params(64, [1, 2], 2, 2, 32, num_head_channels=32),
    "c64_m122_r1_d1_heads8_legacy": unet_params(64, [1, 2, 2], 1, 1, 48, num_heads=8, legacy=True),
    # SD-v1 pattern: no attention at the deepest level (DownBlock2D / UpBlock2D in diffusers)
    "c32_m122_r2_d1_heads1_noattn_deepest_io3x5": unet_params(32, [1, 2, 2], 2, 1, 8, num_heads=1,
                                                              attention_resolutions=[1, 2],
                                                              in_channels=3, out_channels=5),
}


def heads_per_level(p) -> list[int]:
    chans = [p["model_channels"] * m for m in p["channel_mult"]]
    if p["num_head_channels"] != -1:
        return [c // p["num_head_channels"] for c in chans]
    return [p["num_heads"]] * len(chans)


def diffusers_config(p) -> dict:
    """UNet2DConditionModel kwargs equivalent to CompVis UNetModel params (SD-v1 family)."""
    n = len(p["channel_mult"])
    attn = [2 ** i in set(p["attention_resolutions"]) for i in range(n)]
    # SD-v1 patterns: attention at every level, or at all but the deepest (the mid block always has it)
    assert all(attn[:-1]), "only attention at all levels or at all but the deepest level is mapped here"
    return dict(
        sample_size=p["image_size"], in_channels=p["in_channels"], out_channels=p["out_channels"],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        block_out_channels=[p["model_channels"] * m for m in p["channel_mult"]],
        layers_per_block=p["num_res_blocks"], transformer_layers_per_block=p["transformer_depth"],
        cross_attention_dim=p["context_dim"],
        attention_head_dim=heads_per_level(p),  # diffusers' SD1 naming quirk: this is the number of heads
        norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
        downsample_padding=1, use_linear_projection=False, upcast_attention=False,
        center_input_sample=False, dropout=0.0,
    )


def perturbed_unet(p, seed: int) -> UNetModel:
    torch.manual_seed(seed)
    unet = UNetModel(**p)
    with torch.no_grad():
        for prm in unet.parameters():  # make zero-initialised layers non-zero
            prm.add_(0.05 * torch.randn_like(prm))
    return unet.eval()


def to_diffusers(unet: UNetModel, p, api):
    UNet2DConditionModel, convert = api
    sd = unet.state_dict()
    converted = convert({LDM_PREFIX + k: v for k, v in sd.items()}, {"layers_per_block": p["num_res_blocks"]})
    assert len(converted) == len(sd), "converter dropped or duplicated tensors"
    ref = UNet2DConditionModel(**diffusers_config(p))
    ref.load_state_dict(converted, strict=True)
    return ref.eval()


def key_map(unet: UNetModel, p, api) -> dict[str, str]:
    """diffusers parameter name -> our parameter name, as diffusers' converter maps them."""
    _, convert = api
    names = {LDM_PREFIX + k: k for k in unet.state_dict()}
    return convert(names, {"layers_per_block": p["num_res_blocks"]})


def inputs(p, batch: int, timesteps: list[int], hw=(16, 16), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, p["in_channels"], *hw, generator=g)
    ctx = torch.randn(batch, 7, p["context_dim"], generator=g)
    return x, torch.tensor(timesteps), ctx


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_diffusers(name, diffusers_api):
    p = CONFIGS[name]
    unet = perturbed_unet(p, seed=sum(map(ord, name)))
    ref = to_diffusers(unet, p, diffusers_api)
    cases = [(1, [517]), (3, [0, 999, 261])]
    with torch.no_grad():
        for batch, ts in cases:
            x, t, ctx = inputs(p, batch, ts)
            ours = unet(x, timesteps=t, context=ctx)
            theirs = ref(x, t, encoder_hidden_states=ctx).sample
            assert ours.shape == (batch, p["out_channels"], 16, 16)
            assert theirs.abs().max() > 1e-2  # the comparison is not between two near-zero tensors
            torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=ATOL, msg=f"{name} batch={batch} t={ts}")


def test_forward_matches_diffusers_non_square_scalar_timestep(diffusers_api):
    p = CONFIGS["c32_m122_r2_d1_hc16"]
    unet = perturbed_unet(p, seed=3)
    ref = to_diffusers(unet, p, diffusers_api)
    x, _, ctx = inputs(p, 2, [0], hw=(8, 24))
    t = torch.tensor(999)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, timesteps=t, context=ctx), ref(x, t, encoder_hidden_states=ctx).sample,
                                   rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["c32_m12_r1_d1_heads2", "c64_m12_r2_d2_hc32"])
def test_gradients_match_diffusers(name, diffusers_api):
    """Gradients w.r.t. the inputs and every parameter agree (training parity, not just inference)."""
    p = CONFIGS[name]
    unet = perturbed_unet(p, seed=11)
    ref = to_diffusers(unet, p, diffusers_api)
    names = key_map(unet, p, diffusers_api)
    x, t, ctx = inputs(p, 3, [0, 999, 40])
    grads = []
    for call in (lambda a, c: unet(a, timesteps=t, context=c),
                 lambda a, c: ref(a, t, encoder_hidden_states=c).sample):
        a, c = x.clone().requires_grad_(), ctx.clone().requires_grad_()
        call(a, c).square().mean().backward()
        grads.append((a.grad, c.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=RTOL, atol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=RTOL, atol=1e-6)
    ours = dict(unet.named_parameters())
    for dname, dparam in ref.named_parameters():
        torch.testing.assert_close(ours[names[dname]].grad, dparam.grad, rtol=1e-3, atol=1e-6, msg=dname)


def test_legacy_num_head_channels_matches_diffusers(diffusers_api):
    p = unet_params(32, [1, 2], 1, 1, 24, num_head_channels=16, legacy=True)
    unet = perturbed_unet(p, seed=5)
    ref = to_diffusers(unet, p, diffusers_api)
    x, t, ctx = inputs(p, 3, [0, 999, 5])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, timesteps=t, context=ctx), ref(x, t, encoder_hidden_states=ctx).sample,
                                   rtol=RTOL, atol=ATOL)
