"""LMS (ldm/models/diffusion/lms.py) against diffusers' LMSDiscreteScheduler, by hand, and in generate_images."""
import json

import numpy as np
import pytest
import torch
from conftest import run_sampler, sampler_case, tiny_factory

from ldm.models.diffusion.ddim import guided_eps
from ldm.models.diffusion.dpmpp import discrete_sigmas
from ldm.models.diffusion.lms import LMSSampler, lms_coefficients, lms_grid
from runtime.generate import Sampling, generate_images

B, SHAPE, SCALE = 2, (4, 8, 8), 6.0


@pytest.fixture(scope="module")
def setup():
    return sampler_case(B, SHAPE)


def _ours(model, x_T, c, uc, steps):
    return run_sampler(LMSSampler, (model, x_T, c, uc), steps, SCALE)


@pytest.mark.parametrize("steps", [1, 2, 5, 20])
def test_matches_diffusers_lms(setup, steps):
    """The independent oracle: diffusers' LMSDiscreteScheduler (SD-v1 schedule, order 4, its numerical
    integration of the coefficients) driven by the same guided UNet from the same start noise, as
    UnlearnDiffAtk's ClassifierTask.sampling drives it (init_noise_sigma, scale_model_input, fractional t)."""
    diffusers = pytest.importorskip("diffusers")
    model, x_T, c, uc = setup
    sched = diffusers.LMSDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           num_train_timesteps=1000)
    sched.set_timesteps(steps)
    timesteps, sigmas = lms_grid(model.alphas_cumprod.numpy(), steps)
    np.testing.assert_allclose(sched.timesteps.numpy(), timesteps, rtol=1e-6)
    np.testing.assert_allclose(sched.sigmas.numpy(), sigmas, rtol=1e-5)
    x = x_T * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            e = guided_eps(model, sched.scale_model_input(x, t), torch.full((B,), float(t)), c, uc, SCALE)
            x = sched.step(e, t, x).prev_sample
    z = _ours(model, x_T, c, uc, steps)
    # measured 0.6e-6 .. 1.7e-6 relative (float32 rounding, numerical vs exact integration); order 1 instead of 4
    # is off by 1e-2
    assert (z - x).abs().max().item() <= 2e-5 * x.abs().max().item()


def test_coefficients_by_hand():
    """Order 1 is Euler (sigma_1 - sigma_0); order 2 by the closed form of the integrated Lagrange basis; at any
    order the weights sum to the step, since the basis polynomials sum to 1."""
    sigmas = np.array([14.6, 9.0, 5.5, 3.1, 1.7, 0.0])
    assert lms_coefficients(sigmas, 0) == pytest.approx([9.0 - 14.6])
    s0, s1, s2 = sigmas[1], sigmas[0], sigmas[2]  # step 1: nodes sigma_1 (newest), sigma_0; to sigma_2
    # l_newest(tau) = (tau - s1) / (s0 - s1): its integral from s0 to s2 is ((s2 - s1)^2 - (s0 - s1)^2) / (2 (s0 - s1))
    newest = ((s2 - s1) ** 2 - (s0 - s1) ** 2) / (2 * (s0 - s1))
    older = ((s2 - s0) ** 2 - 0.0) / (2 * (s1 - s0))
    assert lms_coefficients(sigmas, 1) == pytest.approx([newest, older], rel=1e-12)
    for i in range(len(sigmas) - 1):
        coeffs = lms_coefficients(sigmas, i)
        assert len(coeffs) == min(i + 1, 4)
        assert sum(coeffs) == pytest.approx(sigmas[i + 1] - sigmas[i], rel=1e-12)


def test_grid_and_unet_inputs(setup, monkeypatch):
    """The UNet sees fractional timesteps from 999 down to 0, both CFG halves in one call, and at the first
    step x_T * sigma_max / sqrt(1 + sigma_max^2)."""
    model, x_T, c, uc = setup
    seen = []
    apply = type(model).apply_model
    monkeypatch.setattr(type(model), "apply_model",
                        lambda self, x, t, *a, **k: seen.append((x, t)) or apply(self, x, t, *a, **k))
    _ours(model, x_T, c, uc, 7)
    ts = [t[0].item() for _, t in seen]
    assert [x.shape[0] for x, _ in seen] == [2 * B] * 7
    np.testing.assert_allclose(ts, np.linspace(999, 0, 7), rtol=1e-6)
    assert ts[1] != int(ts[1])  # 832.5: fractional, not rounded to a training timestep
    s = discrete_sigmas(model.alphas_cumprod.numpy())[999]
    torch.testing.assert_close(seen[0][0][:B], x_T * float(s / (1 + s * s) ** 0.5), rtol=1e-6, atol=1e-6)


def test_rejects_eta_and_bad_steps(setup):
    model, x_T, c, uc = setup
    with pytest.raises(ValueError, match="eta must be 0"):
        LMSSampler(model).sample(S=5, batch_size=B, shape=SHAPE, conditioning=c, eta=1.0, x_T=x_T, verbose=False)
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="lms steps"):
            lms_grid(model.alphas_cumprod.numpy(), bad)
    with pytest.raises(ValueError, match="at most 1000"):
        Sampling(sampler="lms", steps=1001).validate()
    Sampling(sampler="lms", steps=37).validate()  # no DDIM grid to fit


def test_generate_images_with_lms(tmp_path):
    """A folder made with lms says so in its plan (eta does not apply), and the images are the sampler's."""
    prompts = ["a photo of a cat", "a red car", "a house"]
    sampling = Sampling(steps=4, batch_size=2, height=16, width=16, seed=3, sampler="lms")
    out = generate_images(tiny_factory, prompts, tmp_path / "a", sampling)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["sampler"] == "lms" and plan["eta"] is None and plan["steps"] == 4
    plms = generate_images(tiny_factory, prompts, tmp_path / "b", Sampling(**{**sampling.__dict__, "sampler": "plms",
                                                                              "eta": 0.0}))
    from PIL import Image

    a, b = ([np.asarray(Image.open(p)) for p in sorted((f / "samples").glob("*.png"))] for f in (out, plms))
    assert len(a) == 3 and any(not np.array_equal(x, y) for x, y in zip(a, b))
