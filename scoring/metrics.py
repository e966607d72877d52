"""Evaluation metrics: CLIP score / CLIP accuracy, KID / FID, memorization rate.

CLIP
    ``load_clip`` takes ``open_clip:ARCH:PRETRAINED`` (default ``open_clip:ViT-B-32:openai``, the paper's
    CLIP; e.g. ``open_clip:ViT-g-14:laion2b_s34b_b88k`` for memorization studies; PRETRAINED is an open_clip
    tag, fetched into the hub cache when online, or a local weights file), or a transformers ``CLIPModel``
    (a local ``save_pretrained`` folder, as the toy world's CLIP, or a hub id). open_clip models run with
    their own torchvision preprocessing and tokenizer (``encode_image`` / ``encode_text``). For
    transformers models, images are
    preprocessed here with PIL + numpy exactly like OpenAI CLIP's ``_transform``: resize the SHORT
    side to the model's ``image_size`` with PIL bicubic (long side ``int(size * long / short)``),
    center crop (offsets ``int(round((dim - size) / 2))``), RGB, ``/255``, CLIP mean/std. Texts are
    tokenized with our CLIP BPE tokenizer (the OpenAI vocabulary), truncated to 77 tokens with EOS
    kept last. The text feature is pooled here, explicitly, at the FIRST EOS token (our padding is
    EOS, so this is also what transformers' ``argmax`` pooling picks for configs with
    ``eos_token_id == 2``), then projected; the pooling thus never depends on the config's
    ``eos_token_id``. Features are L2-normalised in float32. The model runs in fp32 (``load_clip(precision="full")``,
    the default: ConceptPrune's scripts run transformers' CLIP on the CPU in fp32) or, with
    ``precision="autocast"``, under fp16 autocast on CUDA (close to Concept Ablation's ``evaluate.py``, whose
    OpenAI ``clip.load`` keeps fp16 weights on CUDA); on the CPU both are fp32.

    CLIPScore of (image, text) = ``2.5 * max(cos, 0)``. ``clip_score`` is the mean over images of
    the score against ``"A photo depicts " + text``; ``clip_accuracy`` is the share of images whose
    score against the target text is STRICTLY above the score against the anchor text. When the
    anchor is ``painting`` every other candidate gets the suffix ``" style"`` (``clip_text``).

KID / FID
    ``kid`` is clean-fid's ``kernel_distance``: mean over ``num_subsets`` random subsets (without
    replacement, size ``m = min(n1, n2, subset_size)``) of the unbiased MMD^2 with the cubic
    polynomial kernel ``k(x, y) = (x.y / d + 1)^3``. ``fid`` is the Frechet distance of Gaussians
    fitted to the features (``np.cov``, ddof 1), with ``Tr (S1 S2)^{1/2}`` computed as
    ``Tr (S1^{1/2} S2 S1^{1/2})^{1/2}`` through symmetric eigendecompositions. Both in float64.
    They equal clean-fid's ``kernel_distance`` / ``frechet_distance`` (tests/test_metrics_card.py), and are
    kept here because clean-fid's subsets use numpy's global random state. The original computes KID
    only; FID is offered for completeness.

Feature extractors (``FeatureExtractor = Callable[[list[path]], Tensor[N, D]]``)
    * ``inception_features()``: clean-fid's Inception-V3 in "clean" mode (the reference's KID), through
      clean-fid's own code (``InceptionV3W`` and ``get_files_features``). Its weights file
      ``inception-2015-12-05.pt`` is ``weights=`` (a local copy) or clean-fid's download into its
      default folder (``/tmp``).
    * ``torchscript_features(path, size)``: any TorchScript model taking float images
      ``[N, 3, size, size]`` in [0, 255]; images are resized like clean-fid's "clean" mode (RGB
      uint8 -> each channel as a float PIL image, bicubic resize to ``size x size``, clip to
      [0, 255]; no crop).

Memorization
    ``sscd_memorization_rate``: the share of images whose SSCD cosine similarity to the memorized
    image is > 0.5 (``ablation.memorization``); lower is better.
"""
from __future__ import annotations

