"""evaluation/scores.py (the ConceptPrune benchmarks' metric rules) and evaluation/classifier.py, against hand
computations, tiny local models (CLIP, TorchScript classifier / SSCD stand-ins) and no network."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from evaluation import scores
from scoring import classifier as clf_mod
from scoring.classifier import load_classifier
from scoring.metrics import clip_image_features, clip_scores, clip_text_features, load_clip


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, eos_token_id=2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    return load_clip(path)


def _save(arr: np.ndarray, path):
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def noise_images(tmp_path):
    rng = np.random.default_rng(0)
    sizes = [(40, 32), (32, 48), (64, 64), (50, 37), (33, 33), (48, 40)]
    return [_save(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), tmp_path / f"n{i}.png")
            for i, (w, h) in enumerate(sizes)]


@pytest.fixture
def colour_images(tmp_path):
    """Pure red, green, blue images (non-square, so the resize/crop runs)."""
    out = []
    for i, name in enumerate(["red", "green", "blue"]):
        a = np.zeros((260, 300, 3), np.uint8)
        a[..., i] = 255
        out.append(_save(a, tmp_path / f"{name}.png"))
    return out


def _script(module, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated (FutureWarning / DeprecationWarning)
        torch.jit.script(module).save(str(path))
    return path


class _ChannelClassifier(torch.nn.Module):
    """Logits = W @ (per-channel mean of the normalised image): the dominant colour's row wins."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) @ self.weight.T


