"""Top-1 image classifier for the object-erasure suite (ConceptPrune's ``benchmarking/object_erase.py``).

The original classifies each generated image with torchvision's ResNet-50 ``ResNet50_Weights.DEFAULT``
(= ``IMAGENET1K_V2``), preprocessed by the weights' own transforms (``IMAGENET1K_V2.transforms()``: resize
the short side to 232, bilinear with antialias, center crop 224, ``[0, 1]``, ImageNet mean/std), takes the
top-1 class index, maps it to ``weights.meta["categories"]`` and lowercases it; a hit is when that name
EQUALS the prompt row's class name lowercased (``label in [top1]``).

Protocol: a classifier is any object with ``classify(paths, batch_size=32) -> list[str]`` returning, per
image file, the lowercased top-1 class name. :func:`load_classifier` returns such an object for

* ``"resnet50"``: torchvision ``resnet50`` with the ``IMAGENET1K_V2`` weights, from torch hub's cache
  (``$TORCH_HOME/hub/checkpoints/resnet50-11ad3fa6.pth``, i.e. ``torch.hub.get_dir()/checkpoints``),
  downloaded by torchvision only when missing and downloading is allowed;
* a ``.pth`` / ``.pt`` file holding such a ResNet-50 state dict;
* any other file: a TorchScript classifier (``torch.jit.load``) taking the same preprocessed batch
  ``[B, 3, 224, 224]`` and returning logits ``[B, C]``; its class names are ``labels`` (a text file, one
  name per line) or, by default, the 1000 ImageNet categories;
* an object that already has a ``classify`` method (e.g. the toy world's judge wrapper): returned as is.

Every loading error (missing weights, bad labels file, logits not matching the names) is raised here, in
setup, before any generation.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["RESNET50_SPEC", "TopOneClassifier", "load_classifier", "resnet50_weights_file", "imagenet_categories",
           "offline"]

RESNET50_SPEC = "resnet50"
_OFFLINE_VARS = ("TORCH_HUB_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline() -> bool:
    """True when the environment asks for no network (``TORCH_HUB_OFFLINE``, ``HF_HUB_OFFLINE`` or
    ``TRANSFORMERS_OFFLINE`` set to 1/true/yes/on)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in _OFFLINE_VARS)


def _weights():
    from torchvision.models import ResNet50_Weights

    return ResNet50_Weights.IMAGENET1K_V2


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names of ``ResNet50_Weights.IMAGENET1K_V2.meta["categories"]`` (no weights needed)."""
    return list(_weights().meta["categories"])


def resnet50_weights_file() -> Path:
    """Where torchvision keeps the IMAGENET1K_V2 weights: ``torch.hub.get_dir()/checkpoints/resnet50-11ad3fa6.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(_weights().url)


def _read_labels(path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} not found (one class name per line)")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"labels file {path} holds no class names")
    return names


def _load_state_dict(path: Path) -> dict:
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return sd


class TopOneClassifier:
    """``model`` (logits ``[B, C]``) with the IMAGENET1K_V2 preprocessing; ``classify`` gives lowercased top-1
    names."""

    def __init__(self, model, categories: Sequence[str], device: str | torch.device = "cpu", name: str = ""):
        self.model, self.categories, self.device, self.name = model, list(categories), torch.device(device), name
        self.preprocess = _weights().transforms()

    def _load(self, path) -> torch.Tensor:
        from PIL import Image

        with Image.open(path) as im:
            return self.preprocess(im.convert("RGB"))

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x.to(self.device))
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != len(self.categories):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"classifier {self.name or ''} returned {shape}; expected logits [B, "
                             f"{len(self.categories)}] for its {len(self.categories)} class names")
        return out.float()

    def classify(self, paths: Sequence[str | os.PathLike], batch_size: int = 32) -> list[str]:
        """Lowercased top-1 class name of each image file, in order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        paths = [Path(p) for p in paths]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"image {p} not found")
        out: list[str] = []
        for s in range(0, len(paths), batch_size):
            x = torch.stack([self._load(p) for p in paths[s:s + batch_size]])
            top = self.logits(x).argmax(dim=1).tolist()
            out.extend(self.categories[i].lower() for i in top)
        return out


def _resnet50_state_dict(download: bool | None) -> dict:
    path = resnet50_weights_file()
    if path.is_file():
        return _load_state_dict(path)
    allowed = (not offline()) if download is None else bool(download)
    hint = (f"torchvision's ResNet-50 IMAGENET1K_V2 weights {path.name} are not in {path.parent}/ "
            f"($TORCH_HOME/hub/checkpoints/, TORCH_HOME defaulting to ~/.cache/torch). Download "
            f"{_weights().url} there once where there is network access, or pass the file's path as the "
            f"classifier")
    if not allowed:
        raise FileNotFoundError(hint + " (downloading is off here)")
    try:
        return _weights().get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # offline: urllib errors of many kinds
        raise RuntimeError(f"{hint} ({type(e).__name__}: {e})") from None


def load_classifier(spec="resnet50", device: str | torch.device = "cpu", labels: str | os.PathLike | None = None,
                    download: bool | None = None):
    """The object suite's classifier (see the module docstring for ``spec``). ``labels``: class names for a
    ``.pth`` / TorchScript classifier (default: the ImageNet categories). ``download``: may torchvision
    fetch the resnet50 weights when they are not cached (None: yes unless :func:`offline`)."""
    if hasattr(spec, "classify") and callable(spec.classify):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"classifier must be 'resnet50', a weights / TorchScript path, or an object with "
                        f"classify(paths); got {type(spec).__name__}")
    name = os.fspath(spec)
    categories = _read_labels(labels) if labels is not None else imagenet_categories()
    from torchvision.models import resnet50

    if name == RESNET50_SPEC:
        if labels is not None:
            raise ValueError("labels are for a classifier file; 'resnet50' uses the ImageNet categories")
        model = resnet50()
        model.load_state_dict(_resnet50_state_dict(download))
        return TopOneClassifier(model.eval().to(device), categories, device, "resnet50 IMAGENET1K_V2")
    path = Path(name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"classifier {name!r} is neither 'resnet50' nor an existing file")
    if path.suffix in (".pth", ".pt") and not _is_torchscript(path):
        model = resnet50(num_classes=len(categories))
        try:
            model.load_state_dict(_load_state_dict(path))
        except RuntimeError as e:
            raise ValueError(f"{path} is not a ResNet-50 state dict for {len(categories)} classes: {e}") from None
        return TopOneClassifier(model.eval().to(device), categories, device, str(path))
    with warnings.catch_warnings():  # torch >= 2.10 flags TorchScript as deprecated (Deprecation/FutureWarning)
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, message=".*torch.jit")
        model = torch.jit.load(str(path), map_location=torch.device(device))
    clf = TopOneClassifier(model.eval(), categories, device, str(path))
    clf.logits(torch.zeros(1, 3, 224, 224))  # fails here, in setup, when the logits do not match the names
    return clf


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files holding ``*/constants.pkl`` (plain ``torch.save`` ones do not)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
