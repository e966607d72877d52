"""SSCD copy detection (Pizzi et al., 2022): descriptors, similarities to a reference, memorization rate.

SSCD (``sscd_imagenet_mixup.torchscript.pt``, a TorchScript ResNet-50 with 512-D descriptors) is loaded
only when asked for, never at import. Preprocessing is SSCD's ``small_288`` recipe with torchvision's
transforms, as SSCD's own code: ``Resize(288)`` (the SHORT side becomes 288, PIL bilinear; the long side
``int(288 * long / short)``), ``ToTensor`` (float CHW in [0, 1]), ImageNet mean/std ``Normalize``.
An image is "memorized" when its cosine similarity to the memorized training image is > 0.5.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from runtime.resources import weights_path

SSCD_FILE = "sscd_imagenet_mixup.torchscript.pt"
SSCD_URL = f"https://dl.fbaipublicfiles.com/sscd-copy-detection/{SSCD_FILE}"
DEFAULT_SSCD_PATH = weights_path(SSCD_FILE)
SSCD_SIZE = 288
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
THRESHOLD = 0.5


def load_sscd(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
              flag: str = "--sscd_ckpt") -> torch.jit.ScriptModule:
    """Load the SSCD TorchScript descriptor model (``None``: ``assets/pretrained_models/{SSCD_FILE}``) through
    :func:`scoring.files.load_torchscript`: a file that is not an intact TorchScript archive is one line naming
    ``flag`` and the file."""
    from scoring import files

    path = Path(DEFAULT_SSCD_PATH if path is None else path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{flag}: SSCD model not found at {path}. The memorization pipeline needs the SSCD copy-detection "
            f"descriptor model {SSCD_FILE} (facebookresearch/sscd-copy-detection); download it from "
            f"{SSCD_URL} into {DEFAULT_SSCD_PATH.parent}/ or pass its path.")
    return files.load_torchscript(path, flag, device)


def check_sscd(path: str | os.PathLike | None = None, flag: str = "--sscd_ckpt", missing: str | None = None) -> Path:
    """The SSCD file a run will use (``None``: the default path), loaded once on the CPU and dropped so that a
    missing, damaged or wrong-kind file fails before any work; the errors of :func:`load_sscd`. ``missing``: what
    to say about a missing file instead of where to get the ablation's SSCD model."""
    path = Path(DEFAULT_SSCD_PATH if path is None else path)
    if missing and not path.is_file():
        raise FileNotFoundError(f"{flag}: SSCD model not found at {path}; {missing}")
    load_sscd(path, "cpu", flag)
    return path


def _resized_size(width: int, height: int, size: int = SSCD_SIZE) -> tuple[int, int]:
    """(W, H) with the short side ``size`` and the long side ``int(size * long / short)`` (torchvision rule)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def preprocess_sscd(image: Image.Image | str | os.PathLike, size: int = SSCD_SIZE) -> torch.Tensor:
    """SSCD ``small_288`` preprocessing: RGB, short side -> ``size`` (bilinear), [0,1] CHW, ImageNet norm."""
    from torchvision import transforms as T

    if not isinstance(image, Image.Image):
        with Image.open(image) as im:
            image = im.convert("RGB")
    else:
        image = image.convert("RGB")
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BILINEAR), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(image)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, RuntimeError):
        return torch.device("cpu")


@torch.no_grad()
def descriptors(model, image_paths: Sequence[str | os.PathLike], batch_size: int = 32,
                device: str | torch.device | None = None) -> torch.Tensor:
    """L2-normalised SSCD descriptors ``[N, D]`` (float32, CPU) of ``image_paths``, in order.

    Images of different sizes are fine: only images with the same preprocessed size are batched.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    paths = [Path(p) for p in image_paths]
    if not paths:
        raise ValueError("no images given")
    device = _model_device(model) if device is None else torch.device(device)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(paths):
        with Image.open(p) as im:  # header only
            groups.setdefault(_resized_size(*im.size), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(paths)
    for indices in groups.values():
        for s in range(0, len(indices), batch_size):
            chunk = indices[s:s + batch_size]
            x = torch.stack([preprocess_sscd(paths[i]) for i in chunk]).to(device)
            d = model(x)
            d = F.normalize(d.reshape(d.shape[0], -1).float(), dim=1).cpu()
            for row, i in enumerate(chunk):
                out[i] = d[row]
    return torch.stack(out)


def similarities(model, image_paths: Sequence[str | os.PathLike], reference_image_path: str | os.PathLike,
                 batch_size: int = 32, device: str | torch.device | None = None) -> torch.Tensor:
    """Cosine similarity ``[N]`` of each image to the reference image (SSCD descriptors)."""
    d = descriptors(model, image_paths, batch_size=batch_size, device=device)
    ref = descriptors(model, [reference_image_path], device=device)[0]
    return d @ ref


def memorization_rate(sims, threshold: float = THRESHOLD) -> float:
    """Share of images whose similarity is > ``threshold`` (memorized); lower is better."""
    sims = torch.as_tensor(sims, dtype=torch.float32).flatten()
    if sims.numel() == 0:
        raise ValueError("memorization_rate of an empty set of similarities")
    return float((sims > threshold).float().mean())


def sscd_memorization_rate(sscd_model, images: Sequence[str | os.PathLike], memorized_image: str | os.PathLike,
                           threshold: float = 0.5, batch_size: int = 32) -> float:
    """Share of ``images`` whose SSCD cosine similarity to ``memorized_image`` is > ``threshold``."""
    images = list(images)
    if not images:
        raise ValueError("no images given")
    return memorization_rate(similarities(sscd_model, images, memorized_image, batch_size=batch_size), threshold)
