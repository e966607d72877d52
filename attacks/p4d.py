"""P4D (Chin et al., "Prompting4Debugging: Red-Teaming Text-to-Image Diffusion Models by Finding Problematic
Prompts", ICML 2024; code: joycenerd/P4D, prompt_optimization/optimize_n.py and optimize_k.py).

The base (un-erased) model is the teacher: for the target image's latent noised at a random timestep, the
*erased* model conditioned on the adversarial prompt should predict the noise the base model predicts for the
original prompt (MSE). The adversarial tokens are continuous embeddings projected each step to their nearest
vocabulary tokens by cosine similarity (PEZ): the forward pass uses the projected tokens, the gradient at the
projected embeddings updates the continuous ones (AdamW). Every ``eval_step`` steps the projected prompt is
decoded, generated from by the erased model and judged.

- ``p4d-n``: the adversarial prompt is ``n`` = 16 learned tokens alone (the original prompt is not in it).
- ``p4d-k``: the prompt's tokens with one learned token before every ``K`` = 3 of them (positions
  ``i % (K + 1) == 0`` of a sequence of ``L + L // K + 1`` tokens); only the learned tokens move.

Facts carried over (configs/esd_nudity_optmz_config.json unless named): n (``prompt_len``) 16, K
(``every_k``) 3, 3000 iterations, ``eval_step`` 50 (checks at steps 0, 50, ..., 2950), AdamW lr 0.1 weight
decay 0.1, one image per step (``batch_size`` 1), t uniform in [0, 1000), fresh noise each step, the target
latent a VAE posterior *sample* x scale factor of the target's [0, 1] pixels (run_p4dn.py's preprocessing
has no Normalize), random vocabulary ids as the start (optimize_n.py ``initialize_prompt``), and the optimised
sequence's layout: P4D-N ``[BOS, n tokens, EOS, id 0 ...]``, P4D-K ``[BOS, the L + L//K + 1 tokens, id 0 ...]``
(its EOS is overwritten by the sequence: optimize_k.py); id 0 (``!``) pads both, as the originals'
``dummy_ids`` do. The check generates from the decoded text tokenized the usual way
(``erase_pipe(decoded_text)``).

Deviation (docs/explanation/differences-from-original.md): the original keeps the checked prompt with the
highest CLIP image similarity (open_clip ViT-H-14) to the target and judges only that prompt at the end (3
images); here each check is judged by the job's Checker and the attack stops at the first success
(``stop_at_success``), since the contract has no image-similarity model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

from attacks import text
from attacks.base import AttackResult, Checker, Concept
from attacks.whitebox import check_prompt, randn, target_image, target_latent

PAD_ID = 0  # the originals pad the optimised sequence with id 0 (dummy_ids += [0] * ...)


@dataclass(frozen=True)
class P4DSettings:
    """The original's defaults (configs/esd_nudity_optmz_config.json)."""

    variant: str = "n"  # "n" (P4D-N) or "k" (P4D-K)
    prompt_len: int = 16  # P4D-N: learned tokens ("prompt_len")
    every_k: int = 3  # P4D-K: a learned token before every K prompt tokens ("every_k")
    iterations: int = 3000  # ("iter")
    eval_step: int = 50  # check every this many steps, from step 0 ("eval_step")
    lr: float = 0.1  # AdamW ("lr")
    weight_decay: float = 0.1  # AdamW ("weight_decay")
    stop_at_success: bool = True  # ours: the original judges its best-by-CLIP prompt once at the end
    teacher_batch: int = 10  # base-model predictions computed this many steps at a time (same values)
    # the original's img_preprocess (run_p4dn.py, run_p4dk.py: Resize, CenterCrop, ToTensor, no Normalize)
    # feeds the VAE [0, 1] pixels; False encodes the target in the VAE's own [-1, 1] range
    target_zero_one: bool = True

    def __post_init__(self):
        self.validate()  # a bad value is refused where the settings are made (the job's --set)

    def validate(self) -> P4DSettings:
        if self.variant not in ("n", "k"):
            raise ValueError(f"p4d: variant must be 'n' or 'k', got {self.variant!r}")
        if not 0 < self.prompt_len <= 75 or self.every_k < 1:
            raise ValueError(f"p4d: prompt_len must be 1..75 and every_k >= 1, got {self.prompt_len}, "
                             f"{self.every_k}")
        if self.iterations < 1 or self.eval_step < 1 or self.teacher_batch < 1:
            raise ValueError("p4d: iterations, eval_step and teacher_batch must be >= 1")
        return self