import os
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["CLIP_PRECISIONS", "clip_precision", "DEFAULT_CLIP", "CLIP_MEAN", "CLIP_STD", "CLIP_PREFIX",
           "CLIP_SCORE_WEIGHT", "FeatureExtractor",
           "load_clip", "preprocess_clip", "clip_image_features", "clip_text_features", "clip_text",
           "style", "clip_scores", "clip_score", "clip_accuracy", "clip_metrics", "accuracy_from_scores",
           "fid", "kid", "clean_resize", "torchscript_features", "inception_features", "inception_weights",
           "INCEPTION_FILE", "OpenClip", "resolve_clip", "parse_open_clip", "feature_extractor",
           "check_feature_model"]

DEFAULT_CLIP = "open_clip:ViT-B-32:openai"  # the paper's CLIP (OpenAI ViT-B/32), through open_clip
OPEN_CLIP = "open_clip:"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_PREFIX = "A photo depicts "
CLIP_SCORE_WEIGHT = 2.5
CLIP_PRECISIONS = ("full", "autocast")  # full: fp32 (the default); autocast: fp16 autocast on CUDA
INCEPTION_FILE = "inception-2015-12-05.pt"  # clean-fid's TorchScript Inception-V3 (NVlabs StyleGAN2-ADA export)
INCEPTION_SIZE = 299

PathLike = str | os.PathLike
FeatureExtractor = Callable[[Sequence[PathLike]], torch.Tensor]


# ---------------------------------------------------------------------------------------- helpers
def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, RuntimeError):
        return torch.device("cpu")


def clip_precision(model) -> str:
    """The precision :func:`load_clip` gave ``model`` (``"full"`` for a model loaded otherwise)."""
    return getattr(model, "clip_precision", "full")


