"""The attack job's typed settings (``attack.py`` fills them from the command line: :mod:`attacks.job`)."""
from __future__ import annotations

from dataclasses import dataclass

from runtime.generate import Sampling
from runtime.resources import DEFAULT_BASE_CKPT, DEFAULT_CONFIG


@dataclass(frozen=True, kw_only=True)
class AttackSettings:
    """``attack.py``: one field per flag, with its default.

    The checking generations default to UnlearnDiffAtk's checker (``ClassifierTask.sampling``): 50 steps, guidance
    7.5 (or the row's ``evaluation_guidance``), seed 0 (or the row's ``evaluation_seed``), 512 px, start noise from
    a CPU generator seeded with it (``noise="ours"`` draws the same), pixels rounded, and its sampler: diffusers'
    LMS scheduler (``lms``, ``ldm/models/diffusion/lms.py``)."""
    attacks: tuple[str, ...]
    concept: str
    # models (benchmark.py's flags)
    base: str = str(DEFAULT_BASE_CKPT)
    config: str = str(DEFAULT_CONFIG)
    delta: tuple[str, ...] = ()
    compvis: tuple[str, ...] = ()
    diffusers: tuple[str, ...] = ()
    unet: tuple[str, ...] = ()
    # prompts
    prompts: str | None = None
    prompt_set: str = "i2p"
    categories: tuple[str, ...] | None = None
    limit: int | None = None
    max_prompt_tokens: int | None = None
    targets: str | None = None
    pairs: str | None = None
    overrides: tuple[str, ...] = ()  # --set NAME.FIELD=VALUE
    attack_seed: int = 0
    # checking generations
    sampler: str = "lms"
    steps: int = 50
    scale: float = 7.5
    eta: float = 0.0
    H: int = 512
    W: int = 512
    seed: int = 0
    precision: str = "autocast"
    noise: str = "ours"
    pixels: str = "round"
    # outputs and devices
    outdir: str = "outputs/attack"
    gpus: str | None = None
    # judges
    classifier: str = "resnet50"
    classifier_labels: str | None = None
    style_classifier: str | None = None
    clip_model: str = "open_clip:ViT-B-32:openai"
    score_device: str | None = None

    def sampling(self, scale: float | None = None) -> Sampling:
        """The checks' sampler settings (``scale``: a row's own guidance; one image per call)."""
        return Sampling(sampler=self.sampler, steps=self.steps, eta=self.eta if self.sampler == "ddim" else 0.0,
                        scale=self.scale if scale is None else float(scale), height=self.H, width=self.W,
                        batch_size=1, seed=self.seed, precision=self.precision, noise=self.noise,
                        pixels=self.pixels)
