"""UnlearnDiffAtk (Zhang et al., "To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still Easy To
Generate Unsafe Images ... For Now", ECCV 2024; code: OPTML-Group/Diffusion-MU-Attack, attacker ``text_grad``).

k adversarial tokens are put before the prompt (``prefix_k``). Each is a distribution over the whole vocabulary
(a point of the probability simplex, initialised uniform); a step samples one token per slot from it
(straight-through: the gradient of the one-hot sample, clipped to [-1, 1], is the distribution's gradient), runs
the *erased* model's denoising loss on the target image's latent noised at one timestep, takes an Adam step and
projects each distribution back onto the simplex. The timesteps are visited in order, 40 steps each; after each
timestep the argmax tokens make the discrete prompt, which is decoded, generated from and judged, and the attack
stops at the first success. Before any step the prompt itself is judged (success there: step -1).

Facts carried over (the original's file in brackets; configs/<concept>/text_grad_esd_*_classifier.json):
k = 5 for nudity, 3 for objects and style [configs]; 40 iterations per timestep [configs ``iteration``]; Adam,
lr 0.01, weight decay 0.1 [configs ``text_grad``]; uniform initialisation (``rand_init`` false)
[src/attackers/text_grad_.py]; timesteps ``range(T // 50 // 2, T, T // 50)[:50]`` = 10, 30, ..., 990, in order
[src/tasks/classifier_.py ``n_samples=50``]; MSE between the noise and the erased model's prediction, fresh
noise each step, the target latent = the VAE posterior *mean* x scale factor [classifier_.py ``get_loss``,
``img2latent``]; the check after each timestep, stopping at the first success [text_grad_.py ``run``]; the
checked generation is of the decoded prompt re-tokenized [classifier_.py ``eval``].
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

from attacks import text
from attacks.base import AttackResult, Checker, Concept
from attacks.whitebox import check_prompt, randn, target_image, target_latent

# k per concept kind in the original's configs (configs/nudity: 5; configs/object, configs/style: 3).
ORIGINAL_K = {"nudity": 5, "object": 3, "style": 3}


@dataclass(frozen=True)
class UnlearnDiffSettings:
    """The original's defaults (configs/nudity/text_grad_esd_nudity_classifier.json; k=3 for objects/style)."""

    k: int = 5  # adversarial tokens, prefix position (insertion_location "prefix_k")
    iterations: int = 40  # optimisation steps per timestep ("iteration")
    n_timesteps: int = 50  # timesteps visited in order (ClassifierTask n_samples)
    lr: float = 0.01  # Adam ("text_grad.lr")
    weight_decay: float = 0.1  # Adam's L2 weight decay ("text_grad.weight_decay")
    rand_init: bool = False  # uniform(0, 1) start projected on the simplex instead of the uniform distribution
    criterion: str = "l2"  # "l2" (MSE) or "l1" ("task.criterion")
    stop_at_success: bool = True  # the original breaks at the first successful check

    @property
    def added_tokens(self) -> int:
        """Tokens the attack adds to a prompt (the job leaves room for them in the text encoder)."""
        return self.k

    def __post_init__(self):
        self.validate()  # a bad value is refused where the settings are made (the job's --set)

    def validate(self) -> UnlearnDiffSettings:
        if not 0 < self.k <= 75:
            raise ValueError(f"unlearndiff: k must be 1..75, got {self.k}")
        if self.iterations < 1 or not 0 < self.n_timesteps <= 500:
            raise ValueError(f"unlearndiff: iterations >= 1 and n_timesteps 1..500 needed, got "
                             f"{self.iterations}, {self.n_timesteps}")
        if self.criterion not in ("l1", "l2"):
            raise ValueError(f"unlearndiff: criterion must be l1 or l2, got {self.criterion!r}")
        return self