def _autocast(model, device: torch.device):
    """fp16 autocast on CUDA for a model loaded with ``precision="autocast"``; fp32 otherwise."""
    if device.type == "cuda" and clip_precision(model) == "autocast":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def _open_rgb(image: Image.Image | PathLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as im:
        return im.convert("RGB")


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


# ---------------------------------------------------------------------------------------- CLIP
def _looks_like_path(name: str) -> bool:
    return Path(name).exists() or os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name


class OpenClip:
    """An open_clip model with its own preprocessing (torchvision) and tokenizer."""

    def __init__(self, model, preprocess, tokenizer, name: str, clip_precision: str = "full"):
        self.model, self.preprocess, self.tokenizer, self.name = model, preprocess, tokenizer, name
        self.clip_precision = clip_precision

    def parameters(self):
        return self.model.parameters()


def parse_open_clip(spec: str, flag: str = "--clip_model") -> tuple[str, str | None]:
    """``open_clip:ARCH[:PRETRAINED]`` -> (ARCH, PRETRAINED or None)."""
    arch, _, pretrained = spec[len(OPEN_CLIP):].partition(":")
    if not arch:
        raise ValueError(f"{flag} {spec!r}: expected open_clip:ARCH:PRETRAINED, e.g. {DEFAULT_CLIP}")
    return arch, pretrained or None


def resolve_clip(spec: PathLike = DEFAULT_CLIP, flag: str = "--clip_model") -> str:
    """Check a CLIP model spec before any work and return what :func:`load_clip` loads: for open_clip, the
    weights as a local file (an open_clip tag is fetched into the hub cache now, when online); for a
    transformers hub id, its cached snapshot folder. The weights (and a folder's config.json) are opened and
    validated here by :mod:`scoring.files` (a damaged or hostile file is refused now, not after the generation).
    ``flag`` names the option in messages. Raises FileNotFoundError / ValueError / RuntimeError."""
    from scoring import files

    name = os.fspath(spec)
    if name.startswith(OPEN_CLIP):
        import open_clip

        arch, pretrained = parse_open_clip(name, flag)
        if arch not in open_clip.list_models():
            raise ValueError(f"{flag} {name!r}: open_clip has no architecture {arch!r}")
        if pretrained is None:
            raise ValueError(f"{flag} {name!r}: name the weights, a tag "
                             f"({', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none known'}) "
                             f"or a local file, e.g. {OPEN_CLIP}{arch}:<tag or file>")
        if _looks_like_path(pretrained):
            path = Path(pretrained).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"{flag} {name!r}: weights file {path} not found")
            files.vet_state_dict(path, flag)
            return f"{OPEN_CLIP}{arch}:{path}"
        cfg = open_clip.get_pretrained_cfg(arch, pretrained)
        if not cfg:
            raise ValueError(f"{flag} {name!r}: open_clip has no weights {pretrained!r} for {arch}; tags: "
                             f"{', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none'}")
        try:
            path = open_clip.download_pretrained(cfg)
        except Exception as e:  # no network and not cached: hub and urllib errors of many kinds
            raise RuntimeError(
                f"{flag} {name!r}: its weights are neither in the hub cache nor downloadable here "
                f"({type(e).__name__}: {e}). Download them once where there is network access, or pass a "
                f"local file: {OPEN_CLIP}{arch}:/path/to/open_clip_model.safetensors") from None
        if not path or not Path(path).is_file():
            raise RuntimeError(f"{flag} {name!r}: open_clip found no weights file for {pretrained!r}")
        files.vet_state_dict(path, f"{flag} {OPEN_CLIP}{arch}:{pretrained} (its cached file)")
        return f"{OPEN_CLIP}{arch}:{path}"
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"{flag} {path}: not a CLIP folder: no such folder. Pass a folder holding a transformers CLIPModel "
                f"(CLIPModel.save_pretrained, with config.json), a hub id, or {DEFAULT_CLIP}")
        files.vet_clip_folder(path, flag)
        return str(path)
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt"]
    try:
        folder = snapshot_download(name, allow_patterns=patterns, local_files_only=True)
    except Exception:  # not cached: fetch it now, before any generation
        try:
            folder = snapshot_download(name, allow_patterns=patterns)
        except Exception as e:
            raise RuntimeError(
                f"{flag}: could not find the CLIP model {name!r} ({type(e).__name__}: {e}). Without network access "
                f"a hub id must already be in the Hugging Face cache; otherwise download it once (e.g. "
                f"`hf download {name} --local-dir <dir>`) and pass the directory through {flag}.") from None
    files.vet_clip_folder(folder, f"{flag} {name} (its cached snapshot)")
    return folder


def load_clip(name_or_path: PathLike = DEFAULT_CLIP, device: str | torch.device = "cpu", precision: str = "full"):
    """The CLIP model of ``name_or_path`` (see :func:`resolve_clip`) in eval mode, fp32 weights, on ``device``: an
    :class:`OpenClip` for ``open_clip:`` specs, else a transformers ``CLIPModel``. ``precision``: ``"full"``
    (features computed in fp32) or ``"autocast"`` (under fp16 autocast on CUDA); kept as the model's
    ``clip_precision``, which every feature function here reads."""
    from transformers import CLIPModel

    if precision not in CLIP_PRECISIONS:
        raise ValueError(f"CLIP precision must be one of {CLIP_PRECISIONS}, got {precision!r}")
    name = os.fspath(name_or_path)
    if name.startswith(OPEN_CLIP):
        import open_clip

        arch, pretrained = parse_open_clip(resolve_clip(name))
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained, device=device)
        return OpenClip(model.eval().float(), preprocess, open_clip.get_tokenizer(arch), name, precision)
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"CLIP model directory {path} not found. Pass a directory holding a transformers CLIPModel "
                f"(config.json + weights, e.g. from CLIPModel.save_pretrained) or a hub id such as "
                f"{DEFAULT_CLIP!r} through --clip_model.")
        name = str(path)
    try:
        try:  # a local directory or the hub cache first: no network round trip when it is there
            model = CLIPModel.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError):
            if _looks_like_path(name):
                raise
            model = CLIPModel.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise RuntimeError(
            f"could not load the CLIP model {name!r} ({type(e).__name__}: {e}). Without network access the "
            f"hub id must already be in the Hugging Face cache; otherwise download it once (e.g. "
            f"`hf download {name} --local-dir <dir>`) and pass the directory through --clip_model.") from e
    # fp32 whatever the stored dtype (CPU fp16 is slow or unsupported; "autocast" runs fp16 on CUDA)
    model = model.eval().float().to(device)
    model.clip_precision = precision  # a plain attribute: read by _autocast
    return model


