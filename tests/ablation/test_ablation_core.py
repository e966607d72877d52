"""Losses, parameter groups, start-token detach and delta checkpoints of the ablation method."""
import pytest
import torch
from conftest import ROOT, tiny_model
from omegaconf import OmegaConf

from ablation.losses import ablation_loss, anchor_noise_loss, masked_error, preservation_loss
from ablation.params import install_sot_detach, optimizer_groups, select_trainable
from ldm.checkpoint import CheckpointError
from ldm.util import instantiate_from_config
from runtime.delta import apply_delta, delta_state_dict, save_delta


@pytest.fixture(scope="module")
def sd_meta():
    cfg = OmegaConf.load(ROOT / "configs/stable-diffusion/v1-inference.yaml").model
    with torch.device("meta"):
        return instantiate_from_config(cfg)


def tiny():
    return tiny_model()


def test_masked_error_hand_computed():
    pred = torch.zeros(2, 4, 2, 2)
    target = torch.ones(2, 4, 2, 2)
    target[1] *= 3
    full = torch.ones(2, 1, 2, 2)
    # sum over 4 channels of (1)^2 at 4 pixels / 4 pixels = 4 ; sample 2: 9*16/4 = 36
    assert masked_error(pred, target, full).tolist() == [4.0, 36.0]
    half = full.clone()
    half[:, :, 0] = 0
    assert masked_error(pred, target, half).tolist() == [4.0, 36.0]
    target[0, :, 0] = 100  # masked out
    assert masked_error(pred, target, half)[0].item() == 4.0


def test_losses_match_direct_computation():
    model = tiny().eval()
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([5, 700])
    c_t, c_a = torch.randn(2, 77, 32), torch.randn(2, 77, 32)
    mask = torch.ones(2, 1, 8, 8)
    mask[0, :, :2] = 0
    x_t = (model.sqrt_alphas_cumprod[t].view(2, 1, 1, 1) * x0
           + model.sqrt_one_minus_alphas_cumprod[t].view(2, 1, 1, 1) * noise)
    with torch.no_grad():
        e_t, e_a = model.apply_model(x_t, t, c_t), model.apply_model(x_t, t, c_a)

    def ref(target):
        return torch.stack([(mask[i] * (e_t[i] - target[i]) ** 2).sum() / mask[i].sum() for i in range(2)]).mean()

    torch.testing.assert_close(ablation_loss(model, x0, c_t, c_a, mask, t, noise, "model-based"), ref(e_a))
    torch.testing.assert_close(ablation_loss(model, x0, c_t, None, mask, t, noise, "noise-based"), ref(noise))
    torch.testing.assert_close(anchor_noise_loss(model, x0, c_t, mask, t, noise), ref(noise))
    with pytest.raises(ValueError, match="unknown loss type"):
        ablation_loss(model, x0, c_t, c_a, mask, t, noise, "bogus")


def test_model_based_target_is_stop_gradient():
    model = tiny()
    trainable = select_trainable(model, "cross-attn")
    x0, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    c = torch.randn(1, 77, 32)
    # identical prompts: the loss is 0 and its gradient too (the target carries no gradient)
    loss = ablation_loss(model, x0, c, c, torch.ones(1, 1, 8, 8), torch.tensor([300]), noise)
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in trainable.values())


def test_preservation_loss_pins_prompts_to_the_base_weights():
    import copy

    model = tiny().eval()
    base = copy.deepcopy(model)
    trainable = select_trainable(model, "cross-attn")
    base_weights = {n.removeprefix("model."): p.detach().clone() for n, p in trainable.items()}
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 600])
    c, mask = torch.randn(2, 77, 32), torch.ones(2, 1, 8, 8)
    assert preservation_loss(model, x0, c, mask, t, noise, base_weights).item() == 0.0
    with torch.no_grad():
        for p in trainable.values():
            p.add_(0.05 * torch.randn_like(p))
    loss = preservation_loss(model, x0, c, mask, t, noise, base_weights)
    # the target is the untouched copy's prediction; the trained weights themselves are not swapped back
    x_t = model.q_sample(x0, t, noise)
    with torch.no_grad():
        want = masked_error(model.apply_model(x_t, t, c), base.apply_model(x_t, t, c), mask).mean()
    torch.testing.assert_close(loss.detach(), want)
    assert loss.item() > 0
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in trainable.values())
    assert not any(torch.equal(p.detach(), base_weights[n.removeprefix("model.")]) for n, p in trainable.items())


