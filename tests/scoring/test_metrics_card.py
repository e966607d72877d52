"""The design card's evaluation packages on their real code paths, offline, with randomly initialised models
built from their configs: open_clip (ViT-B/32, the paper's CLIP; ViT-g-14's config and its offline refusal),
torchvision's CLIP transform against our hand-written one, clean-fid's Inception pipeline (InceptionV3W +
get_files_features, on a TorchScript stand-in with the real file's interface) and clean-fid's KID/FID."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from scoring import metrics

open_clip = pytest.importorskip("open_clip")
cleanfid = pytest.importorskip("cleanfid")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network in tests


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("card_images")
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(40, 24), (32, 32), (24, 48), (64, 40)]):
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        paths.append(d / f"{i}.png")
        Image.fromarray(arr).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def vit_b32(tmp_path_factory):
    """open_clip ViT-B-32 built from its config (random weights), saved as a local weights file."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    path = tmp_path_factory.mktemp("open_clip") / "vit_b32_random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_open_clip_spec_loads_a_local_file_and_scores_as_open_clip_does(vit_b32, images):
    clip = metrics.load_clip(f"open_clip:ViT-B-32:{vit_b32}")
    assert isinstance(clip, metrics.OpenClip)
    score, acc = metrics.clip_metrics(clip, images, "van gogh", "painting")
    # the same by open_clip's own API
    m, pre, tok = clip.model, clip.preprocess, open_clip.get_tokenizer("ViT-B-32")
    with torch.no_grad():
        img = torch.nn.functional.normalize(m.encode_image(torch.stack([pre(Image.open(p).convert("RGB"))
                                                                        for p in images])), dim=-1)
        txt = torch.nn.functional.normalize(m.encode_text(tok(["A photo depicts van gogh style",
                                                                "A photo depicts painting"])), dim=-1)
    s = 2.5 * (img @ txt.T).clamp_min(0)
    assert score == pytest.approx(float(s[:, 0].mean()), rel=1e-5)
    assert acc == pytest.approx(float((s[:, 0] > s[:, 1]).float().mean()))


def test_open_clip_preprocess_is_our_openai_transform(vit_b32, images):
    """open_clip's torchvision Compose for OpenAI ViT-B/32 == our hand-written PIL + numpy preprocess_clip."""
    clip = metrics.load_clip(f"open_clip:ViT-B-32:{vit_b32}")
    for p in images:
        torch.testing.assert_close(clip.preprocess(Image.open(p).convert("RGB")), metrics.preprocess_clip(p, 224),
                                   rtol=0, atol=1e-5)


def test_vit_g14_config_and_offline_refusal():
    with torch.device("meta"):
        m = open_clip.create_model("ViT-g-14", pretrained=None, device="meta")
    assert m.visual.image_size == (224, 224) and tuple(m.text_projection.shape) == (1024, 1024)
    assert 1.3e9 < sum(p.numel() for p in m.parameters()) < 1.4e9
    # not cached and offline: refused at once, naming the way out (a local file)
    with pytest.raises(RuntimeError, match="local file"):
        metrics.resolve_clip("open_clip:ViT-g-14:laion2b_s34b_b88k")
    with pytest.raises(RuntimeError, match="hub cache"):
        metrics.resolve_clip(metrics.DEFAULT_CLIP)


@pytest.mark.parametrize("spec, exc, match", [
    ("open_clip:NoSuchNet:openai", ValueError, "no architecture"),
    ("open_clip:ViT-B-32", ValueError, "name the weights"),
    ("open_clip:ViT-B-32:no_such_tag", ValueError, "no weights 'no_such_tag'"),
    ("open_clip:ViT-B-32:/no/such/file.safetensors", FileNotFoundError, "not found"),
    ("./no/such/clip_dir", FileNotFoundError, "--clip_model"),
    ("no-such-org/no-such-clip", RuntimeError, "Hugging Face cache"),
])
def test_clip_specs_fail_early(spec, exc, match):
    with pytest.raises(exc, match=match):
        metrics.resolve_clip(spec)


class _Layers(torch.nn.Module):
    """Stand-in for the Inception network body: [B, 3, 299, 299] in [-1, 1] -> [B, 2048]."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(12, 2048, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)  # [B, 12]
        return torch.tanh(q @ self.proj)


class _Inception(torch.nn.Module):
    """The interface of inception-2015-12-05.pt that clean-fid's InceptionV3W uses (``layers``, return_features)."""

    def __init__(self):
        super().__init__()
        self.layers = _Layers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers((x - 128) / 128)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cleanfid") / metrics.INCEPTION_FILE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(_Inception()).save(str(path))
    return path


def test_clean_fid_feature_path(inception_file, images):
    """Features through clean-fid's own loader, resize and normalisation equal the network on our clean resize."""
    feats = metrics.inception_features(weights=inception_file, batch_size=3)(images)
    assert feats.shape == (len(images), 2048) and feats.dtype == torch.float64
    x = torch.from_numpy(np.stack([metrics.clean_resize(p, 299) for p in images]).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        want = _Layers()((x - 128) / 128).double()
    torch.testing.assert_close(feats, want, rtol=1e-4, atol=1e-5)


def test_inception_weights_checks(tmp_path, inception_file):
    with pytest.raises(FileNotFoundError):
        metrics.inception_weights(tmp_path / metrics.INCEPTION_FILE)
    other = tmp_path / "inception.pt"
    other.write_bytes(inception_file.read_bytes())
    with pytest.raises(ValueError, match="another name"):
        metrics.inception_weights(other)


def test_kid_and_fid_equal_clean_fid():
    from cleanfid.fid import frechet_distance, kernel_distance

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(60, 8)), rng.normal(0.3, 1.2, size=(60, 8))
    # whole sets (subsets of all 60 are permutations): clean-fid's value, whatever its random draws
    assert metrics.kid(a, b) == pytest.approx(kernel_distance(a, b), rel=1e-9, abs=1e-12)
    want = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert metrics.fid(a, b) == pytest.approx(want, rel=1e-6)
