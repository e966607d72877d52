"""diffusers' Stable Diffusion safety checker, read from a diffusers pipeline folder the user has.

The original ConceptPrune benchmark scripts build their pipelines with ``StableDiffusionPipeline.from_pretrained``,
which keeps the checker on: every image it flags comes back black (all zeros). We cannot ship the checker's
weights, so it is an option (``benchmark.py --safety_checker PIPELINE_DIR``); this module loads and runs it:

* :func:`check_folder` vets ``PIPELINE_DIR`` (``safety_checker/`` with a config and weights,
  ``feature_extractor/`` with ``preprocessor_config.json``) without loading weights: one-line ``ValueError``;
* :func:`load_safety_checker` loads ``StableDiffusionSafetyChecker`` (diffusers) and ``CLIPImageProcessor``
  (transformers) from it, offline;
* :meth:`SafetyChecker.flags` says which images the checker flags, as the pipelines' ``run_safety_checker``
  does (the feature extractor on the PIL images, then the checker on its pixel values).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

CHECKER_DIR, EXTRACTOR_DIR = "safety_checker", "feature_extractor"
_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors", "pytorch_model.fp16.bin",
                 "model.safetensors.index.json", "pytorch_model.bin.index.json")


def check_folder(folder: str | os.PathLike, flag: str = "--safety_checker") -> Path:
    """``folder`` as a Path if it holds the checker and its feature extractor as a diffusers pipeline folder does;
    else ValueError naming ``flag``, the folder and what is missing. Reads no weights."""
    p = Path(folder)
    if not p.is_dir():
        raise ValueError(f"{flag} {folder}: not a folder (a diffusers Stable Diffusion pipeline folder with "
                         f"{CHECKER_DIR}/ and {EXTRACTOR_DIR}/)")
    checker, extractor = p / CHECKER_DIR, p / EXTRACTOR_DIR
    if not (checker / "config.json").is_file():
        raise ValueError(f"{flag} {folder}: no {CHECKER_DIR}/config.json (the pipeline was saved without its "
                         f"safety checker?)")
    if not any((checker / n).is_file() for n in _WEIGHT_NAMES):
        raise ValueError(f"{flag} {folder}: no weights in {CHECKER_DIR}/ (looked for {', '.join(_WEIGHT_NAMES[:2])})")
    if not (extractor / "preprocessor_config.json").is_file():
        raise ValueError(f"{flag} {folder}: no {EXTRACTOR_DIR}/preprocessor_config.json (the checker's image "
                         f"preprocessing)")
    return p


def identity(folder: str | os.PathLike) -> dict:
    """Path, and name/size/mtime of the files of the checker and its extractor (cache keys see a changed file)."""
    p = Path(folder).resolve()
    files = sorted(f for d in (CHECKER_DIR, EXTRACTOR_DIR) if (p / d).is_dir() for f in (p / d).iterdir()
                   if f.is_file())
    return {"path": str(p), "files": [{"name": str(f.relative_to(p)), "size": f.stat().st_size,
                                       "mtime_ns": f.stat().st_mtime_ns} for f in files]}


class SafetyChecker:
    """A loaded checker: :meth:`flags` of images. Built by :func:`load_safety_checker`."""

    def __init__(self, model, processor, device: str, folder: str):
        self.model, self.processor, self.device, self.folder = model, processor, device, folder

    def flags(self, images: Sequence, batch_size: int = 16) -> list[bool]:
        """Whether the checker flags each image (PIL images, uint8 HxWx3 arrays or image paths)."""
        import torch
        from PIL import Image

        out: list[bool] = []
        for start in range(0, len(images), batch_size):
            batch = [_pil(x, Image) for x in images[start:start + batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt").pixel_values
            arrays = [np.asarray(x, dtype=np.float32) / 255.0 for x in batch]
            with torch.no_grad():
                _, flagged = self.model(clip_input=pixels.to(self.device, self.model.dtype), images=arrays)
            out += [bool(f) for f in flagged]
        return out


def _pil(x, Image):
    if isinstance(x, (str, os.PathLike)):
        with Image.open(x) as im:
            return im.convert("RGB")
    return x.convert("RGB") if isinstance(x, Image.Image) else Image.fromarray(np.asarray(x, dtype=np.uint8))


def load_safety_checker(folder: str | os.PathLike, device: str = "cpu", flag: str = "--safety_checker"
                        ) -> SafetyChecker:
    """The checker of a diffusers pipeline folder, in fp32 on ``device``, offline. ValueError (one line) when the
    folder is not usable or its files do not load."""
    p = check_folder(folder, flag)
    try:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor
    except ImportError as e:
        raise ImportError(f"{flag} needs the diffusers and transformers packages ({e})") from None
    try:
        model = StableDiffusionSafetyChecker.from_pretrained(str(p / CHECKER_DIR), local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(str(p / EXTRACTOR_DIR), local_files_only=True)
    except Exception as e:  # transformers/diffusers raise many types for damaged or foreign files
        reason = " ".join(str(e).split())[:300]
        raise ValueError(f"{flag} {folder}: the safety checker does not load ({type(e).__name__}: {reason})") from None
    return SafetyChecker(model.float().to(device).eval(), processor, device, str(p))