def _clip_image_size(model) -> int:
    return int(model.config.vision_config.image_size)


def preprocess_clip(image: Image.Image | PathLike, size: int = 224) -> torch.Tensor:
    """OpenAI CLIP preprocessing: float32 ``[3, size, size]``.

    Resize (short side -> ``size``, PIL bicubic), center crop, RGB, ``/255``, CLIP mean/std, in that
    order (the order of OpenAI's ``Compose``).
    """
    if not isinstance(image, Image.Image):
        with Image.open(image) as im:
            im.load()
            image = im.copy()
    w, h = image.size
    tw, th = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if (tw, th) != (w, h):
        image = image.resize((tw, th), Image.Resampling.BICUBIC)
    left, top = int(round((tw - size) / 2.0)), int(round((th - size) / 2.0))
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = (x - np.asarray(CLIP_MEAN, dtype=np.float32)) / np.asarray(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def _as_tensor_output(out) -> torch.Tensor:
    """transformers 5 returns a ``BaseModelOutputWithPooling`` from ``get_*_features``; 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def clip_image_features(model, images: Sequence[Image.Image | PathLike], batch_size: int = 32) -> torch.Tensor:
    """L2-normalised CLIP image embeddings ``[N, D]`` (float32, CPU), in order."""
    _check_batch_size(batch_size)
    images = list(images)
    if not images:
        raise ValueError("no images given")
    device = _model_device(model)
    if isinstance(model, OpenClip):
        prep, encode = lambda im: model.preprocess(_open_rgb(im)), model.model.encode_image  # noqa: E731
    else:
        size = _clip_image_size(model)
        prep = lambda im: preprocess_clip(im, size)  # noqa: E731
        encode = lambda x: _as_tensor_output(model.get_image_features(pixel_values=x))  # noqa: E731
    out = []
    for s in range(0, len(images), batch_size):
        x = torch.stack([prep(im) for im in images[s:s + batch_size]]).to(device)
        with _autocast(model, device):
            f = encode(x)
        out.append(F.normalize(f.float(), dim=-1).cpu())
    return torch.cat(out)


def _text_features_from_ids(model, ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Projected (not normalised) text embeddings pooled at the first ``eos_token_id`` of each row."""
    is_eos = ids == eos_token_id
    if not bool(is_eos.any(dim=1).all()):
        raise ValueError("every token row must contain the EOS token")
    hidden = model.text_model(input_ids=ids).last_hidden_state  # final layer norm applied
    pos = is_eos.int().argmax(dim=1)  # first EOS
    pooled = hidden[torch.arange(ids.shape[0], device=hidden.device), pos]
    return model.text_projection(pooled)


@torch.no_grad()
def clip_text_features(model, texts: Sequence[str], tokenizer=None, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised CLIP text embeddings ``[T, D]`` (float32, CPU) of ``texts`` (used verbatim)."""
    from ldm.modules.encoders.clip_tokenizer import default_tokenizer

    _check_batch_size(batch_size)
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError("no texts given")
    if isinstance(model, OpenClip):  # its own tokenizer (the same OpenAI BPE, 77 tokens)
        device = _model_device(model)
        out = []
        for s in range(0, len(texts), batch_size):
            with _autocast(model, device):
                f = model.model.encode_text(model.tokenizer(texts[s:s + batch_size]).to(device))
            out.append(F.normalize(f.float(), dim=-1).cpu())
        return torch.cat(out)
    tok = default_tokenizer() if tokenizer is None else tokenizer
    cfg = model.config.text_config
    if len(tok) > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {len(tok)} tokens but the CLIP text model only {cfg.vocab_size}")
    max_length = min(77, int(cfg.max_position_embeddings))
    device = _model_device(model)
    out = []
    for s in range(0, len(texts), batch_size):
        ids = tok(texts[s:s + batch_size], max_length=max_length).to(device)
        with _autocast(model, device):
            f = _text_features_from_ids(model, ids, tok.eos_token_id)
        out.append(F.normalize(f.float(), dim=-1).cpu())
    return torch.cat(out)


def style(candidate: str, anchor: str) -> str:
    """The reference's rule: with anchor ``painting``, every candidate other than it gets ``" style"``."""
    if anchor.strip().lower() == "painting" and candidate.strip().lower() != "painting":
        return candidate + " style"
    return candidate


def clip_text(candidate: str, anchor: str | None = None) -> str:
    """The CLIP text of a concept: ``"A photo depicts " + style(candidate, anchor)``."""
    return CLIP_PREFIX + (candidate if anchor is None else style(candidate, anchor))


def clip_scores(model, images: Sequence[Image.Image | PathLike], texts: Sequence[str], tokenizer=None,
                batch_size: int = 32) -> torch.Tensor:
    """CLIPScore matrix ``[N_images, N_texts]``: ``2.5 * max(cos(image, text), 0)``; texts used verbatim."""
    img = clip_image_features(model, images, batch_size=batch_size)
    txt = clip_text_features(model, texts, tokenizer=tokenizer)
    return CLIP_SCORE_WEIGHT * (img @ txt.T).clamp_min(0)


def accuracy_from_scores(target_scores, anchor_scores) -> float:
    """``mean[target > anchor]`` (strict: ties count as failures)."""
    t = torch.as_tensor(target_scores, dtype=torch.float32).flatten()
    a = torch.as_tensor(anchor_scores, dtype=torch.float32).flatten()
    if t.shape != a.shape or t.numel() == 0:
        raise ValueError(f"need two non-empty score vectors of the same length, got {t.numel()} and {a.numel()}")
    return float((t > a).float().mean())


def clip_metrics(model, images: Sequence[Image.Image | PathLike], target: str, anchor: str, tokenizer=None,
                 batch_size: int = 32) -> tuple[float, float]:
    """``(clip_score(images, target), clip_accuracy(images, target, anchor))`` with one pass over the images.

    ``target`` and ``anchor`` are concept names (not full texts); the ``" style"`` rule is applied
    with ``anchor``, and both get the ``"A photo depicts "`` prefix.
    """
    s = clip_scores(model, images, [clip_text(target, anchor), clip_text(anchor, anchor)], tokenizer, batch_size)
    return float(s[:, 0].mean()), accuracy_from_scores(s[:, 0], s[:, 1])


def clip_score(model, images: Sequence[Image.Image | PathLike], text: str, anchor: str | None = None,
               tokenizer=None, batch_size: int = 32) -> float:
    """Mean CLIPScore of ``images`` against ``"A photo depicts " + text`` (``" style"`` rule if ``anchor``)."""
    return float(clip_scores(model, images, [clip_text(text, anchor)], tokenizer, batch_size)[:, 0].mean())


def clip_accuracy(model, images: Sequence[Image.Image | PathLike], target: str, anchor: str, tokenizer=None,
                  batch_size: int = 32) -> float:
    """Share of images scoring strictly higher against the target text than against the anchor text."""
    return clip_metrics(model, images, target, anchor, tokenizer, batch_size)[1]


# ---------------------------------------------------------------------------------------- KID / FID
def _features_2d(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"{name} must be a [N, D] feature matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains non-finite values")
    return x


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def fid(feats1, feats2) -> float:
    """Frechet distance ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})`` of Gaussians fitted to the features."""
    x, y = _features_2d(feats1, "feats1"), _features_2d(feats2, "feats2")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    if min(len(x), len(y)) < 2:
        raise ValueError("fid needs at least 2 samples per set")
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    r1 = _sqrtm_psd(s1)
    m = r1 @ s2 @ r1
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    m, d = x.shape
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2 * kxy.sum() / (m * m))


def kid(feats1, feats2, num_subsets: int = 100, subset_size: int = 1000, seed: int | None = 0) -> float:
    """Kernel Inception Distance (clean-fid's ``kernel_distance``): mean unbiased MMD^2 over random subsets."""
    x, y = _features_2d(feats1, "feats1"), _features_2d(feats2, "feats2")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    if num_subsets < 1 or subset_size < 2:
        raise ValueError(f"need num_subsets >= 1 and subset_size >= 2, got {num_subsets}, {subset_size}")
    m = min(len(x), len(y), subset_size)
    if m < 2:
        raise ValueError("kid needs at least 2 samples per set")
    if m == len(x) == len(y):  # every subset is the whole set: the MMD does not depend on the order
        return _mmd2_unbiased(x, y)
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        total += _mmd2_unbiased(x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)])
    return total / num_subsets


