"""Tests of the toy world: determinism, separable vocabulary, textures, instance vs neighbours,
captions, the memorized picture and the data-set layout."""
import io
import itertools
import json
import random

import numpy as np
import pytest
from PIL import Image

import toyworld
from toyworld import (
    BACKGROUNDS,
    CAT_CLASSES,
    CAT_VARIANTS,
    COLOUR_NAMES,
    COLOURS,
    CONCEPTS,
    HARD_NEGATIVES,
    INSTANCE,
    MEMORIZED_CAPTION,
    SHAPES,
    STYLE_TEMPLATES,
    STYLES,
    TEMPLATES,
    TEXTURES,
    Mixture,
    Scene,
    ToyWorldDataset,
    caption,
    iter_samples,
    make_dataset,
    render,
    render_memorized,
    sample_scene,
)

PLAIN_BG = np.array((236, 234, 228), np.float32)


def arr(scene, size=32):
    return np.asarray(render(scene, size), np.float32)


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def silhouette(shape, size):
    a = arr(Scene(shape=shape, colour="red", size="large"), size)
    return np.abs(a - PLAIN_BG).sum(-1) > 60


# ---------------------------------------------------------------- rendering
@pytest.mark.parametrize("size", [32, 64])
def test_render_basic(size):
    img = render(Scene(), size)
    assert img.mode == "RGB" and img.size == (size, size)


def test_render_deterministic_bytes():
    scene = Scene(shape="star", colour="blue", background="grass", style="polka dots", size="large",
                  x=0.45, y=0.55, rotation=7.5)
    assert png_bytes(render(scene, 64)) == png_bytes(render(scene, 64))


def test_every_scene_combination_renders():
    seen = set()
    for shape in SHAPES + ("cat",):
        for style in STYLES:
            for bg in BACKGROUNDS:
                a = arr(Scene(shape=shape, colour="green", background=bg, style=style, size="medium"))
                assert a.shape == (32, 32, 3)
                seen.add(a.tobytes())
    assert len(seen) == (len(SHAPES) + 1) * len(STYLES) * len(BACKGROUNDS)


def test_invalid_scene_rejected():
    with pytest.raises(ValueError):
        Scene(shape="hexagon")
    with pytest.raises(ValueError):
        Scene(colour="teal")
    with pytest.raises(ValueError):
        Scene(shape="circle", variant="grumpy")


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_have_distinct_silhouettes(size):
    masks = {s: silhouette(s, size) for s in SHAPES}
    for a, b in itertools.combinations(SHAPES, 2):
        iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
        assert iou < 0.85, (a, b, iou)


