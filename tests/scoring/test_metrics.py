"""scoring.metrics: CLIP score/accuracy on a tiny local CLIPModel, KID/FID on hand-checked cases,
TorchScript feature extraction, SSCD memorization rate; assets/eval.json and its prompt files."""
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.modules.encoders.clip_tokenizer import default_tokenizer
from scoring import metrics
from scoring.metrics import (
    CLIP_MEAN,
    CLIP_STD,
    accuracy_from_scores,
    clean_resize,
    clip_accuracy,
    clip_metrics,
    clip_score,
    clip_scores,
    clip_text,
    clip_text_features,
    fid,
    kid,
    load_clip,
    preprocess_clip,
    style,
    torchscript_features,
)
from scoring.sscd import sscd_memorization_rate

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------- fixtures
def _tiny_clip_config(eos_token_id=2):
    from transformers import CLIPConfig

    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, eos_token_id=eos_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    CLIPModel(_tiny_clip_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip(clip_dir):
    return load_clip(clip_dir)


def _save(img: Image.Image, path: Path) -> Path:
    img.save(path)
    return path


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    out = []
    for i, (w, h) in enumerate([(40, 32), (32, 48), (64, 64), (50, 37)]):
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        out.append(_save(Image.fromarray(arr), tmp_path / f"{i}.png"))
    return out


# ---------------------------------------------------------------------------------------- CLIP
def test_load_clip_missing_dir_names_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="--clip_model"):
        load_clip(tmp_path / "missing")


def test_load_clip_local_dir(clip, clip_dir):
    assert not clip.training
    assert clip.config.vision_config.image_size == 32
    assert clip.config.projection_dim == 16


