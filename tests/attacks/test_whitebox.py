"""The white-box attacks (UnlearnDiffAtk, P4D-N, P4D-K): their objectives' gradients against finite differences on
a tiny float64 model, the original's simplex projection and layouts, and each attack end to end on the toy world
with a real Checker (DDIM generation + the toy judge), the AttackResult contract and a falling objective."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from attacks import text
from attacks.base import Check, Concept
from attacks.p4d import P4D, P4DK, P4DN, P4DSettings, k_template, matching_loss, n_template
from attacks.unlearndiff import UnlearnDiffAtk, UnlearnDiffSettings, denoising_loss, project_simplex, timesteps

TOY = Path(__file__).resolve().parents[2] / "assets" / "toyworld"
PROMPT = "a painting of a red star on the grass"


# ------------------------------------------------------------------------------------------ objectives
@pytest.fixture(scope="module")
def tiny64():
    """The tiny config in float64, with its inputs (latent, timestep, noise). GroupNorm32 is nn.GroupNorm that
    casts its input to float32; its layers become their parent class so that every op runs in float64."""
    from ldm.modules.diffusionmodules.util import GroupNorm32

    model = tiny_model().double().eval()
    for m in model.modules():
        if isinstance(m, GroupNorm32):
            m.__class__ = torch.nn.GroupNorm
    g = torch.Generator().manual_seed(0)
    z = torch.randn((1, model.channels, model.image_size, model.image_size), generator=g, dtype=torch.float64)
    noise = torch.randn(z.shape, generator=g, dtype=torch.float64)
    return model, z, torch.tensor([400]), noise


def _check_fd(f, x, coords, h=1e-6, rtol=1e-5):
    """Central differences of scalar ``f`` at ``x`` along ``coords`` against autograd (relative to the largest
    gradient entry)."""
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(x), x)
    scale = grad.abs().max().item()
    assert scale > 0
    for c in coords:
        e = torch.zeros_like(x)
        e[c] = h
        with torch.no_grad():
            fd = (f(x + e) - f(x - e)).item() / (2 * h)
        assert abs(fd - grad[c].item()) <= rtol * scale, (c, fd, grad[c].item())


def test_unlearndiff_gradient_matches_finite_differences(tiny64):
    """d loss / d (relaxed one-hot) [k, V]: the gradient the straight-through step feeds the simplex."""
    model, z, t, noise = tiny64
    enc = model.cond_stage_model
    template = text.prefix_template(enc, "a red star", k=2)
    fixed = template.fixed_embeddings(enc)
    ids = torch.tensor([320, 1929])
    one_hot = F.one_hot(ids, text.token_embedding_matrix(enc).shape[0]).double()
    coords = [(0, 320), (1, 1929), (0, 5), (1, 40000), (0, 49407)]
    _check_fd(lambda oh: denoising_loss(model, enc, template, fixed, oh, z, t, noise), one_hot, coords)


def test_p4d_gradient_matches_finite_differences(tiny64):
    """d loss / d (adversarial embeddings) [1, k, D] of the teacher-matching objective."""
    model, z, t, noise = tiny64
    enc = model.cond_stage_model
    template = n_template(enc, 3)
    fixed = template.fixed_embeddings(enc)
    x_t = model.q_sample(z, t, noise)
    with torch.no_grad():
        teacher = model.apply_model(x_t, t, text.encode_ids(enc, text.tokenize(enc, "a red star")))
    adv = text.embed_ids(enc, torch.tensor([[320, 736, 1929]])).detach()
    coords = [(0, 0, 0), (0, 1, 7), (0, 2, 31), (0, 0, 19)]
    _check_fd(lambda a: matching_loss(model, enc, template, fixed, a, x_t, t, teacher), adv, coords)


# ------------------------------------------------------------------------------------------ the originals' pieces
def _exact_projection(v: torch.Tensor) -> torch.Tensor:
    """The Euclidean projection onto the simplex by sorting (Held et al.): the point the bisection brackets."""
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(dim=-1) - 1.0
    ind = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype)
    rho = (u - css / ind > 0).sum(dim=-1, keepdim=True)
    return (v - css.gather(-1, rho - 1) / rho).clamp(min=0.0)


def test_simplex_projection_is_the_originals_point():
    g = torch.Generator().manual_seed(0)
    v = torch.cat([torch.randn(3, 500, generator=g) * 0.1, torch.full((1, 500), 1 / 500),
                   torch.full((1, 500), 1 / 500) - 0.01 * torch.rand(1, 500, generator=g)])
    p = project_simplex(v)
    assert p.shape == v.shape and (p >= 0).all() and (p <= 1).all()
    assert torch.allclose(p.sum(-1), torch.ones(5), atol=1e-3)  # the bisection's tolerance on mu, x the support
    exact = _exact_projection(v)
    assert (p - exact).abs().max() < 2e-5  # within the bisection tolerance of the exact point
    assert torch.equal(p[3], v[3])  # a point of the simplex stays (the original's early exit)
    assert torch.allclose(project_simplex(torch.tensor([[0.5, 0.5, 3.0]])), torch.tensor([[0.0, 0.0, 1.0]]),
                          atol=1e-5)


def test_timesteps_are_the_originals():
    assert timesteps(50) == list(range(10, 1000, 20)) and len(timesteps(50)) == 50
    assert timesteps(1) == [500]


def test_p4d_layouts():
    enc = tiny_model().cond_stage_model
    tok = enc.tokenizer
    n = n_template(enc, 4)
    assert n.ids[:7].tolist() == [tok.bos_token_id, 0, 0, 0, 0, tok.eos_token_id, 0] and n.ids[7:].eq(0).all()
    assert n.slots.tolist() == [1, 2, 3, 4] and n.length == 4
    body = tok.encode("a photo of a red star")  # L = 6, K = 3: M = 6 + 2 + 1 = 9, slots at 0, 4, 8
    assert len(body) == 6
    k = k_template(enc, "a photo of a red star", 3)
    assert k.ids[:10].tolist() == [tok.bos_token_id, 0, *body[:3], 0, *body[3:], 0]
    assert k.ids[10:].eq(0).all() and k.slots.tolist() == [1, 5, 9] and k.length == 9
    long = k_template(enc, " ".join(["star"] * 80), 3)  # the longest body that fits: L + L//3 + 1 <= 75
    assert long.length + 1 <= 76 and long.length == 56 + 56 // 3 + 1
    filled = k.ids_with(torch.tensor([320, 320, 320]))
    assert text.decode(enc, filled[0, 1:1 + k.length]) == "a a photo of a a red star a"


def test_target_latents_are_the_originals():
    """UnlearnDiffAtk: the posterior mean of [-1, 1] pixels; P4D: a posterior sample of [0, 1] pixels (its
    preprocessing has no Normalize), drawn with the attack's generator."""
    from attacks.whitebox import target_latent

    model = tiny_model().eval()
    size = model.first_stage_model.encoder.resolution
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        mean = model.encode_first_stage(x / 127.5 - 1).mode() * model.scale_factor
        post = model.encode_first_stage(x / 255)
        sample = (post.mean + post.std * torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(3)))
    assert torch.allclose(target_latent(model, image), mean, atol=1e-6)
    got = target_latent(model, image, generator=torch.Generator().manual_seed(3), zero_one=True)
    assert torch.allclose(got, sample * model.scale_factor, atol=1e-6)
    assert P4DSettings().target_zero_one