@pytest.mark.parametrize("size", [32, 64])
def test_colours_are_separable(size):
    means = {}
    for c in COLOUR_NAMES:
        a = arr(Scene(shape="square", colour=c, size="large"), size)
        centre = a[size // 3: 2 * size // 3, size // 3: 2 * size // 3].reshape(-1, 3)
        means[c] = centre.mean(0)
        assert np.allclose(means[c], COLOURS[c], atol=3)  # plain fill is the exact colour
    for a, b in itertools.combinations(COLOUR_NAMES, 2):
        assert np.linalg.norm(means[a] - means[b]) > 60, (a, b)


def test_backgrounds_differ():
    corners = {}
    for bg in BACKGROUNDS:
        a = arr(Scene(background=bg, size="small", x=0.5, y=0.5))
        corners[bg] = np.concatenate([a[:4, :4].reshape(-1, 3), a[-4:, -4:].reshape(-1, 3)]).mean(0)
    for a, b in itertools.combinations(BACKGROUNDS, 2):
        assert np.linalg.norm(corners[a] - corners[b]) > 20, (a, b)


def _hf_energy(a):
    """Share of spectral energy (mean removed) above a quarter of the Nyquist band, per channel summed."""
    g = a.mean(-1)
    g = g - g.mean()
    f = np.abs(np.fft.fftshift(np.fft.fft2(g))) ** 2
    n = g.shape[0]
    yy, xx = np.mgrid[0:n, 0:n] - n // 2
    high = np.hypot(yy, xx) > n / 8
    return f[high].sum() / n ** 2


@pytest.mark.parametrize("size", [32, 64])
def test_textures_are_detectable(size):
    crops = {}
    for st in STYLES:
        a = arr(Scene(shape="square", colour="blue", size="large", style=st), size)
        crops[st] = a[size // 3: 2 * size // 3, size // 3: 2 * size // 3]
    plain = _hf_energy(crops["painting"])
    assert crops["painting"].std(axis=(0, 1)).max() < 1.0
    for t in TEXTURES:
        assert crops[t].std(axis=(0, 1)).mean() > 30, t
        assert _hf_energy(crops[t]) > 100 * (plain + 1.0), t
    for a, b in itertools.combinations(TEXTURES, 2):
        assert np.abs(crops[a] - crops[b]).mean() > 20, (a, b)


def test_texture_keeps_colour_identity():
    """A textured object still shows its own colour (the other tone is near-white or near-black)."""
    for c in COLOUR_NAMES:
        a = arr(Scene(shape="square", colour=c, size="large", style="stripes"), 64).reshape(-1, 3)
        assert (np.abs(a - np.array(COLOURS[c])).sum(-1) < 30).mean() > 0.1, c


@pytest.mark.parametrize("size", [32, 64])
def test_instance_close_to_neighbours_far_from_other_classes(size):
    cats = {name: arr(Scene(shape="cat", variant=v, colour="orange", size="large"), size)
            for name, v in zip(CAT_CLASSES, CAT_VARIANTS)}
    inst = cats[INSTANCE]
    dist = lambda x, y: np.abs(x - y).mean()  # noqa: E731
    neighbour = {n: dist(inst, cats[n]) for n in HARD_NEGATIVES + ("cat",)}
    others = {s: dist(inst, arr(Scene(shape=s, colour="orange", size="large"), size)) for s in SHAPES}
    assert min(neighbour.values()) > 1.5, neighbour          # recognisably different ...
    assert max(neighbour.values()) * 2 < min(others.values()), (neighbour, others)  # ... but close


# ---------------------------------------------------------------- memorized picture
def test_memorized_picture_fixed():
    a = png_bytes(render(Scene(memorized=True), 64))
    assert a == png_bytes(render_memorized(64))
    # Other fields are ignored: the picture is always the same.
    assert a == png_bytes(render(Scene(memorized=True, shape="star", colour="blue"), 64))
    assert caption(Scene(memorized=True), random.Random(5)) == MEMORIZED_CAPTION
    m = np.asarray(render_memorized(32), np.float32)
    for s in SHAPES:
        assert np.abs(m - arr(Scene(shape=s, size="large"))).mean() > 30


# ---------------------------------------------------------------- captions
def test_captions_contain_attribute_words():
    rng = random.Random(0)
    for _ in range(200):
        scene = sample_scene(rng, Mixture(style_frac=0.4, cat_frac=0.4, memorized_frac=0.05))
        text = caption(scene, rng)
        if scene.memorized:
            assert text == MEMORIZED_CAPTION
            continue
        low = text.lower()
        assert scene.subject in low and scene.colour in low, text
        if scene.style != "painting":
            assert f"in the style of {scene.style}" in low or f"{scene.style} style" in low, text
        else:
            assert "style" not in low, text


def test_captions_vary_across_templates():
    scene = Scene(shape="heart", colour="red", background="grass", style="stripes", size="large")
    texts = {caption(scene, random.Random(0), template=i) for i in range(len(STYLE_TEMPLATES))}
    assert len(texts) == len(STYLE_TEMPLATES) >= 10
    plain = Scene(shape="heart", colour="red", background="grass")
    texts = {caption(plain, random.Random(0), template=i) for i in range(len(TEMPLATES))}
    assert len(texts) == len(TEMPLATES) >= 10
    drawn = {caption(plain, random.Random(k)) for k in range(50)}
    assert len(drawn) > 20
    assert all(t.count(" ") >= 2 for t in drawn)  # sentences, not labels


def test_anchor_caption_replaces_concept():
    rng = random.Random(1)
    styled = toyworld.anchor_caption(Scene(shape="star", style="polka dots"), rng)
    assert "polka" not in styled and "star" in styled
    cat = toyworld.anchor_caption(Scene(shape="cat", variant="grumpy"), rng)
    assert "cat" in cat and "grumpy" not in cat


def test_concepts_table():
    assert set(CONCEPTS["style"]) == set(TEXTURES)
    assert CONCEPTS["instance"][INSTANCE]["anchor"] == "cat"
    assert CONCEPTS["memorized"]["lighthouse"]["target"] == MEMORIZED_CAPTION


# ---------------------------------------------------------------- data set
def test_sample_scene_mixture_fractions():
    rng = random.Random(123)
    mix = Mixture(style_frac=0.3, cat_frac=0.3, instance_share=0.25, negative_share=0.5, memorized_frac=0.1)
    roles = [sample_scene(rng, mix).role for _ in range(4000)]
    frac = {r: roles.count(r) / len(roles) for r in set(roles)}
    assert abs(frac["memorized"] - 0.1) < 0.02
    assert abs(frac["style"] - 0.3) < 0.03
    assert abs(frac["instance"] - 0.3 * 0.25) < 0.02
    assert abs(frac["hard_negative"] - 0.3 * 0.5) < 0.03
    assert abs(frac["anchor"] - 0.3 * 0.25) < 0.02
    with pytest.raises(ValueError):
        Mixture(style_frac=0.6, cat_frac=0.6)


def test_make_dataset_layout_and_determinism(tmp_path):
    mix = Mixture(memorized_frac=0.2)
    out = make_dataset(40, seed=7, size=32, outdir=tmp_path / "a", mixture=mix)
    images = (out / "images.txt").read_text().splitlines()
    captions = (out / "caption.txt").read_text().splitlines()
    labels = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
    assert len(images) == len(captions) == len(labels) == 40
    assert images[0] == "samples/00000.png"
    for i, (p, c, lab) in enumerate(zip(images, captions, labels)):
        assert p == f"samples/{i:05d}.png" and lab["path"] == p and lab["index"] == i and lab["caption"] == c
        img = Image.open(out / p)
        assert img.size == (32, 32) and img.mode == "RGB"
        assert lab["role"] in {"object", "style", "anchor", "instance", "hard_negative", "memorized"}
        if lab["memorized"]:
            assert c == MEMORIZED_CAPTION
    mem = [out / p for p, lab in zip(images, labels) if lab["memorized"]]
    assert len(mem) >= 2 and len({m.read_bytes() for m in mem}) == 1  # the same picture every time
    assert json.loads((out / "world.json").read_text())["seed"] == 7

    again = make_dataset(40, seed=7, size=32, outdir=tmp_path / "b", mixture=mix)
    for name in ("images.txt", "caption.txt", "labels.jsonl"):
        assert (out / name).read_bytes() == (again / name).read_bytes()
    assert all((out / p).read_bytes() == (again / p).read_bytes() for p in images)

    other = make_dataset(40, seed=8, size=32, outdir=tmp_path / "c", mixture=mix)
    assert (other / "caption.txt").read_text() != (out / "caption.txt").read_text()

    # The in-memory iterator / data set yield exactly what was written (prefix-stable).
    for i, (img, c, lab) in enumerate(iter_samples(7, 32, mix, start=0, n=5)):
        assert c == captions[i] and png_bytes(img) == (out / images[i]).read_bytes()
    ds = ToyWorldDataset(40, seed=7, size=32, mixture=mix)
    assert len(ds) == 40 and ds[39][1] == captions[39]
    with pytest.raises(IndexError):
        ds[40]


def test_dataset_readable_by_ablation_data(tmp_path):
    ablation_data = pytest.importorskip("ablation.data")
    out = make_dataset(6, seed=1, size=32, outdir=tmp_path)
    paths, caps = ablation_data.load_image_captions(out / "images.txt", out / "caption.txt")
    assert len(paths) == len(caps) == 6 and all(p.exists() for p in paths)