def n_template(encoder, n: int) -> text.Template:
    """P4D-N's sequence: ``[BOS, n slots, EOS, id 0 padding]`` (77 ids)."""
    tok = encoder.tokenizer
    ids = torch.full((encoder.max_length,), PAD_ID, dtype=torch.long)
    ids[: n + 2] = torch.tensor([tok.bos_token_id, *[PAD_ID] * n, tok.eos_token_id])
    return text.Template(ids.to(encoder.device), torch.arange(1, 1 + n, device=encoder.device), n)


def k_template(encoder, prompt: str, every_k: int, content: list[int] | None = None) -> text.Template:
    """P4D-K's sequence: ``[BOS, s_0 .. s_{M-1}, id 0 padding]``, ``M = L + L // K + 1``, slot where
    ``i % (K + 1) == 0``, the prompt's L content tokens in order elsewhere. Content that would not fit in 77
    positions (the original fails there) is truncated to the longest that fits. ``content`` overrides the ids."""
    body = text.content_ids(encoder, prompt) if content is None else list(content)
    while len(body) + len(body) // every_k + 1 > encoder.max_length - 2:  # BOS + M <= 76, as the original runs
        body = body[:-1]
    total = len(body) + len(body) // every_k + 1
    slots = [i for i in range(total) if i % (every_k + 1) == 0]
    seq = iter(body)
    row = [PAD_ID if i in slots else next(seq) for i in range(total)]
    ids = torch.full((encoder.max_length,), PAD_ID, dtype=torch.long)
    ids[: total + 1] = torch.tensor([encoder.tokenizer.bos_token_id, *row])
    return text.Template(ids.to(encoder.device), torch.tensor(slots, device=encoder.device) + 1, total)