def test_parameter_groups_on_sd_v1_layout(sd_meta):
    d = {"320": 5, "640": 5, "1280": 6}  # transformer blocks per width
    kv = select_trainable(sd_meta, "cross-attn")
    assert len(kv) == 32 and sum(p.numel() for p in kv.values()) == 19_169_280
    assert all(n.startswith("model.diffusion_model.") and ("attn2.to_k" in n or "attn2.to_v" in n) for n in kv)
    assert sum(p.numel() for p in sd_meta.parameters() if p.requires_grad) == 19_169_280
    full = select_trainable(sd_meta, "full-weight")
    assert sum(p.numel() for p in full.values()) == 859_520_964
    attn = select_trainable(sd_meta, "attn")
    assert len(attn) == 16 * 6  # q, k, v of attn1 and attn2
    assert sum(p.numel() for p in attn.values()) == sum(n * (4 * int(w) ** 2 + 2 * 768 * int(w)) for w, n in d.items())
    assert not any(p.requires_grad for n, p in sd_meta.named_parameters() if not n.startswith("model."))
    with pytest.raises(ValueError, match="unknown parameter group"):
        select_trainable(sd_meta, "everything")


def test_embedding_group_changes_only_chosen_rows():
    model = tiny()
    ids = torch.tensor([320, 1125])
    trainable = select_trainable(model, "embedding", ids)
    (name, weight), = trainable.items()
    before = weight.detach().clone()
    opt = torch.optim.AdamW(optimizer_groups(trainable), lr=1e-2)
    for _ in range(2):
        c = model.get_learned_conditioning(["a cat", "van gogh"])  # ids 320 ("a") is used, 1125 may not be
        c.square().mean().backward()
        opt.step()
        opt.zero_grad()
    changed = (weight.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert changed and set(changed) <= set(ids.tolist())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == weight.numel()


def test_sot_detach_cuts_only_token_zero_gradient():
    model = tiny()
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor([10])
    grads = {}
    for detach in (False, True):
        model.zero_grad()
        handles = install_sot_detach(model) if detach else []
        ctx = torch.randn(1, 1, 32)  # a context of only the start token
        model.apply_model(x, t, ctx).square().sum().backward()
        k = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k.weight
        grads[detach] = k.grad.abs().sum().item()
        with torch.no_grad():  # forward values are unchanged by the hooks
            out = model.apply_model(x, t, torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(0)))
        grads[f"out{detach}"] = out
        for h in handles:
            h.remove()
    assert grads[False] > 0 and grads[True] == 0
    torch.testing.assert_close(grads["outFalse"], grads["outTrue"], rtol=0, atol=0)


@pytest.mark.parametrize("suffix", ["ckpt", "safetensors"])
def test_delta_round_trip_and_misfit(tmp_path, suffix):
    trained = tiny()
    trainable = select_trainable(trained, "cross-attn")
    with torch.no_grad():
        for p in trainable.values():
            p.add_(1.0)
    path = tmp_path / f"delta.{suffix}"
    save_delta(path, delta_state_dict(trainable))
    base = tiny()
    written = apply_delta(base, path)
    assert sorted(written) == sorted(trainable)
    sd_b, sd_t = base.state_dict(), trained.state_dict()
    assert all(torch.equal(sd_b[k], sd_t[k]) for k in sd_t)

    bad = {"model.diffusion_model.out.2.weight": torch.zeros(1, 2, 3, 3)}
    save_delta(tmp_path / f"bad.{suffix}", bad)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(CheckpointError, match="does not fit"):
        apply_delta(base, tmp_path / f"bad.{suffix}")
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_embedding_delta_rows(tmp_path):
    model = tiny()
    ids = torch.tensor([7, 9])
    trainable = select_trainable(model, "embedding", ids)
    w = next(iter(trainable.values()))
    with torch.no_grad():
        w[ids] = 5.0
    save_delta(tmp_path / "emb.safetensors", delta_state_dict(trainable, ids))
    base = tiny()
    apply_delta(base, tmp_path / "emb.safetensors")
    torch.testing.assert_close(base.state_dict()[next(iter(trainable))], w.detach())
    # reference format: 'embed' without ids goes into the last rows
    save_delta(tmp_path / "ref.ckpt", {"embed": torch.full((2, 32), 3.0)})
    apply_delta(base, tmp_path / "ref.ckpt")
    emb = base.cond_stage_model.transformer.text_model.embeddings.token_embedding.weight
    assert torch.equal(emb[-2:], torch.full((2, 32), 3.0))