def test_preprocess_matches_manual_pil(tmp_path):
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8))  # W 64, H 48
    x = preprocess_clip(img, 32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    # short side 48 -> 32, long side int(32 * 64 / 48) = 42, crop left round(10 / 2) = 5
    ref = img.resize((42, 32), Image.Resampling.BICUBIC).crop((5, 0, 37, 32))
    ref = (np.asarray(ref, dtype=np.float32) / 255 - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    np.testing.assert_allclose(x.numpy(), ref.transpose(2, 0, 1), rtol=0, atol=1e-6)
    # portrait and path input
    p = _save(img.transpose(Image.Transpose.ROTATE_90), tmp_path / "p.png")  # W 48, H 64
    assert preprocess_clip(p, 32).shape == (3, 32, 32)


def test_preprocess_normalisation_constant_image():
    img = Image.new("RGB", (50, 40), (255, 0, 128))
    x = preprocess_clip(img, 32)
    expect = (np.array([255, 0, 128]) / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    for c in range(3):
        np.testing.assert_allclose(x[c].numpy(), expect[c], atol=1e-5)


def test_preprocess_converts_to_rgb():
    gray = Image.new("L", (32, 32), 100)
    x = preprocess_clip(gray, 32)
    expect = (100 / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(x.mean(dim=(1, 2)).numpy(), expect, atol=1e-5)


def test_text_pooled_at_eos_and_matches_transformers(clip):
    tok = default_tokenizer()
    ids = tok(["a photo of a cat", "van gogh"])
    ours = metrics._text_features_from_ids(clip, ids, tok.eos_token_id)
    with torch.no_grad():
        out = clip.get_text_features(input_ids=ids)
    theirs = out if isinstance(out, torch.Tensor) else out.pooler_output
    torch.testing.assert_close(ours.detach(), theirs, rtol=1e-5, atol=1e-6)
    # tokens after the first EOS do not change the feature (causal attention, pooled at the first EOS)
    changed = ids.clone()
    first_eos = (ids == tok.eos_token_id).int().argmax(1)
    for row in range(ids.shape[0]):
        n = 77 - first_eos[row] - 1
        changed[row, first_eos[row] + 1:] = torch.randint(0, 49406, (int(n),))
    torch.testing.assert_close(metrics._text_features_from_ids(clip, changed, tok.eos_token_id).detach(),
                               ours.detach(), rtol=1e-5, atol=1e-6)


def test_text_pooling_independent_of_config_eos(clip_dir):
    from transformers import CLIPModel

    tok = default_tokenizer()
    a = load_clip(clip_dir)
    b = CLIPModel.from_pretrained(clip_dir)
    b.config.text_config.eos_token_id = 49407
    b.text_model.eos_token_id = 49407
    b.eval()
    texts = ["a painting of a bridge", "r2d2"]
    torch.testing.assert_close(clip_text_features(a, texts), clip_text_features(b, texts))
    with torch.no_grad():
        ref = b.get_text_features(input_ids=tok(texts))
    ref = ref if isinstance(ref, torch.Tensor) else ref.pooler_output
    torch.testing.assert_close(clip_text_features(a, texts), torch.nn.functional.normalize(ref, dim=-1),
                               rtol=1e-5, atol=1e-6)


def test_long_text_truncated_to_77(clip):
    f = clip_text_features(clip, ["word " * 200])
    assert f.shape == (1, 16)
    torch.testing.assert_close(f.norm(dim=-1), torch.ones(1))


def test_clip_scores_range_and_definition(clip, images):
    texts = ["A photo depicts a cat", "A photo depicts van gogh style", "A photo depicts painting"]
    s = clip_scores(clip, images, texts, batch_size=3)
    assert s.shape == (len(images), len(texts))
    assert float(s.min()) >= 0 and float(s.max()) <= 2.5
    # same as 2.5 * max(cos, 0) from transformers' own image path on our preprocessing
    with torch.no_grad():
        x = torch.stack([preprocess_clip(p, 32) for p in images])
        out = clip.get_image_features(pixel_values=x)
    img = torch.nn.functional.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)
    txt = clip_text_features(clip, texts)
    torch.testing.assert_close(s, 2.5 * (img @ txt.T).clamp_min(0), rtol=1e-5, atol=1e-6)
    # batching does not matter
    torch.testing.assert_close(clip_scores(clip, images, texts, batch_size=1), s, rtol=1e-5, atol=1e-6)


def test_clip_score_and_accuracy_consistent(clip, images):
    s = clip_scores(clip, images, [clip_text("grumpy cat", "cat"), clip_text("cat", "cat")])
    score, acc = clip_metrics(clip, images, "grumpy cat", "cat")
    assert score == pytest.approx(float(s[:, 0].mean()), abs=1e-6)
    assert acc == pytest.approx(float((s[:, 0] > s[:, 1]).float().mean()))
    assert clip_score(clip, images, "grumpy cat") == pytest.approx(score, abs=1e-6)
    assert clip_accuracy(clip, images, "grumpy cat", "cat") == acc
    # the anchor folder against itself: 0 by construction (strict inequality)
    assert clip_accuracy(clip, images, "cat", "cat") == 0.0


def test_style_rule():
    assert style("van gogh", "painting") == "van gogh style"
    assert style("painting", "painting") == "painting"
    assert style("grumpy cat", "cat") == "grumpy cat"
    assert clip_text("van gogh", "painting") == "A photo depicts van gogh style"
    assert clip_text("painting", "painting") == "A photo depicts painting"
    assert clip_text("nemo") == "A photo depicts nemo"


def test_accuracy_rule_strict():
    assert accuracy_from_scores([1.0, 2.0, 3.0, 0.5], [1.0, 1.0, 4.0, 0.0]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        accuracy_from_scores([1.0], [1.0, 2.0])


def test_clip_metrics_texts_and_rule(monkeypatch):
    seen = {}

    def fake_scores(model, images, texts, tokenizer=None, batch_size=32):
        seen["texts"] = list(texts)
        return torch.tensor([[0.8, 0.7], [0.6, 0.6], [0.2, 0.9]])

    monkeypatch.setattr(metrics, "clip_scores", fake_scores)
    score, acc = clip_metrics(None, ["a", "b", "c"], "van gogh", "painting")
    assert seen["texts"] == ["A photo depicts van gogh style", "A photo depicts painting"]
    assert score == pytest.approx((0.8 + 0.6 + 0.2) / 3)
    assert acc == pytest.approx(1 / 3)
    assert clip_accuracy(None, ["a", "b", "c"], "van gogh", "painting") == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------- FID
def _exact_samples(n, mean, cov, seed=0):
    """n samples whose sample mean and sample covariance (ddof 1) are exactly ``mean`` and ``cov``."""
    rng = np.random.default_rng(seed)
    d = len(mean)
    z = rng.standard_normal((n, d))
    z -= z.mean(0)
    L = np.linalg.cholesky(np.atleast_2d(np.cov(z, rowvar=False)))
    z = z @ np.linalg.inv(L).T
    return z @ np.linalg.cholesky(np.asarray(cov, dtype=np.float64)).T + np.asarray(mean, dtype=np.float64)


def test_fid_identical_is_zero():
    x = np.random.default_rng(0).standard_normal((100, 8))
    assert abs(fid(x, x)) < 1e-8
    assert abs(fid(torch.from_numpy(x).float(), torch.from_numpy(x).float())) < 1e-4


def test_fid_1d_closed_form():
    x = _exact_samples(50, [1.0], [[4.0]], seed=1)
    y = _exact_samples(70, [-2.0], [[9.0]], seed=2)
    # (mu1 - mu2)^2 + (sigma1 - sigma2)^2
    assert fid(x, y) == pytest.approx(9.0 + 1.0, rel=1e-9)
    assert fid(x[:, 0], y[:, 0]) == pytest.approx(10.0, rel=1e-9)  # 1-D vectors accepted


def test_fid_2d_closed_form_non_commuting():
    s1 = np.array([[2.0, 0.5], [0.5, 1.0]])
    s2 = np.array([[1.0, -0.3], [-0.3, 3.0]])
    x = _exact_samples(40, [0.0, 1.0], s1, seed=3)
    y = _exact_samples(60, [1.0, -1.0], s2, seed=4)
    # for 2x2: Tr (S1 S2)^{1/2} = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2))
    tr_sqrt = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expect = (1.0 + 4.0) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert fid(x, y) == pytest.approx(expect, rel=1e-9)
    assert fid(y, x) == pytest.approx(expect, rel=1e-9)


def test_fid_diagonal_closed_form():
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    x = _exact_samples(30, [0, 0, 0], np.diag(a), seed=5)
    y = _exact_samples(30, [0, 0, 3], np.diag(b), seed=6)
    assert fid(x, y) == pytest.approx(9.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum(), rel=1e-9)


def test_fid_errors():
    with pytest.raises(ValueError):
        fid(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError):
        fid(np.zeros((1, 2)), np.zeros((5, 2)))


# ---------------------------------------------------------------------------------------- KID
def test_kid_by_hand():
    x = np.array([[0.0], [1.0]])
    y = np.array([[1.0], [2.0]])
    # k(a, b) = (a b + 1)^3, d = 1, m = 2:
    # Kxx off-diagonal: 2 * k(0,1) = 2; Kyy off-diagonal: 2 * k(1,2) = 54 -> (2 + 54) / (2 * 1) = 28
    # Kxy: k(0,1) + k(0,2) + k(1,1) + k(1,2) = 1 + 1 + 8 + 27 = 37 -> 2 * 37 / 4 = 18.5
    assert kid(x, y) == pytest.approx(28 - 18.5)
    assert kid(y, x) == pytest.approx(9.5)


def test_kid_by_hand_2d():
    x = np.array([[1.0, 0.0], [0.0, 1.0]])
    y = np.array([[1.0, 1.0], [0.0, 0.0]])
    # d = 2: Kxx(0,1) = (0/2 + 1)^3 = 1; Kyy(0,1) = 1; Kxy: (1/2+1)^3 = 3.375 twice, 1 twice -> 8.75
    assert kid(x, y) == pytest.approx((2 + 2) / 2 - 2 * 8.75 / 4)


def test_kid_identical_and_shifted():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 8))
    k_same = kid(x, x)
    m = len(x)
    kxx = (x @ x.T / 8 + 1) ** 3
    # unbiased on identical sets: 2 (S_off / (m (m-1)) - S / m^2), near 0 and slightly negative here
    assert k_same == pytest.approx(2 * ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) - kxx.sum() / m ** 2))
    k_iid = kid(x, rng.standard_normal((200, 8)))
    k_shift = kid(x, rng.standard_normal((200, 8)) + 1.0)
    assert abs(k_same) < 0.1 * k_shift and abs(k_iid) < 0.1 * k_shift