# ---------------------------------------------------------------------------------------- features
def clean_resize(image: Image.Image | PathLike, size: int = INCEPTION_SIZE) -> np.ndarray:
    """clean-fid "clean" resize: float32 ``[size, size, 3]`` in [0, 255] (per-channel float PIL bicubic)."""
    rgb = np.asarray(_open_rgb(image), dtype=np.uint8)
    channels = []
    for c in range(3):
        ch = Image.fromarray(rgb[:, :, c].astype(np.float32))  # mode "F"
        ch = ch.resize((size, size), Image.Resampling.BICUBIC)
        channels.append(np.asarray(ch, dtype=np.float32).clip(0, 255))
    return np.stack(channels, axis=2)


def torchscript_features(path: PathLike, size: int = INCEPTION_SIZE, device: str | torch.device = "cpu",
                         batch_size: int = 64, forward_kwargs: dict | None = None,
                         flag: str = "--feature_model") -> FeatureExtractor:
    """A ``FeatureExtractor`` running a TorchScript model on clean-resized float images in [0, 255].

    The model is called as ``model(x, **forward_kwargs)`` with ``x`` float32 ``[B, 3, size, size]``
    and must return ``[B, ...]`` (flattened to ``[B, D]``). Features come back float64 on the CPU. The file is
    read by :func:`scoring.files.load_torchscript` (errors name ``flag``).
    """
    from scoring import files

    _check_batch_size(batch_size)
    model = files.load_torchscript(path, flag, device)
    kwargs = dict(forward_kwargs or {})

    @torch.no_grad()
    def extract(images: Sequence[PathLike]) -> torch.Tensor:
        images = list(images)
        if not images:
            raise ValueError("no images given")
        out = []
        for s in range(0, len(images), batch_size):
            x = np.stack([clean_resize(p, size) for p in images[s:s + batch_size]]).transpose(0, 3, 1, 2)
            f = model(torch.from_numpy(np.ascontiguousarray(x)).to(device), **kwargs)
            out.append(f.reshape(f.shape[0], -1).double().cpu())
        return torch.cat(out)

    return extract