class _TinySSCD(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)
        with torch.no_grad():
            self.conv.weight.copy_(0.1 * torch.randn(self.conv.weight.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.conv(x), 2).flatten(1)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Nothing here may download: torchvision's weight fetch fails the test if reached."""
    import torch.hub
    from torchvision.models import ResNet50_Weights

    def refuse(*a, **k):
        raise AssertionError("a test tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(ResNet50_Weights, "get_state_dict", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HUB_OFFLINE", "1")


# ---------------------------------------------------------------------------------------- artist
def test_artist_summary_by_hand():
    edited, base = [0.20, 0.30, 0.25, 0.10], [0.25, 0.30, 0.20, 0.40]
    s = scores.artist_summary(edited, base)
    # hits: 0.20<0.25 yes, 0.30<0.30 no (tie), 0.25<0.20 no, 0.10<0.40 yes -> [1, 0, 0, 1]
    assert s["avg_score"] == 0.5 and s["std_score"] == pytest.approx(0.5)  # population std of [1,0,0,1]
    assert s["avg_similarity"] == pytest.approx(0.2125)
    var = sum((e - 0.2125) ** 2 for e in edited) / 4  # ddof 0, as np.std
    assert s["std_similarity"] == pytest.approx(var ** 0.5) and s["n"] == 4
    with pytest.raises(ValueError):
        scores.artist_summary([0.1, 0.2], [0.3])
    with pytest.raises(ValueError):
        scores.artist_summary([], [])


def test_clip_similarities_raw_cosine(clip, noise_images):
    texts = ["a painting by Van Gogh", "a cat", "a painting by Van Gogh", "", "a dog on the moon", "a cat"]
    sims = scores.clip_similarities(clip, noise_images, texts, batch_size=4)
    img = clip_image_features(clip, noise_images)
    txt = clip_text_features(clip, texts)
    expected = (img * txt).sum(1)
    assert sims == pytest.approx(expected.tolist(), abs=1e-5)
    assert all(-1 <= s <= 1 for s in sims)
    # raw cosine, not CLIPScore's 2.5 * max(cos, 0)
    cs = torch.diagonal(clip_scores(clip, noise_images, texts))
    assert cs.tolist() == pytest.approx([2.5 * max(s, 0) for s in sims], abs=1e-5)
    with pytest.raises(ValueError):
        scores.clip_similarities(clip, noise_images, texts[:2])


def test_clip_score_mean_divides_by_images():
    sims = [0.3] * 16 + [0.1] * 16  # two batches of 16: the original would report sum / 2 = 6.4
    assert scores.clip_score_mean(sims) == pytest.approx(0.2)
    assert scores.clip_score_mean(torch.tensor([0.5, 0.25])) == pytest.approx(0.375)
    with pytest.raises(ValueError):
        scores.clip_score_mean([])


# ---------------------------------------------------------------------------------------- gender
def test_gender_predictions_follow_larger_cosine(clip, noise_images):
    preds = scores.gender_predictions(clip, noise_images, batch_size=4)
    cos = clip_image_features(clip, noise_images) @ clip_text_features(clip, list(scores.GENDER_TEXTS)).T
    assert preds == ["man" if a >= b else "woman" for a, b in cos.tolist()]
    assert scores.GENDER_TEXTS == ("a photo of a man", "a photo of a woman")


def test_reversal_rates_by_hand():
    base = ["man", "man", "man", "woman", "woman", "man"]
    edited = ["woman", "man", "woman", "woman", "man", "woman"]
    r = scores.reversal_rates(base, edited)
    assert r["n_base_man"] == 4 and r["n_base_woman"] == 2
    assert r["m_to_f"] == 0.75 and r["f_to_m"] == 0.5 and r["base_share_man"] == pytest.approx(4 / 6)
    r = scores.reversal_rates(["man", "man"], ["man", "woman"])
    assert r["m_to_f"] == 0.5 and r["f_to_m"] is None and r["base_share_man"] == 1.0
    with pytest.raises(ValueError):
        scores.reversal_rates(["man"], ["male"])
    with pytest.raises(ValueError):
        scores.reversal_rates(["man"], [])


# ---------------------------------------------------------------------------------------- objects
def test_class_accuracy_by_hand():
    preds = ["english springer", "tench", "church", "church", "gas pump"]
    classes = ["English springer", "English springer", "church", "Church", "golf ball"]
    a = scores.class_accuracy(preds, classes)
    assert a["accuracy"] == 0.6 and a["n"] == 5
    assert a["per_class"] == {"english springer": 0.5, "church": 1.0, "golf ball": 0.0}
    with pytest.raises(ValueError):
        scores.class_accuracy(["x"], [])


def test_torchscript_classifier_with_labels_file(tmp_path, colour_images):
    model = _script(_ChannelClassifier(torch.eye(3)), tmp_path / "clf.pt")
    labels = tmp_path / "labels.txt"
    labels.write_text("Red Thing\nGreen\n\nBLUE\n")
    c = load_classifier(model, labels=labels)
    assert c.classify(colour_images, batch_size=2) == ["red thing", "green", "blue"]
    acc = scores.class_accuracy(c.classify(colour_images), ["red thing", "Green", "red thing"])
    assert acc["accuracy"] == pytest.approx(2 / 3)


def test_torchscript_classifier_default_imagenet_names(tmp_path, colour_images):
    w = torch.zeros(1000, 3)
    w[0, 0] = w[1, 1] = w[217, 2] = 1.0  # red -> tench, green -> goldfish, blue -> English springer
    c = load_classifier(_script(_ChannelClassifier(w), tmp_path / "clf1000.pt"))
    assert c.classify(colour_images) == ["tench", "goldfish", "english springer"]
    assert clf_mod.imagenet_categories()[217] == "English springer"


def test_classifier_names_must_match_logits(tmp_path):
    model = _script(_ChannelClassifier(torch.eye(3)), tmp_path / "clf.pt")
    labels = tmp_path / "two.txt"
    labels.write_text("a\nb\n")
    with pytest.raises(ValueError, match="2 class names"):
        load_classifier(model, labels=labels)
    with pytest.raises(ValueError, match="1000"):
        load_classifier(model)  # default: 1000 ImageNet names
    with pytest.raises(FileNotFoundError):
        load_classifier(model, labels=tmp_path / "none.txt")
    with pytest.raises(FileNotFoundError):
        load_classifier(tmp_path / "missing.pt")


def test_object_with_classify_is_used_as_is():
    class Judge:
        def classify(self, paths, batch_size=32):
            return ["cat" for _ in paths]

    j = Judge()
    assert load_classifier(j) is j
    with pytest.raises(TypeError):
        load_classifier(42)


def test_resnet50_weights_missing_is_clear_and_offline(tmp_path, monkeypatch):
    import torch.hub
    from torchvision.models import ResNet50_Weights

    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    name = ResNet50_Weights.IMAGENET1K_V2.url.rsplit("/", 1)[1]
    assert name == "resnet50-11ad3fa6.pth" and ResNet50_Weights.DEFAULT == ResNet50_Weights.IMAGENET1K_V2
    assert clf_mod.resnet50_weights_file() == tmp_path / "torch" / "hub" / "checkpoints" / name
    for download in (False, None):  # None: the offline environment variables forbid it
        with pytest.raises(FileNotFoundError, match=name) as info:
            load_classifier("resnet50", download=download)
        assert "hub/checkpoints" in str(info.value)


def test_resnet50_from_cache_and_from_pth(tmp_path, monkeypatch, colour_images):
    """Random ResNet-50 weights placed where torchvision caches IMAGENET1K_V2 (and as a .pth path) load
    without any download; predictions are ImageNet names, lowercased, identical both ways."""
    import torch.hub
    from torchvision.models import resnet50

    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = clf_mod.resnet50_weights_file()
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    net = resnet50().eval()
    torch.save(net.state_dict(), path)
    a = load_classifier("resnet50", download=False)
    b = load_classifier(path)
    names = {n.lower() for n in clf_mod.imagenet_categories()}
    pa = a.classify(colour_images[:2])
    assert pa == b.classify(colour_images[:2]) and all(p in names for p in pa)
    from torchvision.models import ResNet50_Weights

    x = torch.stack([ResNet50_Weights.IMAGENET1K_V2.transforms()(Image.open(p).convert("RGB"))
                     for p in colour_images[:2]])
    with torch.no_grad():
        top = net(x).argmax(1).tolist()
    assert pa == [clf_mod.imagenet_categories()[i].lower() for i in top]


# ---------------------------------------------------------------------------------------- memorization
def test_memorization_summary_by_hand():
    rows = [[0.9, 0.1, 0.2], [0.4], [0.6, 0.5]]
    s = scores.memorization_summary(rows, gen_clip_scores=[0.3, 0.2, 0.1])
    assert s["avg_sscd_max"] == pytest.approx((0.9 + 0.4 + 0.6) / 3)
    assert s["avg_sscd_min"] == pytest.approx((0.1 + 0.4 + 0.5) / 3)  # divided by N (the original forgot)
    assert s["avg_sscd_mean"] == pytest.approx((0.4 + 0.4 + 0.55) / 3)
    assert s["share_above_0.5"] == pytest.approx(2 / 3) and s["n"] == 3
    assert s["avg_gen_clip_score"] == pytest.approx(0.2) and "avg_gt_clip_score" not in s
    assert scores.memorization_summary([[0.5]])["share_above_0.5"] == 0.0  # strict >
    with pytest.raises(ValueError):
        scores.memorization_summary(rows, gen_clip_scores=[0.1])
    with pytest.raises(ValueError):
        scores.memorization_summary([])


def test_sscd_similarities_original_transform(tmp_path, noise_images):
    from torchvision import transforms as T

    from scoring.sscd import load_sscd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated
        model = load_sscd(_script(_TinySSCD(), tmp_path / "sscd.pt"))
    rng = np.random.default_rng(1)
    big = [_save(rng.integers(0, 256, (300 + 10 * i, 280, 3), dtype=np.uint8), tmp_path / f"b{i}.png")
           for i in range(3)]
    gen, gts = big[0], [big[1], big[0], big[2], noise_images[0]]
    sims = scores.sscd_similarities(model, gen, gts, batch_size=3)
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.5], [0.5])])
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in [gen, *gts]])
    with torch.no_grad():
        d = F.normalize(model(x), dim=1)
    assert sims == pytest.approx((d[1:] @ d[0]).tolist(), abs=1e-5)
    assert sims[1] == pytest.approx(1.0, abs=1e-5)  # the generated image itself
    assert scores.preprocess_sscd_dcr(gen).shape == (3, 224, 224)
    with pytest.raises(FileNotFoundError):
        scores.sscd_similarities(model, tmp_path / "none.png", gts)
