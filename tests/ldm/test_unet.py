"""UNet and spatial transformer against the reference fixture and the SD-v1 layout."""
import json

import pytest
import torch
from conftest import REF, ref_case, tol, weights

from ldm.modules.attention import CrossAttention
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.util import instantiate_from_config


@pytest.fixture(scope="module")
def unet_case():
    meta, t = ref_case("unet_tiny")
    unet = instantiate_from_config(meta["config"]).eval()
    unet.load_state_dict(weights(t), strict=True)
    return meta, t, unet


def test_unet_tiny_matches_reference(unet_case):
    meta, t, unet = unet_case
    with torch.no_grad():
        out = unet(t["x"], timesteps=t["timesteps"], context=t["context"])
        emb = unet.time_embed(timestep_embedding(t["timesteps"], 32))
    torch.testing.assert_close(timestep_embedding(t["timesteps"], 32), t["t_emb"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(emb, t["emb"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, t["output"], **tol(meta))


def test_unet_batch_independent(unet_case):
    """Each sample's output does not depend on the batch it is run in (batch sizes 1 and 3)."""
    meta, t, unet = unet_case
    with torch.no_grad():
        one = unet(t["x"][1:], timesteps=t["timesteps"][1:], context=t["context"][1:])
        three = unet(torch.cat([t["x"], t["x"][:1]]), timesteps=torch.cat([t["timesteps"], t["timesteps"][:1]]),
                     context=torch.cat([t["context"], t["context"][:1]]))
    torch.testing.assert_close(one[0], t["output"][1], **tol(meta))
    torch.testing.assert_close(three[:2], t["output"], **tol(meta))
    torch.testing.assert_close(three[2], t["output"][0], **tol(meta))


def test_unet_gradient_checkpointing_same_gradients(unet_case):
    meta, t, _ = unet_case
    grads = []
    for flag in (False, True):
        params = dict(meta["config"]["params"], use_checkpoint=flag)
        unet = UNetModel(**params)
        unet.load_state_dict(weights(t), strict=True)
        out = unet(t["x"], timesteps=t["timesteps"], context=t["context"])
        out.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in unet.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)


def _naive_attention(attn: CrossAttention, x, context):
    """softmax(QK^T / sqrt(d)) V written out in float64: the reference formula."""
    h = attn.heads
    q, k, v = (m.weight.double() for m in (attn.to_q, attn.to_k, attn.to_v))
    q, k, v = x.double() @ q.T, context.double() @ k.T, context.double() @ v.T
    b, n, inner = q.shape
    d = inner // h
    q, k, v = (z.reshape(b, -1, h, d).transpose(1, 2) for z in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5, dim=-1)
    out = (w @ v).transpose(1, 2).reshape(b, n, inner)
    lin = attn.to_out[0]
    return (out @ lin.weight.double().T + lin.bias.double()).float()


@pytest.mark.parametrize("heads,dim_head,ctx", [(1, 8, 16), (3, 5, 7), (8, 40, 32)])
def test_cross_attention_equals_formula(heads, dim_head, ctx):
    attn = CrossAttention(24, context_dim=ctx, heads=heads, dim_head=dim_head).eval()
    x, c = torch.randn(2, 10, 24), torch.randn(2, 77, ctx)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, c), _naive_attention(attn, x, c), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("params", [
    dict(num_heads=2, transformer_depth=2, channel_mult=[1, 1, 2], attention_resolutions=[1, 4], num_res_blocks=2),
    dict(num_head_channels=8, channel_mult=[2, 3], attention_resolutions=[2], num_res_blocks=1, legacy=False),
    dict(num_heads=4, num_head_channels=16, legacy=True, channel_mult=[1, 2], attention_resolutions=[1, 2],
         num_res_blocks=1),
])
def test_unet_other_configs_shapes_and_grad(params):
    base = dict(image_size=16, in_channels=4, out_channels=4, model_channels=32, use_spatial_transformer=True,
                context_dim=24, use_checkpoint=True)
    unet = UNetModel(**{**base, **params})
    x = torch.randn(3, 4, 16, 16, requires_grad=True)
    out = unet(x, timesteps=torch.tensor([1, 500, 999]), context=torch.randn(3, 5, 24))
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    n_blocks = sum(1 for n, _ in unet.named_modules() if n.endswith("transformer_blocks.0"))
    assert n_blocks > 0


def test_sd_v1_unet_layout_on_meta():
    ref = json.loads((REF / "sd-v1-keys.json").read_text())
    expected = {k[len("model.diffusion_model."):]: v for k, v in ref["keys"].items()
                if k.startswith("model.diffusion_model.")}
    with torch.device("meta"):
        unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320,
                         attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8,
                         use_spatial_transformer=True, transformer_depth=1, context_dim=768, use_checkpoint=True,
                         legacy=False)
    got = {k: list(v.shape) for k, v in unet.state_dict().items()}
    assert list(got) == list(expected)
    assert got == expected
    assert sum(p.numel() for p in unet.parameters()) == ref["parameter_count_per_prefix"]["model.diffusion_model"]
    kv = [n for n, _ in unet.named_parameters() if "attn2.to_k" in n or "attn2.to_v" in n]
    assert len(kv) == 32


def test_unsupported_options_fail_clearly():
    base = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
                attention_resolutions=[1], channel_mult=[1], num_heads=4, context_dim=8)
    with pytest.raises(NotImplementedError, match="spatial-transformer"):
        UNetModel(**base)
    with pytest.raises(ValueError, match="num_heads or num_head_channels"):
        UNetModel(**{**base, "num_heads": -1, "use_spatial_transformer": True})