def timesteps(n: int, T: int = 1000) -> list[int]:
    """The original's visited timesteps: ``range(T // n // 2, T, T // n)[:n]`` (n=50: 10, 30, ..., 990)."""
    return list(range(T // n // 2, T, T // n))[:n]


def project_simplex(v: torch.Tensor, xi: float = 1e-5) -> torch.Tensor:
    """Each row of ``v`` [k, V] projected onto the probability simplex by the original's rule
    (``TextGrad.bisection`` with eps 1, upper bound 1, tolerance ``xi``), all rows at once.

    A row whose clipped sum is already within ``xi`` of 1 is just clipped to [0, 1]; otherwise the shift mu of
    ``clip(v - mu, 0, 1)`` is bisected on [min(v) - 1, max(v)] until the bracket is at most ``xi`` wide, and
    the last midpoint is used (so the sum is 1 up to the tolerance, as in the original)."""
    clipped = v.clamp(0.0, 1.0)
    done = (clipped.sum(dim=-1) - 1.0).abs() <= xi
    lo, hi = (v - 1.0).amin(dim=-1), v.amax(dim=-1)
    mu = (lo + hi) / 2
    active = ~done & ((hi - lo).abs() > xi)
    while bool(active.any()):
        mid = (lo + hi) / 2
        mu = torch.where(active, mid, mu)
        gap = (v - mid[:, None]).clamp(0.0, 1.0).sum(dim=-1) - 1.0
        hi = torch.where(active & (gap < 0), mid, hi)
        lo = torch.where(active & (gap > 0), mid, lo)
        active = active & (gap != 0) & ((hi - lo).abs() > xi)
    return torch.where(done[:, None], clipped, (v - mu[:, None]).clamp(0.0, 1.0))


def denoising_loss(model, encoder, template: text.Template, fixed: torch.Tensor, one_hot: torch.Tensor,
                   z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, criterion: str = "l2") -> torch.Tensor:
    """The attack's objective: the erased model's noise-prediction error on ``z`` noised at ``t`` with ``noise``,
    conditioned on the prompt whose slots hold ``one_hot`` [k, V] @ the vocabulary embeddings (differentiable
    in ``one_hot``)."""
    adv = (one_hot @ text.token_embedding_matrix(encoder).to(one_hot.dtype))[None]
    cond = text.encode_embeddings(encoder, template.embeddings(fixed, adv))
    pred = model.apply_model(model.q_sample(z, t, noise=noise), t, cond)
    return F.mse_loss(pred, noise) if criterion == "l2" else F.l1_loss(pred, noise)


class UnlearnDiffAtk:
    """The ``unlearndiff`` attack (see the module docstring)."""

    name: ClassVar[str] = "unlearndiff"
    needs_base: ClassVar[bool] = False
    needs_targets: ClassVar[bool] = True

    def __init__(self, settings: UnlearnDiffSettings | None = None):
        self.settings = (settings or UnlearnDiffSettings()).validate()

    def prepare(self, model, concept: Concept) -> None:
        """Nothing to prepare: everything depends on the prompt and its target image."""

    def attack(self, model, prompt: str, *, concept: Concept, check: Checker, index: int,
               base=None, generator: torch.Generator | None = None,
               progress: Callable[[int, float], None] | None = None) -> AttackResult:
        s = self.settings
        image = target_image(concept, index, self.name)  # vetted before any generation
        encoder = model.cond_stage_model
        first = check_prompt(encoder, check, prompt, -1)
        result = AttackResult(prompt=prompt, success=first.success, first_success=-1 if first.success else None,
                              images=[first.image],
                              extra={"settings": asdict(s), "checks": [[-1, first.success]], "steps": 0})
        if first.success and s.stop_at_success:
            return result
        z = target_latent(model, image)
        template = text.prefix_template(encoder, prompt, s.k)
        fixed = template.fixed_embeddings(encoder)
        vocab = text.token_embedding_matrix(encoder).shape[0]
        dist = torch.full((s.k, vocab), 1.0 / vocab, device=z.device)
        if s.rand_init:
            dist = project_simplex(torch.rand(s.k, vocab, generator=generator,
                                              device=generator.device if generator else z.device).to(z.device))
        dist.requires_grad_(True)
        opt = torch.optim.Adam([dist], lr=s.lr, weight_decay=s.weight_decay)
        step, best = -1, float("inf")
        for t_value in timesteps(s.n_timesteps, model.num_timesteps):
            t = torch.full((1,), t_value, device=z.device, dtype=torch.long)
            for _ in range(s.iterations):
                step += 1
                loss = self._step(model, encoder, template, fixed, dist, opt, z, t, generator)
                result.losses.append(loss)
                best = min(best, loss)
                if progress is not None:
                    progress(step, best)
            ids = template.ids_with(dist.detach().argmax(dim=-1))[0]
            adv_prompt = text.decode(encoder, ids)
            checked = check_prompt(encoder, check, adv_prompt, step)
            result.prompt = adv_prompt
            result.images.append(checked.image)
            result.extra["checks"].append([step, checked.success])
            result.extra["token_ids"] = ids[1:1 + s.k].tolist()
            if checked.success and result.first_success is None:
                result.success, result.first_success = True, step
                if s.stop_at_success:
                    break
        result.extra["steps"] = step + 1
        return result

    def _step(self, model, encoder, template, fixed, dist, opt, z, t, generator) -> float:
        """One straight-through step; returns the loss of the sampled tokens."""
        gen_device = generator.device if generator is not None else dist.device
        picks = torch.multinomial(dist.detach().to(gen_device), 1, generator=generator).squeeze(1).to(dist.device)
        one_hot = F.one_hot(picks, dist.shape[1]).to(dist.dtype).requires_grad_(True)
        noise = randn(z.shape, generator, z)
        loss = denoising_loss(model, encoder, template, fixed, one_hot, z, t, noise, self.settings.criterion)
        (grad,) = torch.autograd.grad(loss, [one_hot])
        opt.zero_grad(set_to_none=True)
        dist.grad = F.hardtanh(grad)  # the original's STE backward
        opt.step()
        with torch.no_grad():
            dist.copy_(project_simplex(dist))
        return float(loss.detach())