def test_kid_subsets_seeded_and_bounded():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 4))
    y = rng.standard_normal((25, 4)) + 0.5
    a = kid(x, y, num_subsets=20, subset_size=10, seed=3)
    assert a == kid(x, y, num_subsets=20, subset_size=10, seed=3)
    # subset size = min(n1, n2, subset_size): with subset_size >= 25 every y-subset is all of y
    full = kid(x, y, num_subsets=50, subset_size=1000, seed=0)
    vals = [metrics._mmd2_unbiased(x[rng.choice(30, 25, replace=False)], y) for _ in range(200)]
    assert min(vals) - 1e-12 <= full <= max(vals) + 1e-12
    assert torch.is_tensor(torch.tensor(kid(torch.from_numpy(x), torch.from_numpy(y), num_subsets=3)))


# ---------------------------------------------------------------------------------------- feature extractors
class _MeanFeatures(torch.nn.Module):
    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        f = x.mean(dim=(2, 3))
        if return_features:
            return torch.cat([f, f * 0 + float(x.shape[-1])], dim=1)
        return f


def _script(tmp_path) -> Path:
    path = tmp_path / "feat.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(_MeanFeatures()).save(str(path))
    return path


def test_clean_resize(tmp_path):
    p = _save(Image.new("RGB", (40, 24), (10, 200, 255)), tmp_path / "c.png")
    r = clean_resize(p, 16)
    assert r.shape == (16, 16, 3) and r.dtype == np.float32
    np.testing.assert_allclose(r.reshape(-1, 3), np.tile([10, 200, 255], (256, 1)), atol=1e-3)