CLEANFID_DIR = "/tmp"  # where clean-fid keeps (and downloads) its Inception weights on Linux


def inception_weights(weights: PathLike | None = None, download: bool = True) -> Path:
    """The Inception weights file clean-fid runs: ``weights`` (a local ``inception-2015-12-05.pt``), else
    clean-fid's own copy in its folder, downloaded by clean-fid when missing and ``download``."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights {path} not found")
        if path.name != INCEPTION_FILE:
            raise ValueError(f"clean-fid loads its Inception as {INCEPTION_FILE} from a folder; {path} has another "
                             f"name (rename it, or pass it as a generic --feature_model with --feature_size 299)")
        return path
    path = Path(CLEANFID_DIR) / INCEPTION_FILE
    if not path.is_file() and download:
        from cleanfid.downloads_helper import check_download_inception

        try:
            check_download_inception(fpath=CLEANFID_DIR)
        except Exception as e:  # offline: urllib errors of many kinds
            Path(path).unlink(missing_ok=True)  # clean-fid leaves an empty file behind
            raise RuntimeError(f"clean-fid's Inception weights are not in {CLEANFID_DIR} and could not be "
                               f"downloaded ({type(e).__name__}: {e}); put {INCEPTION_FILE} there or pass "
                               f"--feature_model /path/to/{INCEPTION_FILE}") from None
    return path


def inception_features(device: str | torch.device = "cpu", batch_size: int = 64, weights: PathLike | None = None,
                       num_workers: int = 0) -> FeatureExtractor:
    """The reference's KID features: clean-fid's Inception-V3 (2048-D pool features) in "clean" mode, run by
    clean-fid itself (``InceptionV3W``, ``get_files_features``: its resize, batching and normalisation).

    ``weights``: a local ``inception-2015-12-05.pt``; None: clean-fid's copy (downloaded when missing).
    """
    try:
        from cleanfid.fid import get_files_features
        from cleanfid.inception_torchscript import InceptionV3W
    except ImportError as e:
        raise ImportError(
            f"KID with clean-fid's Inception needs the `clean-fid` package, which imports torchvision "
            f"({type(e).__name__}: {e}). Install the evaluation extras (pip install -e \".[eval]\") with the "
            f"PyPI torch build.") from e
    path = inception_weights(weights)
    device = torch.device(device)
    with warnings.catch_warnings():  # torch >= 2.10 flags TorchScript as deprecated
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit")
        net = InceptionV3W(str(path.parent), download=False, resize_inside=False).to(device).eval()

    def extract(images: Sequence[PathLike]) -> torch.Tensor:
        files = [str(p) for p in images]
        if not files:
            raise ValueError("no images given")
        feats = get_files_features(files, model=net, num_workers=num_workers, batch_size=batch_size,
                                   device=device, mode="clean", verbose=False)
        return torch.as_tensor(np.asarray(feats), dtype=torch.float64)

    return extract


def feature_extractor(feature_model: PathLike | None, feature_size: int = INCEPTION_SIZE,
                      device: str | torch.device = "cpu") -> FeatureExtractor:
    """The KID/FID features of a ``--feature_model``: None, or a file named ``inception-2015-12-05.pt``, runs
    clean-fid's Inception (:func:`inception_features`); any other file is a TorchScript extractor taking
    ``feature_size`` images (:func:`torchscript_features`)."""
    if feature_model is None:
        return inception_features(device=device)
    if Path(feature_model).name == INCEPTION_FILE:
        return inception_features(device=device, weights=feature_model)
    return torchscript_features(feature_model, feature_size, device=device)


def check_feature_model(feature_model: PathLike | None, what: str = "KID/FID") -> None:
    """What :func:`feature_extractor` needs, checked before any work: a given ``feature_model`` file exists and
    loads as TorchScript (on the CPU, then dropped: :func:`scoring.files.vet_torchscript`); for clean-fid's
    Inception (``feature_model`` None or a file named ``inception-2015-12-05.pt``) the ``clean-fid`` package is
    installed and the weights are there and load (clean-fid downloads its own copy now when it is missing).
    ``what`` names the metrics in the message. Raises FileNotFoundError / ImportError / RuntimeError / ValueError."""
    import importlib.util

    from scoring import files

    if feature_model and not Path(feature_model).is_file():
        raise FileNotFoundError(f"--feature_model not found: {feature_model}")
    if not feature_model or Path(feature_model).name == INCEPTION_FILE:  # clean-fid's Inception
        if importlib.util.find_spec("cleanfid") is None:
            raise ImportError(f"{what} with clean-fid's Inception need the `clean-fid` package (and torchvision): "
                              "pip install -e \".[eval]\"; or pass --feature_model <another TorchScript extractor>")
        path = inception_weights(feature_model)  # clean-fid's download, now rather than after the generation
        files.vet_torchscript(path, "--feature_model" if feature_model else "--feature_model (clean-fid's copy)")
    else:
        files.vet_torchscript(feature_model, "--feature_model")
