"""DDIM with per-image CPU generators draws every step's noise up front: the same values as step by step."""
import torch
from conftest import tiny_model

from ldm.models.diffusion.ddim import DDIMSampler, ddim_step, guided_eps


def test_noise_drawn_ahead_equals_step_by_step():
    model = tiny_model().eval()
    B, shape, S, scale = 3, (4, 8, 8), 5, 6.0
    g = torch.Generator().manual_seed(0)
    c, uc = torch.randn(B, 77, 32, generator=g), torch.randn(B, 77, 32, generator=g)
    gens = [torch.Generator().manual_seed(10 + i) for i in range(B)]
    z, _ = DDIMSampler(model).sample(S=S, batch_size=B, shape=shape, conditioning=c, unconditional_conditioning=uc,
                                     unconditional_guidance_scale=scale, eta=1.0, generator=gens, verbose=False)
    # by hand: start noise, then each step's noise from each image's own generator, in step order
    sampler = DDIMSampler(model)
    sampler.make_schedule(S, ddim_eta=1.0, verbose=False)
    gens = [torch.Generator().manual_seed(10 + i) for i in range(B)]
    x = torch.stack([torch.randn(shape, generator=gi) for gi in gens])
    with torch.no_grad():
        for i, step in enumerate(reversed(sampler.ddim_timesteps.tolist())):
            index = S - i - 1
            noise = torch.stack([torch.randn(shape, generator=gi) for gi in gens])
            e = guided_eps(model, x, torch.full((B,), step), c, uc, scale)
            x, _ = ddim_step(x, e, float(sampler.ddim_alphas[index]), float(sampler.ddim_alphas_prev[index]),
                             float(sampler.ddim_sigmas[index]), noise)
    assert torch.equal(z, x)


def test_noise_sampler_is_the_one_source_of_step_noise():
    """A caller's ``noise_sampler`` is asked once per noisy step, in step order, with the current latents;
    the bank and the step-by-step sampler built from the same generators give the default's samples."""
    from ldm.models.diffusion.ddim import generator_noise_sampler, noise_bank_sampler

    model = tiny_model().eval()
    B, shape, S = 2, (4, 8, 8), 4
    c = torch.randn(B, 77, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(S=S, batch_size=B, shape=shape, conditioning=c, eta=1.0, verbose=False, progress=False)
    x_T = torch.randn(B, *shape, generator=torch.Generator().manual_seed(1))
    gens = lambda: [torch.Generator().manual_seed(20 + i) for i in range(B)]  # noqa: E731
    want, _ = DDIMSampler(model).sample(x_T=x_T, generator=gens(), **kw)

    asked = []

    def recording(step, like):
        asked.append((step, tuple(like.shape), like.dtype))
        return inner(step, like)

    for make in (lambda: generator_noise_sampler(gens()),
                 lambda: noise_bank_sampler(gens(), list(range(S)), (B, *shape), "cpu")):
        asked.clear()
        inner = make()
        got, _ = DDIMSampler(model).sample(x_T=x_T, noise_sampler=recording, **kw)
        assert torch.equal(got, want)
        assert asked == [(i, (B, *shape), torch.float32) for i in range(S)]


def test_deterministic_samplers_never_ask_for_noise():
    from ldm.models.diffusion.dpmpp import DPMPP2MSampler
    from ldm.models.diffusion.plms import PLMSSampler

    def refuse(step, like):
        raise AssertionError("a deterministic sampler asked for step noise")

    model = tiny_model().eval()
    c = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(0))
    for cls in (DDIMSampler, PLMSSampler, DPMPP2MSampler):
        cls(model).sample(S=3, batch_size=2, shape=(4, 8, 8), conditioning=c, eta=0.0, verbose=False,
                          progress=False, generator=torch.Generator().manual_seed(1), noise_sampler=refuse)
