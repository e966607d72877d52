"""scoring.sscd and ablation.memorization: SSCD preprocessing and scoring (TorchScript stand-in), prompt selection,
pipeline."""
import importlib
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CountingFactory, tiny_factory
from PIL import Image

import ablation.memorization as mem
import scoring.sscd as sscd
from runtime.generate import Sampling, generate_images


class TinySSCD(torch.nn.Module):
    """Stand-in for the SSCD TorchScript file: fixed random conv, 2x2 average pool, centred -> 32-D."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(0.1 * torch.randn(self.conv.weight.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.adaptive_avg_pool2d(self.conv(x), 2).flatten(1)
        return y - y.mean(dim=1, keepdim=True)


@pytest.fixture(scope="module")
def sscd_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("sscd") / "sscd_stand_in.torchscript.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated but SSCD ships as TorchScript
        torch.jit.script(TinySSCD()).save(str(path))
    return path


def _random_image(path: Path, size, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------------------ SSCD
def test_load_sscd_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match=sscd.SSCD_FILE) as info:
        sscd.load_sscd(tmp_path / "nope.pt", "cpu")
    assert "dl.fbaipublicfiles.com" in str(info.value)


def test_import_loads_nothing(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("SSCD loaded at import time")
    monkeypatch.setattr(torch.jit, "load", forbidden)
    importlib.reload(mem)  # must not touch the SSCD file


def test_preprocess_short_side_and_normalisation():
    assert sscd.preprocess_sscd(Image.new("RGB", (40, 30))).shape == (3, 288, 384)  # landscape
    assert sscd.preprocess_sscd(Image.new("RGB", (30, 50))).shape == (3, 480, 288)  # portrait: int(288*50/30)
    assert sscd.preprocess_sscd(Image.new("RGB", (512, 512))).shape == (3, 288, 288)
    assert sscd.preprocess_sscd(Image.new("L", (100, 77))).shape == (3, 288, 374)  # grey -> RGB; int(374.03)

    x = sscd.preprocess_sscd(Image.new("RGB", (288, 300), (255, 0, 128)))
    expected = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    assert x.dtype == torch.float32
    assert torch.allclose(x.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)


def test_preprocess_resize_is_pil_bilinear(tmp_path):
    img = Image.open(_random_image(tmp_path / "a.png", (64, 48), 0))
    x = sscd.preprocess_sscd(tmp_path / "a.png")
    ref = np.asarray(img.resize((384, 288), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    ref = (ref - np.array(sscd.IMAGENET_MEAN, dtype=np.float32)) / np.array(sscd.IMAGENET_STD, dtype=np.float32)
    assert torch.allclose(x, torch.from_numpy(ref.transpose(2, 0, 1)), atol=1e-6)


def test_descriptors_similarities(sscd_path, tmp_path):
    model = sscd.load_sscd(sscd_path, "cpu")
    a = _random_image(tmp_path / "a.png", (16, 16), 1)
    b = _random_image(tmp_path / "b.png", (40, 30), 2)  # another size: batched separately
    c = _random_image(tmp_path / "c.png", (16, 16), 3)
    d = sscd.descriptors(model, [a, b, a, c], batch_size=2)
    assert d.shape == (4, 32)
    assert torch.allclose(d.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(d[0], d[2], atol=1e-6)
    one_by_one = torch.cat([sscd.descriptors(model, [p]) for p in (a, b, a, c)])
    assert torch.allclose(d, one_by_one, atol=1e-5)

    s = sscd.similarities(model, [a, b, c], a)
    assert s.shape == (3,)
    assert s[0].item() == pytest.approx(1.0, abs=1e-5)
    assert (s[1:] < 0.999).all()
    assert torch.allclose(s, d[[0, 1, 3]] @ d[0], atol=1e-6)


# ------------------------------------------------------------------------------------------ selection
def test_select_prompts_order():
    caps = ["A"] * 3 + ["B"] * 3 + ["C"] * 3 + ["D"] * 3
    # kept (<= 0.5, the boundary counts as kept) per caption: A 1, B 3, C 0, D 3
    sims = torch.tensor([0.9, 0.5, 0.7, 0.1, 0.2, 0.3, 0.6, 0.8, 0.51, 0.0, -0.2, 0.4])
    assert mem.select_prompts(caps, sims, anchor_size=2, target_size=1) == (["B", "D"], ["C"])  # tie: B first
    with pytest.warns(UserWarning, match="both anchor and target"):
        assert mem.select_prompts(caps, sims, anchor_size=3, target_size=2) == (["B", "D", "A"], ["A", "C"])
    assert mem.select_prompts(caps, sims, anchor_size=1, target_size=1, threshold=0.95) == (["A"], ["D"])
    with pytest.raises(ValueError, match="distinct captions"):
        mem.select_prompts(caps, sims, anchor_size=5, target_size=1)
    with pytest.raises(ValueError, match="similarities"):
        mem.select_prompts(caps, sims[:-1])


def test_filter_images_and_memorization_rate():
    paths = ["p0", "p1", "p2", "p3"]
    caps = ["x", "y", "x", "z"]
    sims = torch.tensor([0.1, 0.5, 0.51, 0.9])
    assert mem.filter_images(paths, caps, sims) == [("p0", "x"), ("p1", "y")]
    assert mem.filter_images(paths, caps, sims, threshold=0.95) == list(zip(paths, caps))
    assert sscd.memorization_rate(sims) == pytest.approx(0.5)
    assert sscd.memorization_rate([0.0, 0.2]) == 0.0
    with pytest.raises(ValueError):
        mem.filter_images(paths, caps[:3], sims)
    with pytest.raises(ValueError):
        sscd.memorization_rate(torch.tensor([]))


# ------------------------------------------------------------------------------------------ pipeline


PARAPHRASES = ["a photo of a house", "a painting of a galaxy", "an old phone case", "a city at night"]
CAPTION = "New Orleans House Galaxy Case"
GEN = dict(n_check=2, check_steps=2, anchor_size=2, target_size=1,
           sampling=Sampling(steps=2, batch_size=3, height=16, width=16, seed=3))


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_prepare_memorization_data(sscd_path, tmp_path, capsys):
    # the "memorized" image: a copy of the first check image (same prompt, seed and settings)
    pre = generate_images(tiny_factory, [PARAPHRASES[0]] * 2 + [PARAPHRASES[1]], tmp_path / "pre",
                          Sampling(steps=2, batch_size=3, height=16, width=16, seed=3))
    mem_image = tmp_path / "mem.png"
    shutil.copyfile(pre / "samples" / "00000.png", mem_image)

    gen = tmp_path / "orleans_gen"
    factory = CountingFactory()
    images_txt, caption_txt, targets = mem.prepare_memorization_data(
        factory, sscd_path, mem_image, PARAPHRASES, gen, CAPTION, train_size=4, **GEN)
    assert factory.calls == 2  # check set + anchor set
    assert (images_txt, caption_txt) == (gen / "images.txt", gen / "caption.txt")

    # 1. check set: 2 images per paraphrase
    assert _lines(gen / "check" / "caption.txt") == [p for p in PARAPHRASES for _ in range(2)]
    assert len(list((gen / "check" / "samples").glob("*.png"))) == 8
    check_sims = torch.tensor([float(v) for v in _lines(gen / "check" / "sscd_similarity.txt")])
    assert check_sims[0].item() == pytest.approx(1.0, abs=1e-5)  # the memorized image itself

    # 2. anchor/target prompts follow select_prompts on those scores
    anchors, target = mem.select_prompts(_lines(gen / "check" / "caption.txt"), check_sims, 2, 1)
    assert _lines(gen / "anchor.txt") == anchors
    assert _lines(gen / "target.txt") == [CAPTION, *target]
    assert targets == [CAPTION, *target]

    # 3. anchor set: train_size // anchor_size images per anchor prompt
    assert _lines(gen / "anchor" / "caption.txt") == [anchors[0]] * 2 + [anchors[1]] * 2
    anchor_sims = [float(v) for v in _lines(gen / "anchor" / "sscd_similarity.txt")]

    # 4. the training set is the anchor images with similarity <= 0.5, paths relative to gen
    kept = [i for i, s in enumerate(anchor_sims) if s <= 0.5]
    assert kept, "test setup: expected some non-memorized anchor images"
    assert _lines(images_txt) == [f"samples/{i:05d}.png" for i in kept]
    assert _lines(caption_txt) == [_lines(gen / "anchor" / "caption.txt")[i] for i in kept]
    for i in kept:
        assert (gen / "samples" / f"{i:05d}.png").read_bytes() == \
            (gen / "anchor" / "samples" / f"{i:05d}.png").read_bytes()
    assert sorted(p.name for p in (gen / "samples").iterdir()) == [f"{i:05d}.png" for i in kept]

    # rerun: everything reused, no model built, no SSCD needed, the caption is not duplicated
    capsys.readouterr()
    factory2 = CountingFactory()
    again = mem.prepare_memorization_data(factory2, tmp_path / "absent_sscd.pt", mem_image, PARAPHRASES, gen,
                                          CAPTION, train_size=4, **GEN)
    assert factory2.calls == 0
    assert again == (images_txt, caption_txt, targets)
    assert "already prepared" in capsys.readouterr().out

    # an interrupted final stage is redone from the stored scores, without regenerating anything
    (gen / "images.txt").unlink()
    (gen / "samples" / f"{kept[0]:05d}.png").unlink()
    assert mem.prepare_memorization_data(factory2, None, mem_image, PARAPHRASES, gen, CAPTION,
                                         train_size=4, **GEN) == again
    assert factory2.calls == 0
    assert _lines(images_txt) == [f"samples/{i:05d}.png" for i in kept]

    # other settings on the same folder are refused
    with pytest.raises(mem.MemorizationSettingsError, match="threshold"):
        mem.prepare_memorization_data(factory2, sscd_path, mem_image, PARAPHRASES, gen, CAPTION,
                                      train_size=4, **{**GEN, "threshold": 0.4})


def test_prepare_memorization_data_argument_errors(sscd_path, tmp_path):
    img = _random_image(tmp_path / "m.png", (16, 16), 0)
    kw = {**GEN, "anchor_size": 3}
    with pytest.raises(ValueError, match="multiple of anchor_size"):
        mem.prepare_memorization_data(tiny_factory, sscd_path, img, PARAPHRASES, tmp_path / "g", CAPTION, 4, **kw)
    with pytest.raises(ValueError, match="distinct paraphrases"), pytest.warns(UserWarning, match="duplicate"):
        mem.prepare_memorization_data(tiny_factory, sscd_path, img, PARAPHRASES[:1] * 3, tmp_path / "g",
                                      CAPTION, 4, **GEN)
    with pytest.raises(FileNotFoundError, match="memorized image"):
        mem.prepare_memorization_data(tiny_factory, sscd_path, tmp_path / "none.png", PARAPHRASES,
                                      tmp_path / "g", CAPTION, 4, **GEN)
    assert not (tmp_path / "g").exists()
