"""CLIP precision (``load_clip(precision=...)``, ``benchmark.py --clip_precision``) and the artist suite's JPEG
round trip (``--artist_jpeg``), on the shipped toy CLIP and images written here.

* The precision is the loaded model's: ``full`` (the default) computes features in fp32 on every device,
  ``autocast`` runs them under fp16 autocast on CUDA (on the CPU both are fp32: same numbers).
* ``--artist_jpeg`` scores what ConceptPrune's ``artist_erasure.py`` scores: the image saved by PIL as ``.jpg``
  with its defaults (quality 75) and read back; the suite's similarities equal those of hand-saved JPEG files.
"""
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.benchmark import parse_argv
from evaluation.prompt_sets import Row
from evaluation.scores import clip_similarities, jpeg_round_trip
from evaluation.settings import BenchmarkSettings
from evaluation.suites import ARTIST, Context
from scoring.metrics import _autocast, clip_image_features, clip_precision, load_clip

CLIP = Path(__file__).resolve().parents[2] / "assets" / "toyworld" / "clip"
PROMPTS = ["a painting of a red circle in the style of stripes", "a painting of a blue heart",
           "a photo of a cat", "a green square in the style of stripes"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Smooth random RGB PNGs (JPEG changes them, but not beyond recognition)."""
    out = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(len(PROMPTS) * 2):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        p = out / f"{i}.png"
        Image.fromarray(small).resize((64, 64), Image.Resampling.BICUBIC).save(p)
        paths.append(p)
    return paths


def test_precision_is_the_models_and_full_by_default():
    assert clip_precision(load_clip(str(CLIP))) == "full"
    assert clip_precision(load_clip(str(CLIP), precision="autocast")) == "autocast"
    with pytest.raises(ValueError, match="CLIP precision must be one of"):
        load_clip(str(CLIP), precision="half")


def test_autocast_only_for_autocast_models_on_cuda():
    full, amp = load_clip(str(CLIP)), load_clip(str(CLIP), precision="autocast")
    cuda = torch.device("cuda")
    assert isinstance(_autocast(full, cuda), nullcontext)
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else nullcontext():
        ctx = _autocast(amp, cuda)  # (torch warns that CUDA is missing and disables it)
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.float16 and ctx.device == "cuda"
    assert isinstance(_autocast(amp, torch.device("cpu")), nullcontext)  # the CPU stays fp32


def test_on_the_cpu_both_precisions_give_the_same_features(images):
    a = clip_image_features(load_clip(str(CLIP)), images)
    b = clip_image_features(load_clip(str(CLIP), precision="autocast"), images)
    assert a.dtype == torch.float32 and torch.equal(a, b)


def test_benchmark_flags():
    s = parse_argv(["artist"])
    assert s.clip_precision == "full" and not s.artist_jpeg and s.pixels == "round" and s.noise == "ours"
    s = parse_argv(["artist", "--clip_precision", "autocast", "--artist_jpeg"])
    assert s.clip_precision == "autocast" and s.artist_jpeg


def _score(images, jpeg: bool, clip):
    n = len(PROMPTS)
    rows = [Row(f"r{i}", p, 0, None, None, None, {"artist": "Stripes"}) for i, p in enumerate(PROMPTS)]
    settings = BenchmarkSettings(suites=("artist",), artist_jpeg=jpeg, clip_resolved=str(CLIP))
    ctx = Context(settings, {"clip": clip}, "edited", False)
    return ARTIST.score(ctx, rows, images[:n], images[n:])


def test_artist_jpeg_scores_the_saved_jpegs(images, tmp_path):
    clip = load_clip(str(CLIP))
    n = len(PROMPTS)
    # by hand: what artist_erasure.py does, image.save("x.jpg") and Image.open
    jpgs = []
    for p in images:
        with Image.open(p) as im:
            im.save(tmp_path / (p.stem + ".jpg"))
        jpgs.append(tmp_path / (p.stem + ".jpg"))
    for got, path, p in zip(jpeg_round_trip(images), jpgs, images):
        with Image.open(path) as want, Image.open(p) as png:
            assert np.array_equal(np.asarray(got), np.asarray(want.convert("RGB")))
            assert not np.array_equal(np.asarray(got), np.asarray(png.convert("RGB")))
        # PIL's default is quality 75
        buf = tmp_path / "q75.jpg"
        with Image.open(p) as im:
            im.save(buf, quality=75)
        with Image.open(buf) as q75:
            assert np.array_equal(np.asarray(got), np.asarray(q75.convert("RGB")))
    records, summary = _score(images, True, clip)
    want_edit = clip_similarities(clip, jpgs[:n], PROMPTS)
    want_base = clip_similarities(clip, jpgs[n:], PROMPTS)
    assert [r["clip_similarity"] for r in records] == pytest.approx(want_edit, abs=1e-6)
    assert [r["base_clip_similarity"] for r in records] == pytest.approx(want_base, abs=1e-6)
    assert [r["image"] for r in records] == [str(p) for p in images[:n]]  # the records name the PNGs
    assert summary["scored"] == "JPEG quality 75 re-reads"
    plain_records, plain = _score(images, False, clip)
    assert "scored" not in plain
    assert [r["clip_similarity"] for r in plain_records] == pytest.approx(clip_similarities(clip, images[:n], PROMPTS),
                                                                          abs=1e-6)
    assert plain["clip_similarity"] != summary["clip_similarity"]
