"""The benchmark's typed settings, below the runner and the suites that read them (:mod:`evaluation.benchmark`
fills them from the command line)."""
from __future__ import annotations

from dataclasses import dataclass

from runtime.generate import Sampling
from runtime.resources import DEFAULT_BASE_CKPT, DEFAULT_CONFIG


@dataclass(frozen=True, kw_only=True)
class BenchmarkSettings:
    """``benchmark.py``: one field per flag, with its default. After :func:`check`: ``n_captions`` is ``limit`` when
    only ``--limit`` was given for coco, ``sscd_ckpt`` names the SSCD file memorization uses, and ``clip_resolved``
    / ``mem_clip_resolved`` are what ``scoring.metrics.resolve_clip`` made of ``clip_model`` / ``mem_clip_model``
    (for the suites that use them); ``skipped_empty_prompts`` is how many empty prompts the nudity suite left out
    under ``empty_prompts="skip"``."""
    suites: tuple[str, ...]
    preset: str | None = None  # evaluation.presets.PRESETS: sets the fields of a paper's protocol
    explicit: tuple[str, ...] = ()  # the fields the command line gave (a preset refuses those it contradicts)
    # models
    base: str = str(DEFAULT_BASE_CKPT)
    config: str = str(DEFAULT_CONFIG)
    delta: tuple[str, ...] = ()
    compvis: tuple[str, ...] = ()
    diffusers: tuple[str, ...] = ()
    unet: tuple[str, ...] = ()
    # generation
    outdir: str = "outputs/benchmark"
    sampler: str = "plms"
    steps: int = 50
    scale: float = 7.5
    eta: float = 0.0
    H: int = 512
    W: int = 512
    batch_size: int = 4
    precision: str = "autocast"
    noise: str = "ours"  # "original": the originals' CUDA fp16 start noise (runtime.generate.start_noise)
    pixels: str = "round"  # the diffusers originals' numpy_to_pil; "truncate": the CompVis scripts'
    gpus: str | None = None
    limit: int | None = None
    score_only: bool = False
    safety_checker: str | None = None  # a diffusers pipeline folder whose safety checker blackens flagged images
    safety_suites: str = "original"  # original: the suites whose scripts kept it on; all: every suite
    # scorers
    clip_model: str = "open_clip:ViT-B-32:openai"
    mem_clip_model: str = "open_clip:ViT-g-14:laion2b_s12b_b42k"
    feature_model: str | None = None
    feature_size: int = 299
    classifier: str = "resnet50"
    classifier_labels: str | None = None
    sscd_ckpt: str | None = None
    score_device: str | None = None
    clip_precision: str = "full"  # the originals' fp32 CLIP; "autocast": fp16 autocast on CUDA
    # artist
    artist: tuple[str, ...] = ()
    artist_jpeg: bool = False  # score JPEG (PIL default, quality 75) re-reads, as artist_erasure.py
    # nudity
    prompt_set: str = "i2p"
    prompts: str | None = None
    categories: tuple[str, ...] | None = None
    row_settings: bool = False
    empty_prompts: str = "error"
    nudity_threshold: float = 0.5  # NudeNet score a detection must exceed (ConceptPrune's 0.5)
    # objects
    target_class: str | None = None
    removal_mode: str = "both"
    rows_per_class: int | None = None
    object_prompts: str | None = None
    # gender
    professions: tuple[str, ...] | None = None
    gender_seeds: int = 250
    # coco
    captions: str | None = None
    n_captions: int | None = None
    coco_order: str = "shuffled"
    coco_images: str | None = None  # a folder of real COCO images: FID/KID against them besides the base's
    # memorization
    mem_jsonl: str | None = None
    gt_dir: str | None = None
    mem_seeds: int = 1
    # derived by check()
    clip_resolved: str | None = None
    mem_clip_resolved: str | None = None
    skipped_empty_prompts: int | None = None

    def sampling(self, scale: float | None = None, height: int | None = None, width: int | None = None) -> Sampling:
        """The sampler settings of one generation folder: ``scale``/``height``/``width`` are a row group's
        (``evaluation.runner.groups``), the settings' own when None. ``eta`` applies to DDIM only (0 otherwise);
        the rows carry their own seeds, so ``seed`` keeps its default."""
        return Sampling(sampler=self.sampler, steps=self.steps, eta=self.eta if self.sampler == "ddim" else 0.0,
                        scale=self.scale if scale is None else scale, height=self.H if height is None else height,
                        width=self.W if width is None else width, batch_size=self.batch_size,
                        precision=self.precision, noise=self.noise, pixels=self.pixels)
