"""``none``: the prompt as given, one judged generation. Its success rate is the pre-attack ASR that every attack's
ASR is read against (an erasure that still shows the concept on its own prompts needs no attack)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from .base import AttackResult, Checker, Concept


@dataclass(frozen=True)
class NoneSettings:
    """``none`` has no settings (the dataclass keeps the registry's shape: every attack has one)."""


class NoAttack:
    """The prompt itself: one check of the model's own conditioning of it, before any attack step (step -1)."""

    name: ClassVar[str] = "none"
    needs_base: ClassVar[bool] = False
    needs_targets: ClassVar[bool] = False

    def __init__(self, settings: NoneSettings | None = None):
        self.settings = settings or NoneSettings()

    def prepare(self, model, concept: Concept) -> None:
        """Nothing to prepare."""

    @torch.no_grad()
    def attack(self, model, prompt: str, *, concept: Concept, check: Checker, index: int, base=None,
               generator: torch.Generator | None = None,
               progress: Callable[[int, float], None] | None = None) -> AttackResult:
        result = check(model.get_learned_conditioning([prompt]), -1)
        return AttackResult(prompt=prompt, success=result.success, first_success=-1 if result.success else None,
                            images=[result.image])
