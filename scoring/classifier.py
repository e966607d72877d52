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
* a weights file (safetensors or ``torch.save``, whatever its name) holding such a ResNet-50 state dict;
* a TorchScript archive (``torch.jit.load``; a program: it must come from a trusted source): a classifier taking
  the same preprocessed batch ``[B, 3, 224, 224]`` and returning logits ``[B, C]``;

the class names of a file are ``labels`` (a text file, one name per line) or, by default, the 1000 ImageNet
categories. Files are told apart by their content and read through :mod:`scoring.files` (a pickle that would run
code is refused unread; every error is one line naming the flag and the file);
* an object that already has a ``classify`` method (e.g. the toy world's judge wrapper): returned as is.

Every loading error (missing weights, bad labels file, logits not matching the names) is raised here, in
setup, before any generation.
"""
from __future__ import annotations

import os
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


LABELS_FLAG = "--classifier_labels"


def _read_labels(path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{LABELS_FLAG} {path}: labels file not found (one class name per line)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{LABELS_FLAG} {path}: not UTF-8 text (byte {e.start}); one class name per line") from None
    names = [n for n in (line.strip() for line in text.splitlines()) if n]
    if not names:
        raise ValueError(f"{LABELS_FLAG} {path}: labels file holds no class names")
    return names


class TopOneClassifier:
    """``model`` (logits ``[B, C]``) with the IMAGENET1K_V2 preprocessing; ``classify`` gives lowercased top-1
    names."""

    def __init__(self, model, categories: Sequence[str], device: str | torch.device = "cpu", name: str = "",
                 flag: str = "--classifier"):
        self.model, self.categories, self.device, self.name = model, list(categories), torch.device(device), name
        self.flag = flag
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
            raise ValueError(f"{self.flag} {self.name}: the classifier returned {shape}; expected logits [B, "
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


def _resnet50_state_dict(download: bool | None, flag: str) -> dict:
    from scoring import files

    path = resnet50_weights_file()
    if path.is_file():
        return files.load_state_dict(path, f"{flag} resnet50 (torchvision's cached weights)")
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
                    download: bool | None = None, flag: str = "--classifier"):
    """The object suite's classifier (see the module docstring for ``spec``). ``labels``: class names for a
    weights / TorchScript classifier file (default: the ImageNet categories). ``download``: may torchvision
    fetch the resnet50 weights when they are not cached (None: yes unless :func:`offline`). ``flag`` names the
    option in messages. Raises FileNotFoundError, or ValueError (:class:`scoring.files.ScorerFileError`) with
    one line naming the flag and the file."""
    if hasattr(spec, "classify") and callable(spec.classify):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"{flag} must be 'resnet50', a weights / TorchScript path, or an object with "
                        f"classify(paths); got {type(spec).__name__}")
    name = os.fspath(spec)
    categories = _read_labels(labels) if labels is not None else imagenet_categories()
    from torchvision.models import resnet50

    if name == RESNET50_SPEC:
        if labels is not None:
            raise ValueError(f"{LABELS_FLAG} is for a classifier file; 'resnet50' uses the ImageNet categories")
        model = resnet50()
        model.load_state_dict(_resnet50_state_dict(download, flag))
        return TopOneClassifier(model.eval().to(device), categories, device, "resnet50 IMAGENET1K_V2", flag)
    path = Path(name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {name!r} is neither 'resnet50' nor an existing file")
    return _file_classifier(path, categories, device, flag)


def _file_classifier(path: Path, categories: list[str], device, flag: str) -> TopOneClassifier:
    """A TorchScript archive, or a ResNet-50 state dict in a weights file; anything else is refused unread."""
    from scoring import files

    kind = files.sniff(path)
    if kind == "torchscript":
        clf = TopOneClassifier(files.load_torchscript(path, flag, device), categories, device, str(path), flag)
        try:  # fails here, in setup, when the program does not run or its logits do not match the names
            clf.logits(torch.zeros(1, 3, 224, 224))
        except ValueError:
            raise
        except Exception as e:  # the program's own errors (TorchScript raises RuntimeError and others)
            raise files.ScorerFileError(f"{flag} {path}: the TorchScript classifier fails on a [1, 3, 224, 224] "
                                        f"batch ({files.short_reason(e)})") from None
        return clf
    if kind not in ("safetensors", "torch-zip", "pickle"):
        raise files.ScorerFileError(f"{flag} {path}: neither a TorchScript classifier nor a ResNet-50 state dict: "
                                    f"{files.describe(path, kind)}")
    from torchvision.models import resnet50

    model = resnet50(num_classes=len(categories))
    try:
        model.load_state_dict(files.load_state_dict(path, flag))
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise files.ScorerFileError(f"{flag} {path}: not a ResNet-50 state dict for {len(categories)} classes "
                                    f"({detail[:300]})") from None
    return TopOneClassifier(model.eval().to(device), categories, device, str(path), flag)