def test_torchscript_features(tmp_path, images):
    path = _script(tmp_path)
    extract = torchscript_features(path, size=16, batch_size=3)
    f = extract(images)
    assert f.shape == (len(images), 3) and f.dtype == torch.float64
    for i, p in enumerate(images):
        np.testing.assert_allclose(f[i].numpy(), clean_resize(p, 16).mean(axis=(0, 1)), rtol=1e-5)
    g = torchscript_features(path, size=16, forward_kwargs={"return_features": True})(images[:2])
    assert g.shape == (2, 6) and torch.all(g[:, 3:] == 16)
    # the same KID/FID code runs on extracted features
    assert math.isfinite(kid(f, f)) and abs(fid(f, f)) < 1e-6


def test_inception_features_without_cleanfid_explains(monkeypatch):
    import sys

    for name in ("cleanfid", "cleanfid.fid", "cleanfid.inception_torchscript"):
        monkeypatch.setitem(sys.modules, name, None)  # as if clean-fid were not installed: import fails
    with pytest.raises(ImportError, match="clean-fid"):
        metrics.inception_features()


def test_torchscript_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        torchscript_features(tmp_path / "none.pt")


# ---------------------------------------------------------------------------------------- memorization
class _ChannelMean(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


def test_sscd_memorization_rate(tmp_path):
    ref = _save(Image.new("RGB", (40, 40), (255, 0, 0)), tmp_path / "ref.png")
    imgs = [_save(Image.new("RGB", (40, 30), c), tmp_path / f"{i}.png")
            for i, c in enumerate([(250, 5, 0), (0, 0, 255), (255, 0, 0), (0, 0, 250)])]
    assert sscd_memorization_rate(_ChannelMean(), imgs, ref) == pytest.approx(0.5)
    assert sscd_memorization_rate(_ChannelMean(), imgs[:1], ref) == 1.0
    assert sscd_memorization_rate(_ChannelMean(), imgs, ref, threshold=1.5) == 0.0


# ---------------------------------------------------------------------------------------- assets
def _eval_json():
    return json.loads((ROOT / "assets" / "eval.json").read_text(encoding="utf-8"))


def _prompt_lines(name: str) -> list[str]:
    path = ROOT / "assets" / "eval_prompts" / f"{name.replace(' ', '_').replace('-', '_')}_eval.txt"
    assert path.is_file(), f"missing prompt file {path}"
    return path.read_text(encoding="utf-8").splitlines()


def test_eval_json_schema():
    data = _eval_json()
    assert set(data) <= {"style", "object", "memorization"} and {"style", "object"} <= set(data)
    assert {"van gogh", "salvador dali", "monet", "greg rutkowski"} <= set(data["style"])
    assert {"grumpy cat", "snoopy", "nemo", "r2d2"} <= set(data["object"]) and len(data["object"]) >= 5
    for kind in ("style", "object"):
        for key, entry in data[kind].items():
            assert set(entry) == {"target", "anchor", "hard_negative"}, key
            assert isinstance(entry["target"], str) and entry["target"] and entry["target"] == entry["target"].lower()
            assert isinstance(entry["anchor"], str) and entry["anchor"]
            negs = entry["hard_negative"]
            assert isinstance(negs, list) and negs and all(isinstance(n, str) and n for n in negs)
            assert entry["target"] not in negs and entry["anchor"] not in negs
            assert len(set(negs)) == len(negs)
            if kind == "style":
                assert entry["anchor"] == "painting"
    assert data["object"]["grumpy cat"]["anchor"] == "cat"
    assert data["object"]["snoopy"]["anchor"] == "dog"
    assert data["object"]["nemo"]["anchor"] == "fish"
    assert data["object"]["r2d2"]["anchor"] == "robot"


def test_eval_prompt_files_have_ten_prompts():
    """style prompts are read from {concept}_eval.txt (target, anchor and every hard negative);
    object prompts from {anchor}_eval.txt, whose lines must contain the anchor word (it is replaced)."""
    data = _eval_json()
    for key, entry in data["style"].items():
        for name in [entry["target"], entry["anchor"], *entry["hard_negative"]]:
            lines = _prompt_lines(name)
            assert len(lines) == 10 and all(line.strip() for line in lines), name
            assert len(set(lines)) == 10, name
    for key, entry in data["object"].items():
        if key == "kids":  # the paper's entry; we ship no kids_eval.txt (tests/test_protocol.py)
            continue
        lines = _prompt_lines(entry["anchor"])
        assert len(lines) == 10 and all(line.strip() for line in lines), entry["anchor"]
        assert len(set(lines)) == 10, entry["anchor"]
        assert all(entry["anchor"] in line.lower() for line in lines), entry["anchor"]
        # the rewrite is a raw substring replace: the anchor must occur only as a whole word
        for line in lines:
            whole = re.findall(rf"\b{re.escape(entry['anchor'])}\b", line.lower())
            assert len(whole) == line.lower().count(entry["anchor"]), line