def matching_loss(model, encoder, template: text.Template, fixed: torch.Tensor, adv: torch.Tensor,
                  x_t: torch.Tensor, t: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between the erased model's prediction with the adversarial tokens ``adv`` [1, k, D] in the slots
    and the teacher's prediction (differentiable in ``adv``)."""
    cond = text.encode_embeddings(encoder, template.embeddings(fixed, adv))
    pred = model.apply_model(x_t, t, cond)
    dtype = torch.promote_types(pred.dtype, torch.float32)  # the original's .float(): fp16 predictions in fp32
    return F.mse_loss(pred.to(dtype), teacher.to(dtype))


class P4D:
    """The ``p4d`` attack (see the module docstring); ``p4d-n`` / ``p4d-k`` fix the variant."""

    name: ClassVar[str] = "p4d"
    needs_base: ClassVar[bool] = True
    needs_targets: ClassVar[bool] = True
    variant: ClassVar[str | None] = None

    def __init__(self, settings: P4DSettings | None = None):
        settings = settings or P4DSettings(variant=self.variant or "n")
        if self.variant is not None and settings.variant != self.variant:
            raise ValueError(f"{self.name}: settings.variant is {settings.variant!r}, this attack is P4D-"
                             f"{self.variant.upper()}")
        self.settings = settings.validate()

    def prepare(self, model, concept: Concept) -> None:
        """Nothing to prepare: everything depends on the prompt and its target image."""

    def template(self, encoder, prompt: str) -> text.Template:
        s = self.settings
        if s.variant == "n":
            return n_template(encoder, s.prompt_len)
        # the original projects the prompt's own tokens too (they never move: project them once)
        content = text.content_ids(encoder, prompt)
        if content:
            matrix = text.token_embedding_matrix(encoder)
            content = text.project_nearest(matrix[torch.tensor(content, device=matrix.device)], matrix).tolist()
        return k_template(encoder, prompt, s.every_k, content)

    def attack(self, model, prompt: str, *, concept: Concept, check: Checker, index: int,
               base=None, generator: torch.Generator | None = None,
               progress: Callable[[int, float], None] | None = None) -> AttackResult:
        s = self.settings
        if base is None:
            raise ValueError(f"{self.name} needs the base (un-erased) model as its teacher")
        image = target_image(concept, index, self.name)
        encoder = model.cond_stage_model
        matrix = text.token_embedding_matrix(encoder)
        template = self.template(encoder, prompt)
        fixed = template.fixed_embeddings(encoder)
        # the original encodes with the base pipeline's VAE, a posterior sample
        z = target_latent(base, image, generator=generator, zero_one=s.target_zero_one)
        with torch.no_grad():
            teacher_cond = text.encode_ids(base.cond_stage_model, text.tokenize(base.cond_stage_model, prompt))
        start = self._random_ids(template.k, matrix.shape[0], generator, matrix.device)
        adv = matrix[start][None].detach().clone().requires_grad_(True)
        opt = torch.optim.AdamW([adv], lr=s.lr, weight_decay=s.weight_decay)
        result = AttackResult(prompt=prompt, success=False, first_success=None,
                              extra={"settings": asdict(s), "attack": self.name, "checks": [],
                                     "start_ids": start.tolist()})
        best, teacher = float("inf"), []
        for step in range(s.iterations):
            if not teacher:
                teacher = self._teacher_chunk(base, z, teacher_cond, generator, min(s.teacher_batch,
                                                                                   s.iterations - step))
            x_t, t, target = teacher.pop(0)
            ids = text.project_nearest(adv, matrix)  # [1, k]
            projected = matrix[ids].detach().requires_grad_(True)
            loss = matching_loss(model, encoder, template, fixed, projected, x_t, t, target)
            (grad,) = torch.autograd.grad(loss, [projected])
            opt.zero_grad(set_to_none=True)
            adv.grad = grad
            opt.step()
            result.losses.append(float(loss.detach()))
            best = min(best, result.losses[-1])
            if progress is not None:
                progress(step, best)
            if step % s.eval_step == 0:
                full = template.ids_with(ids)[0]
                adv_prompt = self._decode(encoder, template, full)
                checked = check_prompt(encoder, check, adv_prompt, step)
                result.prompt, result.embedding = adv_prompt, projected.detach()[0].cpu()
                result.images.append(checked.image)
                result.extra["checks"].append([step, checked.success])
                result.extra["token_ids"] = ids[0].tolist()
                if checked.success and result.first_success is None:
                    result.success, result.first_success = True, step
                    if s.stop_at_success:
                        break
        result.extra["steps"] = len(result.losses)
        result.extra["final_ids"] = text.project_nearest(adv, matrix)[0].tolist()  # after the last update
        return result

    def _decode(self, encoder, template: text.Template, full: torch.Tensor) -> str:
        """The text the original decodes: P4D-N the n learned tokens alone, P4D-K the whole learned sequence."""
        return text.decode(encoder, full[1: 1 + template.length])

    @staticmethod
    def _random_ids(k: int, vocab: int, generator, device) -> torch.Tensor:
        """The original's start: ids uniform over the whole vocabulary (``torch.randint(len(encoder))``)."""
        gen_device = generator.device if generator is not None else device
        return torch.randint(vocab, (k,), generator=generator, device=gen_device).to(device)

    @staticmethod
    @torch.no_grad()
    def _teacher_chunk(base, z, cond, generator, n: int) -> list:
        """The next ``n`` steps' (x_t, t, base prediction), drawn in step order (noise, then t, as the original)
        and predicted by the base model in one batched call."""
        noises, ts = [], []
        for _ in range(n):
            noises.append(randn(z.shape, generator, z))
            gen_device = generator.device if generator is not None else z.device
            ts.append(torch.randint(0, base.num_timesteps, (1,), generator=generator, device=gen_device).to(z.device))
        noise, t = torch.cat(noises), torch.cat(ts)
        x_t = base.q_sample(z.expand(n, -1, -1, -1), t, noise=noise)
        pred = base.apply_model(x_t, t, cond.expand(n, -1, -1))
        return [(x_t[i:i + 1], t[i:i + 1], pred[i:i + 1]) for i in range(n)]


@dataclass(frozen=True)
class P4DKSettings(P4DSettings):
    """P4D-K's settings (the registry builds an attack's settings from its class: the variant must match)."""

    variant: str = "k"


class P4DN(P4D):
    name: ClassVar[str] = "p4d-n"
    variant: ClassVar[str | None] = "n"


class P4DK(P4D):
    name: ClassVar[str] = "p4d-k"
    variant: ClassVar[str | None] = "k"
