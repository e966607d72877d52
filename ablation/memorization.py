"""Memorized-image pipeline: anchor/target prompt selection by SSCD copy detection.

SSCD (:mod:`scoring.sscd`) is loaded only when a stage needs it, never at import (the reference loaded it
at import time, so the file was required even for style/object runs). An image is "memorized" when its
cosine similarity to the memorized training image is > 0.5.

``prepare_memorization_data`` (steps 1-5) writes into ``gen_folder``:

    check/{samples/, images.txt, caption.txt, plan.json}    n_check images per paraphrase (100 steps)
    check/sscd_similarity.txt                               SSCD similarity of each check image
    anchor.txt                                              the anchor prompts (least memorizing)
    target.txt                                              the memorized caption, then the target prompts
    anchor/{samples/, images.txt, caption.txt, plan.json}   train_size // anchor_size images per anchor (200 steps)
    anchor/sscd_similarity.txt
    samples/NNNNN.png, images.txt, caption.txt              the anchor images with similarity <= 0.5 (training data)
    memorization.json                                       the settings the folder was prepared with

Every stage is reused on a rerun once finished. Deliberate differences from the reference: the
kept check images are not copied to ``filtered/`` (nothing reads them; the scores are in
``check/sscd_similarity.txt``), re-reading ``target.txt`` does not duplicate the memorized caption,
the final filtering is not redone on every run, and a folder prepared with other settings raises
instead of being reused silently.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from runtime.cli import RunError
from runtime.files import atomic_target, image_is_complete, read_cache, read_text_lines, sha256_file, write_text_atomic
from runtime.generate import Sampling, check_devices, check_prompts, generate_images
from scoring.sscd import THRESHOLD, load_sscd, memorization_rate, similarities

__all__ = ["select_prompts", "filter_images", "prepare_memorization_data", "MemorizationSettingsError"]


class MemorizationSettingsError(RunError):
    """``gen_folder`` was prepared with different settings, or its ``memorization.json`` is damaged: one line
    naming the folder (train.py prints it and exits 2, ``runtime.cli.exit_on_run_error``)."""


# ---------------------------------------------------------------------------------------- selection
def _as_1d(sims, n: int) -> torch.Tensor:
    sims = torch.as_tensor(sims, dtype=torch.float32).flatten()
    if sims.numel() != n:
        raise ValueError(f"{sims.numel()} similarities for {n} images")
    return sims


def select_prompts(captions_per_image: Sequence[str], sims, anchor_size: int = 10, target_size: int = 3,
                   threshold: float = THRESHOLD) -> tuple[list[str], list[str]]:
    """(anchor prompts, target prompts) from scored check images.

    Per distinct caption, count its images with similarity <= ``threshold`` (not memorized); sort
    the captions by that count, descending (stable: ties keep first-appearance order). Anchors are
    the first ``anchor_size`` (least memorizing), targets the last ``target_size`` (most memorizing).
    """
    captions = list(captions_per_image)
    sims = _as_1d(sims, len(captions))
    if anchor_size < 1 or target_size < 0:
        raise ValueError(f"anchor_size must be >= 1 and target_size >= 0, got {anchor_size}, {target_size}")
    distinct = list(dict.fromkeys(captions))
    need = max(anchor_size, target_size)
    if len(distinct) < need:
        raise ValueError(f"only {len(distinct)} distinct captions among the scored images, need at least "
                         f"{need} (anchor_size={anchor_size}, target_size={target_size})")
    kept = Counter(c for c, s in zip(captions, sims.tolist()) if s <= threshold)
    order = sorted(distinct, key=lambda c: -kept[c])  # sorted() is stable
    anchors = order[:anchor_size]
    targets = order[len(order) - target_size:] if target_size else []
    overlap = set(anchors) & set(targets)
    if overlap:
        warnings.warn(f"{len(overlap)} prompt(s) are both anchor and target (only {len(distinct)} distinct "
                      f"captions for anchor_size={anchor_size} + target_size={target_size})", stacklevel=2)
    return anchors, targets


def filter_images(image_paths: Sequence, captions: Sequence[str], sims,
                  threshold: float = THRESHOLD) -> list[tuple]:
    """The (path, caption) pairs of the images with similarity <= ``threshold`` (not memorized), in order."""
    image_paths, captions = list(image_paths), list(captions)
    if len(image_paths) != len(captions):
        raise ValueError(f"{len(image_paths)} images but {len(captions)} captions")
    sims = _as_1d(sims, len(image_paths))
    return [(p, c) for p, c, s in zip(image_paths, captions, sims.tolist()) if s <= threshold]


# ---------------------------------------------------------------------------------------- pipeline
class _LazySSCD:
    """Loads SSCD on first use, so finished stages never need the file."""

    def __init__(self, path, device):
        self.path, self.device, self.model = path, device, None

    def __call__(self):
        if self.model is None:
            self.model = load_sscd(self.path, self.device)
        return self.model


def _read_similarities(path: Path) -> torch.Tensor:
    """The similarities cached by :func:`_scored`, one finite number per line; raises when the file is damaged."""
    sims = torch.tensor([float(v) for v in read_text_lines(path)], dtype=torch.float32)
    if not torch.isfinite(sims).all():
        raise ValueError("non-finite similarity")
    return sims


def _scored(lazy: _LazySSCD, folder: Path, mem_image: Path) -> tuple[list[Path], list[str], torch.Tensor]:
    """(image paths, captions, similarities) of a generated folder; similarities cached next to it."""
    names = read_text_lines(folder / "images.txt")
    captions = read_text_lines(folder / "caption.txt")
    paths = [folder / n for n in names]
    cache = folder / "sscd_similarity.txt"
    cached = read_cache(cache, _read_similarities, "the SSCD similarity cache")
    if cached is not None and len(cached) == len(paths):  # another count: the folder changed, score it again
        return paths, captions, cached
    sims = similarities(lazy(), paths, mem_image)
    write_text_atomic(cache, "".join(f"{s:.6f}\n" for s in sims.tolist()))
    return paths, captions, sims


def _final_done(gen: Path) -> bool:
    images_txt, caption_txt = gen / "images.txt", gen / "caption.txt"
    if not (images_txt.exists() and caption_txt.exists()):
        return False
    names = read_text_lines(images_txt)
    return (len(names) == len(read_text_lines(caption_txt)) and len(names) > 0
            and all(image_is_complete(gen / n) for n in names))


def prepare_memorization_data(model_factory: Callable, sscd_path: str | os.PathLike | None,
                              mem_image: str | os.PathLike, paraphrases: Sequence[str],
                              gen_folder: str | os.PathLike, caption_target: str, train_size: int, *,
                              sampling: Sampling = Sampling(), n_check: int = 5, check_steps: int = 100,
                              anchor_size: int = 10, target_size: int = 3, threshold: float = THRESHOLD,
                              devices: Sequence[str] | str = ("cpu",),
                              sscd_device: str | torch.device | None = None) -> tuple[Path, Path, list[str]]:
    """check set -> SSCD scoring -> anchor/target prompts -> anchor set -> filtering.

    Returns ``(gen/images.txt, gen/caption.txt, [caption_target, t1, ..., t_target_size])``; the
    trainer turns the caption list into ``*+X`` memorization concepts. Finished stages are reused.
    ``sampling`` makes the anchor set (the trainer's ``generation`` settings); the check set that scores the
    paraphrases is the same with ``check_steps`` DDIM steps, as in the paper. ``sscd_device`` defaults to the
    first of ``devices``. Raises ``ValueError``/``TypeError`` (arguments), ``FileNotFoundError`` (``mem_image``)
    and ``MemorizationSettingsError`` (a folder prepared with other settings).
    """
    gen = Path(gen_folder)
    mem_image = Path(mem_image)
    if not mem_image.is_file():
        raise FileNotFoundError(f"memorized image {mem_image} not found")
    if isinstance(paraphrases, str):
        raise TypeError("paraphrases must be a list of prompts, not a single string")
    cleaned = [p.strip() for p in paraphrases if p.strip()]
    distinct = list(dict.fromkeys(cleaned))
    if len(distinct) != len(cleaned):
        warnings.warn(f"{len(cleaned) - len(distinct)} duplicate paraphrase(s) dropped", stacklevel=2)
    if not caption_target or "\n" in caption_target:
        raise ValueError(f"caption_target must be a non-empty single-line caption, got {caption_target!r}")
    if len(distinct) < max(anchor_size, target_size):
        raise ValueError(f"{len(distinct)} distinct paraphrases, need at least max(anchor_size={anchor_size}, "
                         f"target_size={target_size})")
    if anchor_size < 1 or train_size < 1 or train_size % anchor_size:
        raise ValueError(f"train_size ({train_size}) must be a positive multiple of anchor_size ({anchor_size}): "
                         f"each anchor prompt gets train_size // anchor_size images")
    if n_check < 1:
        raise ValueError(f"n_check must be >= 1, got {n_check}")
    check_sampling = replace(sampling, sampler="ddim", steps=check_steps)
    check_prompts(distinct)
    check_sampling.validate()
    devices = check_devices(devices)
    sampling.validate()

    s = sampling
    settings = {"version": 1, "caption_target": caption_target, "mem_image_sha256": sha256_file(mem_image),
                "paraphrases": distinct, "n_check": n_check, "check_steps": check_steps,
                "anchor_steps": s.steps, "anchor_size": anchor_size, "target_size": target_size,
                "threshold": float(threshold), "train_size": train_size, "seed": s.seed, "height": s.height,
                "width": s.width, "eta": float(s.eta), "scale": float(s.scale)}
    settings_file = gen / "memorization.json"
    if settings_file.exists():
        try:  # the folder's identity: when it cannot be read, nothing in the folder can be trusted
            old = json.loads(settings_file.read_text(encoding="utf-8"))
            if not isinstance(old, dict):
                raise ValueError(f"a JSON {type(old).__name__}, not an object")
        except (UnicodeDecodeError, ValueError) as e:
            raise MemorizationSettingsError(f"{settings_file} is unreadable ({type(e).__name__}: {e}); delete {gen} "
                                            f"or use another folder") from None
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise MemorizationSettingsError(
                f"{gen} was prepared with different settings (differs in: {', '.join(diff)}); "
                f"delete it or use another folder")
    gen.mkdir(parents=True, exist_ok=True)
    write_text_atomic(settings_file, json.dumps(settings, indent=1) + "\n")
    lazy = _LazySSCD(sscd_path, sscd_device if sscd_device is not None else devices[0])

    # 1-2. check set, scoring, anchor/target prompts
    anchor_txt, target_txt = gen / "anchor.txt", gen / "target.txt"
    if anchor_txt.exists() and target_txt.exists():
        anchors = read_text_lines(anchor_txt)
        lines = read_text_lines(target_txt)
        if not lines or lines[0] != caption_target or len(anchors) != anchor_size or len(lines) - 1 != target_size:
            raise MemorizationSettingsError(f"{anchor_txt}/{target_txt} do not match caption_target, anchor_size "
                                            f"and target_size; delete them to redo the prompt selection")
        targets = lines[1:]  # the first line is the memorized caption itself: do not add it twice
    else:
        check_set = [p for p in distinct for _ in range(n_check)]
        generate_images(model_factory, check_set, gen / "check", check_sampling, devices=devices,
                        desc="memorization check set")
        _, captions, sims = _scored(lazy, gen / "check", mem_image)
        anchors, targets = select_prompts(captions, sims, anchor_size, target_size, threshold)
        print(f"check set: memorization rate {memorization_rate(sims, threshold):.3f}; "
              f"anchors: {anchors}; targets: {targets}")
        write_text_atomic(target_txt, "".join(t + "\n" for t in [caption_target, *targets]))
        write_text_atomic(anchor_txt, "".join(a + "\n" for a in anchors))  # written last: marks the stage done

    # 3. anchor set
    per_anchor = train_size // anchor_size
    anchor_prompts = [a for a in anchors for _ in range(per_anchor)]
    generate_images(model_factory, anchor_prompts, gen / "anchor", sampling, devices=devices,
                    desc="memorization anchor set")

    # 4. final filtering into gen/samples
    images_txt, caption_txt = gen / "images.txt", gen / "caption.txt"
    if _final_done(gen):
        print(f"{gen}: filtered training set already prepared")
    else:
        paths, captions, sims = _scored(lazy, gen / "anchor", mem_image)
        kept = filter_images(paths, captions, sims, threshold)
        if not kept:
            raise RuntimeError(f"all {len(paths)} anchor images are memorized (SSCD similarity > {threshold}); "
                               f"no training data left")
        samples = gen / "samples"
        samples.mkdir(exist_ok=True)
        keep_names = {p.name for p, _ in kept}
        for old in samples.glob("*.png"):
            if old.name not in keep_names:
                old.unlink()
        for p, _ in kept:
            dst = samples / p.name
            if not image_is_complete(dst):
                with atomic_target(dst, "images") as tmp:
                    shutil.copyfile(p, tmp)
        write_text_atomic(caption_txt, "".join(c + "\n" for _, c in kept))
        write_text_atomic(images_txt, "".join(f"samples/{p.name}\n" for p, _ in kept))
        print(f"{gen}: kept {len(kept)} of {len(paths)} anchor images "
              f"(memorization rate {memorization_rate(sims, threshold):.3f})")

    # 5. ablation targets: the memorized caption and the most-memorizing paraphrases
    return images_txt, caption_txt, [caption_target, *targets]
