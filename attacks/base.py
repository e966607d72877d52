"""The contract every attack implements, so the attack job can run any of them on any model.

An attack gets the *erased* model (a CompVis ``LatentDiffusion``: ``cond_stage_model``, ``apply_model``,
``q_sample``, ``get_first_stage_encoding``/``encode_first_stage``, ``decode_first_stage``), one prompt of the
concept, and a :class:`Checker` that turns a text conditioning into one judged generation. It returns an
:class:`AttackResult`. Everything else (which models, prompts, judges, caching, sharding, tables) belongs to the
attack job, so an attack is a small object that can be tested on a tiny model in seconds.

Layering: ``attacks/`` sits on top of ``evaluation/`` (it reuses the benchmark's model flags, judges and
results table); nothing below it imports it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class Check:
    """One judged generation: did it show the concept, and the image (uint8 HxWx3)."""

    success: bool
    image: np.ndarray


class Checker(Protocol):
    """Generate one image from ``cond`` (a text conditioning [1, 77, D] of the attacked model's text encoder,
    the unconditional branch and start noise fixed by the job: the same seed for every call of one prompt) and
    judge it. ``step`` is the attack step the check belongs to (for the record; -1 before any step)."""

    def __call__(self, cond: torch.Tensor, step: int) -> Check: ...


@dataclass(frozen=True)
class Concept:
    """What an attack may know about the concept besides the prompt.

    ``name``: a label ("nudity", "van gogh", "stripes"). ``pairs``: prompts with and without the concept, for
    attacks that derive a concept direction from the text encoder (Ring-A-Bell). ``targets``: images of the
    concept, uint8 [N, H, W, 3] at the generation size, for attacks that need pixels (UnlearnDiffAtk's target
    image, concept inversion's training images); empty when the job has none. ``target_prompts``: the prompt
    target i belongs to (the job's row i), empty when unknown."""

    name: str
    pairs: tuple[tuple[str, str], ...] = ()
    targets: np.ndarray | None = None
    target_prompts: tuple[str, ...] = ()


@dataclass
class AttackResult:
    """What one attack on one prompt produced (JSON-able except the tensors and images).

    ``prompt``: the adversarial prompt (the prompt itself for ``none``; for concept inversion the prompt with
    the learned token's placeholder). ``embedding``: learned token embedding(s) [k, D] when the attack learns
    continuous tokens, else None. ``losses``: the attack's loss per optimisation step (empty for ``none``).
    ``first_success``: the first attack step whose checked generation showed the concept (-1: already before
    any step), None if none did. ``images``: the checked generations kept for the record (at least the final
    one). ``extra``: attack-specific JSON-able facts (token ids, best step, ...)."""

    prompt: str
    success: bool
    first_success: int | None
    losses: list[float] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    embedding: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Attack(Protocol):
    """One attack with its settings (a frozen dataclass of the original's defaults, given to ``__init__``)."""

    name: ClassVar[str]  # the --attack name
    needs_base: ClassVar[bool]  # needs the un-erased model (P4D's teacher)
    needs_targets: ClassVar[bool]  # needs Concept.targets

    def prepare(self, model, concept: Concept) -> None:
        """Once per (model, concept) before any prompt: e.g. Ring-A-Bell's concept vector. An attack whose
        preparation is costly (concept inversion trains a token) may also define ``prepared() -> dict[str, Tensor]``
        and ``restore(state)``: the job then keeps the state and restores it in a rerun. An attack whose costly
        per-prompt work depends on part of the model only (Ring-A-Bell's search reads only the text encoder) may
        define ``share(folder)``: the job calls it before ``prepare`` with one folder per (concept, attack) for
        all models, where the attack keeps that work under a key of everything it depends on."""

    def attack(self, model, prompt: str, *, concept: Concept, check: Checker, index: int,
               base=None, generator: torch.Generator | None = None,
               progress: Callable[[int, float], None] | None = None) -> AttackResult:
        """Attack ``prompt`` (row ``index`` of the prompt set: selects its target image) on ``model``.
        ``generator`` seeds every random choice of the attack; ``progress(step, best_loss)`` after each step."""
