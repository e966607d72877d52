"""LatentDiffusion schedule, objective and samplers against the reference fixtures."""
import json

import numpy as np
import pytest
import torch
from conftest import REF, ROOT, ref_case, tol, weights
from omegaconf import OmegaConf

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.modules.diffusionmodules.util import make_ddim_sampling_parameters, make_ddim_timesteps
from ldm.util import instantiate_from_config

SCHEDULE_BUFFERS = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2"]


def build_tiny_ld(meta):
    """The fixtures' tiny LatentDiffusion with the unet/vae/text-encoder fixture weights loaded."""
    cfg = json.loads(json.dumps(meta["config"]))
    cfg["params"]["cond_stage_config"]["params"] = {
        "text_config": meta["cond_stage_text_config_used_instead_of_download"]}
    ld = instantiate_from_config(cfg)
    _, unet = ref_case("unet_tiny")
    _, vae = ref_case("autoencoder_tiny")
    _, te = ref_case("text_encoder_tiny")
    te_sd = weights(te)
    emb = torch.zeros(49408, te_sd["transformer.text_model.embeddings.position_embedding.weight"].shape[1])
    emb[te["token_embedding_rows.ids"]] = te["token_embedding_rows.values"]
    te_sd["transformer.text_model.embeddings.token_embedding.weight"] = emb
    ld.model.diffusion_model.load_state_dict(weights(unet), strict=True)
    ld.first_stage_model.load_state_dict(weights(vae), strict=True)
    ld.cond_stage_model.load_state_dict(te_sd, strict=True)
    return ld



def test_schedule_function_matches_reference_and_converter():
    """The plain schedule function is the reference schedule, and the diffusers converter uses it."""
    from ldm.diffusers_format import schedule_buffers as converted
    from ldm.modules.diffusionmodules.util import SCHEDULE_BUFFERS as NAMES
    from ldm.modules.diffusionmodules.util import schedule_buffers

    meta, t = ref_case("schedule")
    c = meta["config"]
    got = schedule_buffers(c["beta_schedule"], c["timesteps"], c["linear_start"], c["linear_end"],
                           v_posterior=c["v_posterior"], parameterization=c["parameterization"])
    assert list(got) == SCHEDULE_BUFFERS + ["lvlb_weights"] and list(NAMES) == SCHEDULE_BUFFERS
    for name in SCHEDULE_BUFFERS:
        assert got[name].dtype == torch.float32 and torch.equal(got[name], t[name]), name
    torch.testing.assert_close(got["lvlb_weights"], t["lvlb_weights"], rtol=1e-6, atol=0)
    conv = converted({"beta_schedule": "scaled_linear", "num_train_timesteps": c["timesteps"],
                      "beta_start": c["linear_start"], "beta_end": c["linear_end"]})
    assert list(conv) == SCHEDULE_BUFFERS
    assert all(torch.equal(conv[name], got[name]) for name in SCHEDULE_BUFFERS)

@pytest.fixture(scope="module")
def ddim_case():
    meta, t = ref_case("ddim_tiny")
    return meta, t, build_tiny_ld(meta)


def test_schedule_buffers_exact():
    meta, t = ref_case("schedule")
    cfg = OmegaConf.load(ROOT / "configs/tiny/v1-tiny.yaml").model
    ld = instantiate_from_config(cfg)
    sd = ld.state_dict()
    for name in SCHEDULE_BUFFERS:
        assert torch.equal(sd[name], t[name]), name
    torch.testing.assert_close(ld.lvlb_weights, t["lvlb_weights"], rtol=1e-6, atol=0)
    assert torch.equal(ld.logvar, t["logvar"])
    assert "lvlb_weights" not in sd and "logvar" not in sd
    for s in (10, 20, 50):
        steps = make_ddim_timesteps("uniform", s, 1000)
        assert steps.tolist() == t[f"ddim{s}_timesteps"].tolist()
        _, alphas, alphas_prev = make_ddim_sampling_parameters(ld.alphas_cumprod.numpy(), steps, 0.0)
        assert np.array_equal(alphas.astype(np.float32), t[f"ddim{s}_alphas"].numpy())
        assert np.array_equal(alphas_prev.astype(np.float32), t[f"ddim{s}_alphas_prev"].numpy())


