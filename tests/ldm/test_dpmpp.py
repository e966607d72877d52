"""DPM-Solver++(2M) (ldm/models/diffusion/dpmpp.py) against diffusers' scheduler, by hand, and in generate_images."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import run_sampler, sampler_case, tiny_factory

from ldm.models.diffusion.ddim import guided_eps
from ldm.models.diffusion.dpmpp import DPMPP2MSampler, linspace_timesteps
from runtime.generate import GenerationPlanError, Sampling, generate_images

B, SHAPE, SCALE = 3, (4, 8, 8), 6.0


@pytest.fixture(scope="module")
def setup():
    return sampler_case(B, SHAPE)


def _ours(model, x_T, c, uc, steps):
    return run_sampler(DPMPP2MSampler, (model, x_T, c, uc), steps, SCALE)


@pytest.mark.parametrize("steps", [1, 2, 5, 20])
def test_matches_diffusers_dpmsolver_multistep(setup, steps):
    """The independent oracle: diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, SD-v1 schedule)
    driven by the same guided UNet from the same start noise."""
    diffusers = pytest.importorskip("diffusers")
    model, x_T, c, uc = setup
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                  beta_schedule="scaled_linear", algorithm_type="dpmsolver++",
                                                  solver_order=2)
    sched.set_timesteps(steps)
    assert np.array_equal(sched.timesteps.numpy(), linspace_timesteps(steps))
    x = x_T * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(guided_eps(model, x, torch.full((B,), int(t)), c, uc, SCALE), t, x).prev_sample
    z = _ours(model, x_T, c, uc, steps)
    # measured 1.0e-4 .. 2.2e-4 on latents of magnitude ~70 (the perturbed tiny UNet's eps is large), i.e. 3e-6
    # relative: float32 rounding of the two formulations (VE scale here, VP there) and of the two schedules
    assert (z - x).abs().max().item() <= 2e-5 * x.abs().max().item()


def test_one_step_is_the_x0_prediction(setup, monkeypatch):
    """By hand: one step from t = 999 to sigma 0 is DDIM's pred_x0 there, (x - sqrt(1 - a) eps) / sqrt(a)."""
    model, x_T, c, uc = setup
    seen = []
    apply = type(model).apply_model
    monkeypatch.setattr(type(model), "apply_model",
                        lambda self, x, t, *a, **k: seen.append((x, t)) or apply(self, x, t, *a, **k))
    z = _ours(model, x_T, c, uc, 1)
    (x_in, t), = seen
    assert t.tolist() == [999] * 2 * B
    # the UNet sees x_T (back from the VE scale: 1 ulp of rounding, which this perturbed UNet amplifies ~30x)
    torch.testing.assert_close(x_in[:B], x_T, rtol=0, atol=1e-6)
    a = float(model.alphas_cumprod[999])
    with torch.no_grad():
        eps = guided_eps(model, x_in[:B], torch.full((B,), 999), c, uc, SCALE)
    torch.testing.assert_close(z, (x_in[:B] - (1 - a) ** 0.5 * eps) / a ** 0.5, rtol=1e-6, atol=1e-5)


def test_one_unet_call_per_step_with_both_cfg_halves(setup, monkeypatch):
    model, x_T, c, uc = setup
    rows = []
    apply = type(model).apply_model
    monkeypatch.setattr(type(model), "apply_model",
                        lambda self, x, *a, **k: rows.append(x.shape[0]) or apply(self, x, *a, **k))
    _ours(model, x_T, c, uc, 7)
    assert rows == [2 * B] * 7


def test_rejects_eta_and_bad_steps(setup):
    model, x_T, c, uc = setup
    with pytest.raises(ValueError, match="eta must be 0"):
        DPMPP2MSampler(model).sample(S=5, batch_size=B, shape=SHAPE, conditioning=c, eta=1.0, x_T=x_T, verbose=False)
    for bad in (0, 1000):
        with pytest.raises(ValueError, match="dpmpp_2m"):
            linspace_timesteps(bad)


def test_sampling_validate_sampler():
    with pytest.raises(ValueError, match="sampler must be one of ddim, plms, dpmpp_2m"):
        Sampling(sampler="euler").validate()
    with pytest.raises(ValueError, match="plms"):
        Sampling(sampler="plms", eta=1.0).validate()
    with pytest.raises(ValueError, match="at most 999"):
        Sampling(sampler="dpmpp_2m", steps=1000).validate()
    with pytest.raises(ValueError, match="uniform DDIM grid"):
        Sampling(sampler="ddim", steps=300).validate()
    Sampling(sampler="dpmpp_2m", steps=300).validate()  # any step count below T


def test_config_rule_for_the_sampler():
    from runtime.cli import UsageError, check_config_values

    check_config_values({"generation": {"sampler": "dpmpp_2m"}})
    with pytest.raises(UsageError, match="generation.sampler='euler'"):
        check_config_values({"generation": {"sampler": "euler"}})


PROMPTS = ["a photo of a cat", "a dog on a beach", "a red car", "a house", "a photo of a cat"]
SAMPLING = Sampling(steps=4, batch_size=2, height=16, width=16, seed=7, sampler="dpmpp_2m")


def _pixels(folder):
    from PIL import Image

    return [np.asarray(Image.open(p)).astype(np.int16) for p in sorted((folder / "samples").glob("*.png"))]


def test_generate_images_plan_seeding_and_refusal(tmp_path):
    out = generate_images(tiny_factory, PROMPTS, tmp_path / "a", SAMPLING)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["sampler"] == "dpmpp_2m" and plan["eta"] is None and plan["steps"] == 4
    # per-image seeds: another batch split gives the same images (up to one 1/255 step of BLAS rounding)
    generate_images(tiny_factory, PROMPTS, tmp_path / "b", replace(SAMPLING, batch_size=3))
    for a, b in zip(_pixels(tmp_path / "a"), _pixels(tmp_path / "b")):
        assert np.abs(a - b).max() <= 1
    # eta does not apply to dpmpp_2m: another eta is the same plan (nothing to do)
    generate_images(tiny_factory, PROMPTS, tmp_path / "a", replace(SAMPLING, eta=0.5))
    # a folder made with DDIM is refused, and the other way round
    generate_images(tiny_factory, PROMPTS, tmp_path / "ddim", replace(SAMPLING, sampler="ddim", steps=2))
    with pytest.raises(GenerationPlanError, match="sampler"):
        generate_images(tiny_factory, PROMPTS, tmp_path / "ddim", replace(SAMPLING, steps=2))
    with pytest.raises(GenerationPlanError, match="sampler"):
        generate_images(tiny_factory, PROMPTS, tmp_path / "a", replace(SAMPLING, sampler="ddim"))
