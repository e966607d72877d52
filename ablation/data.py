"""Training data for concept ablation: generated anchor images, anchor prompts,
target prompts, the object zoom augmentation and its latent mask.

Item layout of :class:`AblationDataset` (``torch.utils.data.default_collate`` batches it):

* ``image``: float32 ``[3, size, size]`` in ``[-1, 1]`` (``x / 127.5 - 1``). Channels first, ready
  for the VAE; the reference returned HWC and permuted later.
* ``mask``: float32 ``[1, size/f, size/f]`` with ``f = latent_factor`` (8 for SD): 1 where the
  loss counts. All ones except after a zoom-out (scale < 0.6 size), where it covers the pasted
  image minus a one-latent-pixel border. The reference returned ``[64, 64]``.
* ``caption``: the prompt fed to the model being trained: the target prompt in ablation mode, the
  anchor prompt in regularization mode, with the zoom prefix when the augmentation adds one.
* ``caption_anchor`` (ablation mode only): the unmodified anchor prompt, used for the model-based
  target prediction. The reference called this key ``caption_target``.
* ``noise_seed``: an int64 drawn last from the item's generator; the training step seeds this item's
  timestep and noise with it (the reference drew them from the process-wide generator, so its DDP
  ranks, all seeded alike, noised their different images with the same draws). Training is thereby a
  function of the items, not of how they are split into batches or processes.

Randomness: every ``__getitem__`` builds its own ``random.Random`` from the string
``"{seed}|{role}|{stream}|{epoch}|{index}|{draw}"`` (string seeds are hashed with SHA-512 by
``random``, so this is stable across processes and Python hash seeds), where

* ``seed`` is the constructor's ``seed`` (``None`` allowed);
* ``role`` is ``reg`` or ``abl`` (regularization / ablation mode), so the two halves of a
  :class:`PairedDataset` built with the same seed still get independent augmentations;
* ``stream`` is ``torch.initial_seed()`` inside a DataLoader worker (different per worker and per
  epoch, and reproducible when the training script seeds torch) or when ``seed`` is None in the
  main process; otherwise ``"main"``;
* ``epoch`` is set by :meth:`AblationDataset.set_epoch` (0 by default);
* ``draw`` counts how often this index was already read by this dataset object in this process.

So two datasets built with the same ``seed`` give identical items in the same order of reads, while
re-reading an index (next epoch, or the second half of a :class:`PairedDataset`) draws a new
augmentation and a new style template.
"""
from __future__ import annotations

import random
from os import PathLike
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate, get_worker_info

from .prompts import CONCEPT_TYPES, MEMORIZATION_ANCHOR, Concept, parse_caption_target, target_prompt, zoom_prefix

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# Batching: torch's default_collate already stacks tensors and keeps strings as lists, and for
# PairedDataset items (tuples of two dicts) returns ``[reg_batch, ablation_batch]``, the layout the
# reference's regularization training step expects. No custom collate is needed.
collate = default_collate


# ----------------------------------------------------------------------------- file lists

def _resolve(line: str, base_dirs: list[Path], cache: list[Path]) -> Path | None:
    p = Path(line)
    if p.is_absolute():
        return p if p.is_file() else None
    for base in cache + base_dirs:
        candidate = base / p
        if candidate.is_file():
            if base not in cache:
                cache.insert(0, base)
            return candidate
    return None


def read_image_list(images_txt_or_folder: str | PathLike, root: str | PathLike | None = None) -> list[Path]:
    """Image paths from a folder (sorted image files) or from a list file such as ``images.txt``.

    List files hold one path per line (blank lines are skipped). Absolute paths are used as is.
    A relative path is resolved against ``root`` when given; otherwise against the list file's own
    directory and then each of its parents in turn, the first existing file winning. So both
    ``samples/00000.png`` and the reference layout ``data/cat_gen/samples/00000.png`` (written
    relative to the working directory that holds ``data/``) work from any working directory.
    Raises ``FileNotFoundError`` naming the list file and line of the first missing image.
    """
    source = Path(images_txt_or_folder)
    if source.is_dir():
        paths = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not paths:
            raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in folder {source}")
        return paths
    if not source.is_file():
        raise FileNotFoundError(f"image list or folder not found: {source}")
    if root is not None:
        base_dirs = [Path(root)]
    else:
        here = source.resolve().parent
        base_dirs = [here, *here.parents]
    cache: list[Path] = []
    paths = []
    for lineno, raw in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        path = _resolve(line, base_dirs, cache)
        if path is None:
            where = f"relative to {root}" if root is not None else f"relative to {base_dirs[0]} or its parents"
            raise FileNotFoundError(f"{source}, line {lineno}: image {line!r} not found"
                                    + ("" if Path(line).is_absolute() else f" ({where})"))
        paths.append(path)
    if not paths:
        raise ValueError(f"image list has no entries: {source}")
    return paths