def test_settings_and_inputs_are_vetted():
    with pytest.raises(ValueError, match="criterion"):
        UnlearnDiffAtk(UnlearnDiffSettings(criterion="l3"))
    with pytest.raises(ValueError, match="variant"):
        P4D(P4DSettings(variant="x"))
    with pytest.raises(ValueError, match="P4D-N"):
        P4DN(P4DSettings(variant="k"))
    assert P4DK().settings.variant == "k" and P4DN().settings.prompt_len == 16
    model = tiny_model()
    no_check = _never
    with pytest.raises(ValueError, match="Concept.targets is empty"):
        UnlearnDiffAtk().attack(model, "x", concept=Concept("c"), check=no_check, index=0)
    with pytest.raises(ValueError, match="base"):
        P4DN().attack(model, "x", concept=Concept("c", targets=np.zeros((1, 32, 32, 3), np.uint8)),
                      check=no_check, index=0)


def _never(cond, step):
    raise AssertionError("no generation may happen before the inputs are vetted")


# ------------------------------------------------------------------------------------------ the toy world
class ToyChecker:
    """A real Checker: DDIM (4 steps, eta 0, CFG 6) from a fixed start noise (seed 2: there the base model's
    stripes prompt is judged stripes), judged by the toy judge's style head (success: ``style``). ``rule``
    replaces the judge's verdict by a function of the call number (to steer the contract tests); the image is
    always the real generation."""

    def __init__(self, world, style="stripes", rule=None):
        self.model, self.judge, self.uc = world
        self.style, self.rule, self.calls = style, rule, []

    def generate(self, cond):
        from ldm.models.diffusion.ddim import DDIMSampler

        shape = (self.model.channels, self.model.image_size, self.model.image_size)
        x_T = torch.randn((1, *shape), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            z, _ = DDIMSampler(self.model).sample(
                S=4, batch_size=1, shape=shape, conditioning=cond, unconditional_conditioning=self.uc,
                unconditional_guidance_scale=6.0, eta=0.0, x_T=x_T, verbose=False, progress=False)
            x = ((self.model.decode_first_stage(z) + 1) / 2).clamp(0, 1)
        return (255 * x[0].permute(1, 2, 0).numpy()).astype(np.uint8)

    def __call__(self, cond, step):
        from toyworld.judge import HEADS

        assert cond.shape == (1, 77, self.uc.shape[-1])
        image = self.generate(cond)
        if self.rule is None:
            with torch.no_grad():
                logits = self.judge(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)["style"]
            success = HEADS["style"][int(logits.argmax())] == self.style
        else:
            success = self.rule(len(self.calls))
        self.calls.append((step, success))
        return Check(success, image)


@pytest.fixture(scope="module")
def world():
    from omegaconf import OmegaConf

    from runtime.loading import load_model
    from toyworld.judge import load_judge

    config = OmegaConf.to_container(OmegaConf.load(TOY / "ldm/ldm.yaml").model, resolve=True)
    model = load_model(config, TOY / "ldm/toyworld-ldm.safetensors").eval()
    with torch.no_grad():
        uc = model.get_learned_conditioning([""])
    return model, load_judge(TOY / "judge"), uc


@pytest.fixture(scope="module")
def concept(world):
    """Stripes, with the base model's generation of the prompt in that style as row 0's target image."""
    checker = ToyChecker(world)
    with torch.no_grad():
        target = checker.generate(world[0].get_learned_conditioning([PROMPT + ", in the style of stripes"]))
    return Concept("stripes", targets=target[None])


def assert_contract(result, checker, stop_at_success=True):
    """AttackResult's contract against the checks the attack actually made."""
    assert len(result.images) == len(checker.calls) >= 1
    assert all(im.dtype == np.uint8 and im.shape == (32, 32, 3) for im in result.images)
    assert [list(c) for c in checker.calls] == result.extra["checks"]
    steps = [s for s, _ in checker.calls]
    assert steps == sorted(steps) and steps[0] >= -1 and steps[-1] < max(len(result.losses), 1)
    assert all(np.isfinite(result.losses)) and len(result.losses) == result.extra["steps"]
    hits = [s for s, ok in checker.calls if ok]
    assert result.success == bool(hits)
    assert result.first_success == (hits[0] if hits else None)
    if hits and stop_at_success:
        assert checker.calls[-1] == (hits[0], True)  # stopped at the first success


def test_unlearndiff_end_to_end_and_contract(world, concept):
    model = world[0]
    s = UnlearnDiffSettings(k=3, iterations=2, n_timesteps=3)
    checker = ToyChecker(world, rule=lambda i: False)
    seen = []
    r = UnlearnDiffAtk(s).attack(model, PROMPT, concept=concept, check=checker, index=0,
                                 generator=torch.Generator().manual_seed(0), progress=lambda *a: seen.append(a))
    assert_contract(r, checker)
    assert checker.calls == [(-1, False), (1, False), (3, False), (5, False)]  # the prompt, then each timestep
    assert len(r.losses) == 6 and [a[0] for a in seen] == list(range(6))
    assert [a[1] for a in seen] == list(np.minimum.accumulate(r.losses))
    ids = r.extra["token_ids"]
    assert len(ids) == 3 and all(0 <= i < 49408 for i in ids)
    assert r.prompt == text.decode(model.cond_stage_model, [*ids, *model.cond_stage_model.tokenizer.encode(PROMPT)])

    # success at the 3rd check (2nd timestep): stops there; success before any step: no optimisation at all
    checker = ToyChecker(world, rule=lambda i: i == 2)
    r = UnlearnDiffAtk(s).attack(model, PROMPT, concept=concept, check=checker, index=0,
                                 generator=torch.Generator().manual_seed(0))
    assert_contract(r, checker)
    assert r.first_success == 3 and len(r.losses) == 4
    checker = ToyChecker(world, rule=lambda i: i in (1, 3))  # stop_at_success=False: every step, first hit kept
    r = UnlearnDiffAtk(UnlearnDiffSettings(k=3, iterations=2, n_timesteps=3, stop_at_success=False)).attack(
        model, PROMPT, concept=concept, check=checker, index=0, generator=torch.Generator().manual_seed(0))
    assert_contract(r, checker, stop_at_success=False)
    assert r.first_success == 1 and len(r.losses) == 6 and len(checker.calls) == 4
    checker = ToyChecker(world, rule=lambda i: True)
    r = UnlearnDiffAtk(s).attack(model, PROMPT, concept=concept, check=checker, index=0)
    assert_contract(r, checker)
    assert (r.first_success, r.losses, r.prompt, len(r.images)) == (-1, [], PROMPT, 1)


def test_unlearndiff_is_seeded_and_lowers_its_objective(world, concept):
    """20 steps at t=500 (one timestep): the argmax tokens' loss over 8 fixed noises is 5% below that of the best
    of 4 random token draws (what the uniform start samples); the same generator seed gives the same steps."""
    model = world[0]
    enc = model.cond_stage_model
    runs = [UnlearnDiffAtk(UnlearnDiffSettings(k=5, iterations=n, n_timesteps=1)).attack(
        model, PROMPT, concept=concept, check=ToyChecker(world, rule=lambda i: False), index=0,
        generator=torch.Generator().manual_seed(0)) for n in (20, 4)]
    assert runs[0].losses[:4] == runs[1].losses  # the same draws, step by step
    from attacks.whitebox import target_latent

    z = target_latent(model, concept.targets[0])
    template = text.prefix_template(enc, PROMPT, 5)
    fixed = template.fixed_embeddings(enc)
    noises = torch.randn((8, *z.shape[1:]), generator=torch.Generator().manual_seed(123))

    def loss(ids):
        one_hot = F.one_hot(torch.tensor(ids), 49408).float()
        with torch.no_grad():
            return np.mean([denoising_loss(model, enc, template, fixed, one_hot, z, torch.tensor([500]),
                                           n[None]).item() for n in noises])

    g = torch.Generator().manual_seed(1)
    random = [loss(torch.randint(49408, (5,), generator=g).tolist()) for _ in range(4)]
    assert loss(runs[0].extra["token_ids"]) < 0.95 * min(random), (loss(runs[0].extra["token_ids"]), random)


@pytest.mark.parametrize("cls", [P4DN, P4DK])
def test_p4d_end_to_end_contract_and_falling_objective(world, concept, cls):
    """20 steps, the toy model as both base and attacked model: the final projected tokens match the teacher
    over 20 fixed (t, noise) at least twice as well as the random start; checks at 0, 8, 16."""
    model = world[0]
    enc = model.cond_stage_model
    attack = cls(P4DSettings(variant=cls.variant, iterations=20, eval_step=8))
    checker = ToyChecker(world, rule=lambda i: False)
    r = attack.attack(model, PROMPT, concept=concept, check=checker, index=0, base=model,
                      generator=torch.Generator().manual_seed(0))
    assert_contract(r, checker)
    assert [s for s, _ in checker.calls] == [0, 8, 16] and len(r.losses) == 20
    template = attack.template(enc, PROMPT)
    assert r.embedding.shape == (template.k, 64) and len(r.extra["final_ids"]) == template.k
    full = template.ids_with(torch.tensor(r.extra["token_ids"]))[0]
    assert r.prompt == text.decode(enc, full[1:1 + template.length])
    if cls is P4DK:  # the prompt's own words stay, in order, between the learned tokens
        words = r.prompt.split()
        assert [words[i] for i in range(len(words)) if i % 4] == PROMPT.split()

    from attacks.whitebox import target_latent

    fixed = template.fixed_embeddings(enc)
    matrix = text.token_embedding_matrix(enc)
    z = target_latent(model, concept.targets[0], zero_one=True)  # P4D's [0, 1] pixels (its posterior mean here)
    noises = torch.randn((4, *z.shape[1:]), generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        teacher_cond = text.encode_ids(enc, text.tokenize(enc, PROMPT))

    def loss(ids):
        out = []
        with torch.no_grad():
            for t in (100, 300, 500, 700, 900):
                t = torch.tensor([t])
                for n in noises:
                    x_t = model.q_sample(z, t, n[None])
                    out.append(matching_loss(model, enc, template, fixed, matrix[torch.tensor(ids)][None], x_t, t,
                                             model.apply_model(x_t, t, teacher_cond)).item())
        return np.mean(out)

    assert loss(r.extra["final_ids"]) < 0.5 * loss(r.extra["start_ids"])

    # a success at the second check stops there
    checker = ToyChecker(world, rule=lambda i: i == 1)
    r = attack.attack(model, PROMPT, concept=concept, check=checker, index=0, base=model,
                      generator=torch.Generator().manual_seed(0))
    assert_contract(r, checker)
    assert r.first_success == 8 and len(r.losses) == 9


def test_toy_judge_checker_on_the_base_model(world, concept):
    """The real judge path: the stripes prompt is judged stripes at UnlearnDiffAtk's first check (the base model
    is not erased: success before any step); the plain prompt is not, and the attack runs its steps."""
    checker = ToyChecker(world)
    settings = UnlearnDiffSettings(k=2, iterations=1, n_timesteps=1)
    r = UnlearnDiffAtk(settings).attack(world[0], PROMPT + ", in the style of stripes", concept=concept,
                                        check=checker, index=0)
    assert_contract(r, checker)
    assert r.first_success == -1 and r.losses == []
    checker = ToyChecker(world)
    r = UnlearnDiffAtk(settings).attack(world[0], PROMPT, concept=concept, check=checker, index=0)
    assert_contract(r, checker)
    assert checker.calls[0] == (-1, False) and len(r.losses) == 1 and len(checker.calls) == 2
