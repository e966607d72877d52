"""Prompt sets of the erasure benchmarks: every reader returns a list of ``Row`` (one image each)."""
from __future__ import annotations

from dataclasses import dataclass, field


class PromptSetError(ValueError):
    """A prompt file that cannot be read as the set it was given for (names the file and what is wrong)."""


@dataclass(frozen=True)
class Row:
    """One image of a benchmark: its prompt, the seed of its start noise, and optional per-row settings.

    ``id`` is unique within the set and safe in file names (it names the image and the JSONL record);
    ``guidance``/``height``/``width`` of ``None`` mean the suite's settings; ``meta`` carries what the
    scorer needs (``{"class": "church"}``, ``{"profession": "doctor"}``, ``{"index": 17}``, I2P categories...).
    """
    id: str
    prompt: str
    seed: int
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    meta: dict = field(default_factory=dict, hash=False, compare=True)
