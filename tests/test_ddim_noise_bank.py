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