def read_captions(caption_txt: str | PathLike, expected: int | None = None) -> list[str]:
    """Captions, one per line, aligned with the image list. Trailing blank lines are ignored; a blank
    line inside the file is an error (it would shift the alignment). ``expected`` checks the count."""
    path = Path(caption_txt)
    if not path.is_file():
        raise FileNotFoundError(f"caption file not found: {path}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise ValueError(f"caption file is empty: {path}")
    for lineno, line in enumerate(lines, 1):
        if not line:
            raise ValueError(f"{path}, line {lineno}: empty caption "
                             "(captions must align one per line with the images)")
    if expected is not None and len(lines) != expected:
        raise ValueError(f"{path} has {len(lines)} captions but there are {expected} images; "
                         f"images.txt and caption.txt must have one line per image")
    return lines


def load_image_captions(images_txt_or_folder: str | PathLike, caption_txt: str | PathLike,
                        root: str | PathLike | None = None) -> tuple[list[Path], list[str]]:
    """``(image paths, anchor captions)`` from an image list/folder and its aligned caption file."""
    images = read_image_list(images_txt_or_folder, root=root)
    return images, read_captions(caption_txt, expected=len(images))


# ----------------------------------------------------------------------------- image pipeline

def center_crop_square(image: Image.Image) -> Image.Image:
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def draw_zoom_scale(size: int, rng: random.Random) -> int:
    """Zoom augmentation scale: with probability 2/3 uniform in ``[size//3, size]`` (zoom-out side),
    else uniform in ``[int(1.2 size), int(1.4 size) - 1]`` (zoom-in); odd values rounded up to even."""
    if rng.randrange(3) < 2:
        scale = rng.randint(size // 3, size)
    else:
        scale = rng.randint(int(1.2 * size), int(1.4 * size) - 1)
    return scale + (scale % 2)


def zoom_branch(scale: int, size: int) -> str:
    """Which of the original's three branches (``finetune_data.py``) a zoom scale takes:
    ``"out"`` (pasted small, caption prefix) only below ``0.6 * size``; ``"in"`` (random crop, prefix)
    above ``size``; ``"plain"`` (the full image, all-ones mask, no prefix) for every scale in between,
    including ``[0.6 size, size)`` -- about 40% of augmented samples at size 512."""
    if scale < 0.6 * size:
        return "out"
    if scale > size:
        return "in"
    return "plain"


def _to_float(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 127.5 - 1.0


def transform_image(image: Image.Image, size: int, rng: random.Random, aug: bool = False, flip_p: float = 0.5,
                    latent_factor: int = 8) -> tuple[np.ndarray, np.ndarray, str]:
    """The image pipeline of the original's finetune_data.py. Returns
    ``(image HWC float32 in [-1,1], mask [size/f, size/f] float32, prefix)``.

    RGB, centre crop to a square, horizontal flip with probability ``flip_p``. With ``aug`` a scale is
    drawn (:func:`draw_zoom_scale`) and, as in the original, one of three branches taken
    (:func:`zoom_branch`):

    * scale < 0.6 size (zoom-out): bicubic resize to the scale and paste, centred at a random position
      that keeps it inside, on a canvas of zeros (grey in [-1,1]); the latent mask is 1 on
      ``[(c - s/2)//f + 1 : (c + s/2)//f - 1]`` on both axes; prefix "a far away " or "very small ".
    * scale > size (zoom-in): bicubic resize to the scale, random ``size`` crop, all-ones mask,
      prefix "zoomed in " or "close up ".
    * otherwise, i.e. every scale in ``[0.6 size, size]``: the plain full image, all-ones mask, no prefix.

    The plain image (also without ``aug``) is resized to ``size`` with LANCZOS (the original used
    bicubic; the maintainer recommends Lanczos, issue #13).

    For tiny test sizes the border rule can leave an empty mask (never for size 512, f = 8); the mask
    then falls back to the pasted region without the border, so the masked loss stays finite.
    """
    image = center_crop_square(image.convert("RGB"))
    if rng.random() < flip_p:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    latent = size // latent_factor
    scale = draw_zoom_scale(size, rng) if aug else size
    branch = zoom_branch(scale, size)
    if branch == "out":
        prefix = zoom_prefix("out", rng)
        half = scale // 2
        cy = rng.randint(half, size - half)
        cx = rng.randint(half, size - half)
        canvas = np.zeros((size, size, 3), dtype=np.float32)
        canvas[cy - half:cy + half, cx - half:cx + half] = _to_float(
            image.resize((scale, scale), resample=Image.Resampling.BICUBIC))
        mask = np.zeros((latent, latent), dtype=np.float32)
        mask[(cy - half) // latent_factor + 1:(cy + half) // latent_factor - 1,
             (cx - half) // latent_factor + 1:(cx + half) // latent_factor - 1] = 1.0
        if not mask.any():
            mask[(cy - half) // latent_factor:-(-(cy + half) // latent_factor),
                 (cx - half) // latent_factor:-(-(cx + half) // latent_factor)] = 1.0
        return canvas, mask, prefix
    if branch == "in":
        prefix = zoom_prefix("in", rng)
        half = size // 2
        cy = rng.randint(half, scale - half)
        cx = rng.randint(half, scale - half)
        big = image.resize((scale, scale), resample=Image.Resampling.BICUBIC)
        array = _to_float(big.crop((cx - half, cy - half, cx + half, cy + half)))
        return array, np.ones((latent, latent), dtype=np.float32), prefix
    array = _to_float(image.resize((size, size), resample=Image.Resampling.LANCZOS))
    return array, np.ones((latent, latent), dtype=np.float32), ""


# ----------------------------------------------------------------------------- datasets

class AblationDataset(Dataset):
    """Generated anchor images with their anchor prompts.

    ``concepts`` (a list of :class:`Concept` or a ``--caption_target`` string) selects ablation mode:
    ``caption`` is the target prompt and ``caption_anchor`` the anchor prompt. ``concepts=None`` is
    regularization mode: ``caption`` is the anchor prompt and there is no ``caption_anchor``.
    ``aug`` enables the object zoom augmentation. See the module docstring for the item layout and
    the seeding scheme.
    """

    def __init__(self, images: Sequence[str | PathLike | Image.Image], anchor_captions: Sequence[str],
                 concept_type: str, concepts: Sequence[Concept] | str | None = None, size: int = 512,
                 aug: bool = False, flip_p: float = 0.5, latent_factor: int = 8, seed: int | None = None):
        if concept_type not in CONCEPT_TYPES:
            raise ValueError(f"unknown concept type {concept_type!r}; expected one of {', '.join(CONCEPT_TYPES)}")
        if isinstance(concepts, str):
            concepts = parse_caption_target(concept_type, concepts)
        if concepts is not None:
            concepts = list(concepts)
            if not concepts:
                raise ValueError("concepts is an empty list; pass None for a regularization dataset")
            for c in concepts:
                ok = {"style": c.anchor is None, "memorization": c.anchor == MEMORIZATION_ANCHOR,
                      "object": c.anchor not in (None, MEMORIZATION_ANCHOR)}[concept_type]
                if not ok:
                    raise ValueError(f"concept {c} does not fit concept type {concept_type!r}")
        if isinstance(anchor_captions, str):
            raise ValueError("anchor_captions must be a list with one caption per image, not a single string")
        if len(images) != len(anchor_captions):
            raise ValueError(f"{len(images)} images but {len(anchor_captions)} anchor captions; they must align")
        if len(images) == 0:
            raise ValueError("no training images")
        if latent_factor < 1 or size % latent_factor or size % 2:
            raise ValueError(f"size {size} must be even and a multiple of latent_factor {latent_factor}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
        self.images = list(images)
        self.anchor_captions = [str(c) for c in anchor_captions]
        self.concept_type = concept_type
        self.concepts = concepts
        self.size = size
        self.aug = aug
        self.flip_p = flip_p
        self.latent_factor = latent_factor
        self.seed = seed
        self.epoch = 0
        self._draws = [0] * len(self.images)

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Make the augmentation depend on the epoch explicitly (useful with a fixed seed)."""
        self.epoch = int(epoch)

    def rng_for(self, index: int) -> random.Random:
        """The per-read random generator (see the module docstring); advances the draw counter."""
        draw = self._draws[index]
        self._draws[index] += 1
        if get_worker_info() is not None or self.seed is None:
            stream = str(torch.initial_seed())
        else:
            stream = "main"
        role = "reg" if self.concepts is None else "abl"
        return random.Random(f"{self.seed}|{role}|{stream}|{self.epoch}|{index}|{draw}")

    def _load(self, index: int) -> Image.Image:
        item = self.images[index]
        if isinstance(item, Image.Image):
            return item.convert("RGB")
        with Image.open(item) as im:
            return im.convert("RGB")

    def __getitem__(self, index: int) -> dict:
        n = len(self.images)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for dataset of {n} images")
        index %= n
        rng = self.rng_for(index)
        anchor = self.anchor_captions[index]
        caption = anchor if self.concepts is None else target_prompt(
            self.concept_type, self.concepts, index, anchor, rng)
        array, mask, prefix = transform_image(self._load(index), self.size, rng, aug=self.aug,
                                              flip_p=self.flip_p, latent_factor=self.latent_factor)
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))),
            "mask": torch.from_numpy(mask)[None],
            "caption": prefix + caption,
        }
        if self.concepts is not None:
            item["caption_anchor"] = anchor
        item["noise_seed"] = rng.getrandbits(62)
        return item


class PairedDataset(Dataset):
    """``(regularization[i], ablation[i])``: the same index in both (the reference's ``--regularization``
    pairing; when both wrap the same images each half gets its own augmentation). Length is the minimum."""

    def __init__(self, regularization: Dataset, ablation: Dataset):
        self.regularization = regularization
        self.ablation = ablation

    def __len__(self) -> int:
        return min(len(self.regularization), len(self.ablation))

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for paired dataset of {len(self)} items")
        return self.regularization[index], self.ablation[index]

    def set_epoch(self, epoch: int) -> None:
        for ds in (self.regularization, self.ablation):
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(epoch)