def test_conditioning_matches_reference(ddim_case):
    meta, t, ld = ddim_case
    with torch.no_grad():
        c = ld.get_learned_conditioning(meta["prompts"])
        uc = ld.get_learned_conditioning(meta["negative_prompts"])
    torch.testing.assert_close(c, t["c"], rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(uc, t["uc"], rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("name,sampler_cls", [("ddim_tiny", DDIMSampler), ("plms_tiny", PLMSSampler)])
def test_sampler_matches_reference(ddim_case, name, sampler_cls):
    _, _, ld = ddim_case
    meta, t = ref_case(name)
    call = meta["sampler_call"]
    calls = []
    unet = ld.model.diffusion_model
    handle = unet.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        samples, inter = sampler_cls(ld).sample(
            S=call["S"], batch_size=call["batch_size"], shape=call["shape"], conditioning=t["c"],
            unconditional_conditioning=t["uc"], unconditional_guidance_scale=call["unconditional_guidance_scale"],
            eta=call["eta"], x_T=t["x_T"], log_every_t=call["log_every_t"], verbose=False)
    finally:
        handle.remove()
    assert len(calls) == meta["unet_evaluations_per_sample_call"]
    tl = tol(meta, "samples")
    # step by step first, so that a failure names the first diverging step
    for i, x in enumerate(inter["x_inter"]):
        torch.testing.assert_close(x, t["x_inter"][i], msg=f"x_inter[{i}]", **tl)
    for i, x in enumerate(inter["pred_x0"][1:]):
        torch.testing.assert_close(x, t["pred_x0"][i], msg=f"pred_x0[{i}]", **tl)
    torch.testing.assert_close(samples, t["samples"], **tl)
    decoded = ld.decode_first_stage(samples)
    torch.testing.assert_close(decoded, t["decoded"], **tol(meta, "decoded"))
    torch.testing.assert_close(torch.clamp((decoded + 1) / 2, 0, 1), t["image01"], **tol(meta, "decoded"))


def test_ddpm_loss_pieces(ddim_case):
    _, _, ld = ddim_case
    meta, t = ref_case("ddpm_loss_tiny")
    ld.train()
    assert ld.training and not ld.first_stage_model.training and not ld.cond_stage_model.training
    with torch.no_grad():
        c = ld.get_learned_conditioning(meta["prompts"])
        x_t = ld.q_sample(t["x0"], t["t"], t["noise"])
        out = ld.apply_model(x_t, t["t"], c)
        loss, loss_dict = ld.p_losses(t["x0"], c, t["t"], noise=t["noise"])
        pred_x0 = ld.predict_start_from_noise(x_t, t["t"], out)
    ld.eval()
    torch.testing.assert_close(c, t["c"], rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(x_t, t["x_t"], **tol(meta, "x_t"))
    torch.testing.assert_close(out, t["model_output"], **tol(meta, "model_output"))
    torch.testing.assert_close(loss, t["loss"], **tol(meta, "loss"))
    torch.testing.assert_close(loss_dict["train/loss_simple"], t["loss_simple"], **tol(meta, "loss"))
    torch.testing.assert_close(loss_dict["train/loss_vlb"], t["loss_vlb"], **tol(meta, "loss"))
    torch.testing.assert_close(loss_dict["train/loss"], t["loss"], **tol(meta, "loss"))
    torch.testing.assert_close(pred_x0, t["pred_x0_from_eps"], rtol=1e-4, atol=1e-4)
    for name in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "lvlb_weights"):
        torch.testing.assert_close(getattr(ld, name)[t["t"]], t[f"{name}_t"], rtol=1e-6, atol=0)


def _ddim_float64(eps_fn, x, alphas_cumprod, steps, eta, scale, noises):
    """The DDIM recurrence written out directly in float64 (independent of the sampler code)."""
    ac = alphas_cumprod.double()
    x = x.double()
    grid = list(range(0, 1000, 1000 // steps))
    grid = [g + 1 for g in grid][::-1]
    for i, t in enumerate(grid):
        a_t = ac[t]
        a_prev = ac[grid[i + 1]] if i + 1 < len(grid) else ac[0]
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        e = eps_fn(x.float(), t, scale).double()
        x0 = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).sqrt() * e + sigma * noises[i].double()
    return x.float()


@pytest.mark.parametrize("steps,eta,scale,batch", [(7, 0.0, 3.0, 1), (20, 1.0, 7.5, 3), (4, 0.5, 1.0, 2)])
def test_ddim_other_settings_match_direct_formula(ddim_case, steps, eta, scale, batch):
    _, t, ld = ddim_case
    c = t["c"][[i % 2 for i in range(batch)]]
    uc = t["uc"][[i % 2 for i in range(batch)]]
    x_T = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def eps_fn(x, step, s):
        tt = torch.full((x.shape[0],), step, dtype=torch.long)
        with torch.no_grad():
            ec = ld.apply_model(x, tt, c)
            eu = ld.apply_model(x, tt, uc)
        return eu + s * (ec - eu)

    gen = torch.Generator().manual_seed(3)
    samples, _ = DDIMSampler(ld).sample(S=steps, batch_size=batch, shape=[4, 8, 8], conditioning=c,
                                        unconditional_conditioning=uc, unconditional_guidance_scale=scale,
                                        eta=eta, x_T=x_T, verbose=False, generator=gen)
    gen = torch.Generator().manual_seed(3)
    n_steps = len(range(0, 1000, 1000 // steps))  # e.g. 8 for S=7, as the reference grid
    noises = [torch.randn(batch, 4, 8, 8, generator=gen) if eta > 0 else torch.zeros(1) for _ in range(n_steps)]
    expected = _ddim_float64(eps_fn, x_T, ld.alphas_cumprod, steps, eta, scale, noises)
    torch.testing.assert_close(samples, expected, rtol=1e-4, atol=2e-3)


def test_sampling_is_deterministic_with_generator(ddim_case):
    _, t, ld = ddim_case
    kw = dict(S=5, batch_size=2, shape=[4, 8, 8], conditioning=t["c"], unconditional_conditioning=t["uc"],
              unconditional_guidance_scale=6.0, eta=1.0, verbose=False)
    a, _ = DDIMSampler(ld).sample(generator=torch.Generator().manual_seed(42), **kw)
    b, _ = DDIMSampler(ld).sample(generator=torch.Generator().manual_seed(42), **kw)
    c, _ = DDIMSampler(ld).sample(generator=torch.Generator().manual_seed(43), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_plms_rejects_eta(ddim_case):
    _, t, ld = ddim_case
    with pytest.raises(ValueError, match="eta must be 0"):
        PLMSSampler(ld).sample(S=3, batch_size=2, shape=[4, 8, 8], conditioning=t["c"], eta=1.0, verbose=False)


def test_sd_v1_layout_on_meta():
    """LatentDiffusion from v1-inference.yaml has exactly the sd-v1-4.ckpt keys and loads them strictly."""
    ref = json.loads((REF / "sd-v1-keys.json").read_text())
    cfg = OmegaConf.load(ROOT / "configs/stable-diffusion/v1-inference.yaml").model
    with torch.device("meta"):
        ld = instantiate_from_config(cfg)
    got = {k: list(v.shape) for k, v in ld.state_dict().items()}
    assert got == ref["keys"]
    assert list(got) == list(ref["keys"])
    for prefix, n in ref["parameter_count_per_prefix"].items():
        assert sum(p.numel() for name, p in ld.named_parameters() if name.startswith(prefix + ".")) == n, prefix
    assert ld.state_dict()["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    sd = {k: torch.empty(v, device="meta",
                         dtype=torch.int64 if k in ref["non_float32_keys"] else torch.float32)
          for k, v in ref["keys"].items()}
    result = ld.load_state_dict(sd, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_ddim_grid_never_indexes_past_the_schedule():
    """S = 3 makes the reference grid reach t = 999 (+1 = 1000: IndexError upstream); the step is dropped."""
    from ldm.modules.diffusionmodules.util import make_ddim_timesteps

    assert make_ddim_timesteps("uniform", 3, 1000).tolist() == [1, 334, 667]
    assert make_ddim_timesteps("uniform", 7, 1000).tolist() == [1 + 142 * i for i in range(8)]  # reference grid
    assert make_ddim_timesteps("uniform", 50, 1000).tolist() == list(range(1, 1000, 20))
    for s in range(1, 101):
        assert make_ddim_timesteps("uniform", s, 1000).max() < 1000
