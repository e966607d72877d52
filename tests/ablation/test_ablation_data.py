"""Concept parsing, prompt construction, the ablation dataset and the shipped prompt files (fast, offline)."""
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ablation import data as D
from ablation.prompts import (
    CONCEPT_TYPES,
    Concept,
    object_prompt,
    parse_caption_target,
    styled_prompt,
    target_prompt,
    zoom_prefix,
)
from runtime.files import read_prompts

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ROOT / "assets" / "finetune_prompts"


# ----------------------------------------------------------------------------- parsing

def test_parse_single_concepts():
    assert CONCEPT_TYPES == ("style", "object", "memorization")
    assert parse_caption_target("style", "van gogh") == [Concept(None, "van gogh")]
    assert parse_caption_target("object", "cat+grumpy cat") == [Concept("cat", "grumpy cat")]
    assert parse_caption_target("object", " cat + grumpy cat ") == [Concept("cat", "grumpy cat")]
    mem = "New Orleans House Galaxy Case"
    assert parse_caption_target("memorization", mem) == [Concept("*", mem)]
    assert parse_caption_target("memorization", "*+" + mem) == [Concept("*", mem)]


def test_parse_multi_concepts():
    assert parse_caption_target("style", "van gogh;monet; salvador dali") == [
        Concept(None, "van gogh"), Concept(None, "monet"), Concept(None, "salvador dali")]
    assert parse_caption_target("object", "cat+grumpy cat;dog+snoopy") == [
        Concept("cat", "grumpy cat"), Concept("dog", "snoopy")]
    assert parse_caption_target("memorization", "*+a;*+b;c") == [Concept("*", "a"), Concept("*", "b"),
                                                                 Concept("*", "c")]


@pytest.mark.parametrize("ctype,text,match", [
    ("painting", "van gogh", "unknown concept type"),
    ("style", "", "empty"),
    ("style", "   ", "empty"),
    ("style", "van gogh;", r"concept 2 of 2 .* empty"),
    ("style", "van gogh;;monet", r"concept 2 of 3 .* empty"),
    ("object", "cat+grumpy cat; ;dog+snoopy", r"concept 2 of 3 .* empty"),
    ("object", "grumpy cat", "exactly one '\\+'"),
    ("object", "cat+grumpy+cat", "exactly one '\\+'"),
    ("object", "+grumpy cat", "anchor"),
    ("object", "cat+", "target"),
    ("object", "cat+ ", "target"),
    ("object", "cat+cat", "same"),
    ("object", "cat+CAT", "same"),
    ("style", "painting+van gogh", "style"),
    ("memorization", "*+", "empty"),
    ("memorization", "*", "same"),
])
def test_parse_errors(ctype, text, match):
    with pytest.raises(ValueError, match=match):
        parse_caption_target(ctype, text)


def test_read_prompts(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("  a cat  \n\nA cat\n a cat\n\n")
    assert read_prompts(p) == ["a cat", "A cat", "a cat"]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "e.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="e.txt"):
        read_prompts(tmp_path / "e.txt")


# ----------------------------------------------------------------------------- prompts

def test_styled_prompt_six_forms():
    t, c = "van gogh", "a house by the sea"
    expected = {f"{c}, in the style of {t}", f"{c}, in the style of {t} {t}",
                f"{t} inspired painting, {c}", f"{t} {t} inspired painting, {c}",
                f"in {t}'s style, {c}", f"in {t} {t}'s style, {c}"}
    seen = {styled_prompt(t, c, random.Random(s)) for s in range(300)}
    assert seen == expected


def test_object_prompt_case_and_quirk():
    cat = Concept("cat", "grumpy cat")
    assert object_prompt("a cat curled up on a bed", cat) == "a grumpy cat curled up on a bed"
    assert object_prompt("  A Cat on a Mat ", cat) == "a grumpy cat on a mat"
    assert object_prompt("A cat", Concept("Cat", "Grumpy Cat")) == "a Grumpy Cat"
    assert object_prompt("A DOG in the park", cat) == "a dog in the park"  # absent: just lower-cased
    assert object_prompt("a cat on vacation", cat) == "a grumpy cat on vagrumpy cation"  # documented quirk


def test_memorization_round_robin():
    cs = parse_caption_target("memorization", "*+orig;*+p1;*+p2")
    rng = random.Random(0)
    got = [target_prompt("memorization", cs, i, "anchor prompt", rng) for i in range(6)]
    assert got == ["orig", "p1", "p2", "orig", "p1", "p2"]


def test_style_round_robin():
    cs = parse_caption_target("style", "van gogh;monet")
    assert "van gogh" in target_prompt("style", cs, 0, "a field", random.Random(0))
    assert "monet" in target_prompt("style", cs, 1, "a field", random.Random(0))
    assert "van gogh" in target_prompt("style", cs, 2, "a field", random.Random(0))


def test_multi_object_selection():
    cs = parse_caption_target("object", "cat+grumpy cat;dog+snoopy")
    rng = random.Random(0)
    assert target_prompt("object", cs, 1, "A dog on a beach", rng) == "a snoopy on a beach"
    assert target_prompt("object", cs, 0, "a Dog and a cat", rng) == "a dog and a grumpy cat"  # first match wins
    # neither anchor present: round robin by index (prompt just lower-cased)
    assert target_prompt("object", cs, 0, "A horse", rng) == "a horse"
    assert target_prompt("object", [Concept("cat", "grumpy cat")], 5, "a cat", rng) == "a grumpy cat"


def test_zoom_prefix():
    assert {zoom_prefix("out", random.Random(s)) for s in range(50)} == {"a far away ", "very small "}
    assert {zoom_prefix("in", random.Random(s)) for s in range(50)} == {"zoomed in ", "close up "}
    with pytest.raises(ValueError):
        zoom_prefix("sideways", random.Random(0))


# ----------------------------------------------------------------------------- data

def _make_images(tmp_path, n=3, w=80, h=64):
    (tmp_path / "samples").mkdir()
    paths = []
    for i in range(n):
        arr = np.zeros((h, w, 3), dtype=np.uint8)
        arr[:, : w // 2] = (255, 0, 0)  # left half red, right half blue -> flips are visible
        arr[:, w // 2:] = (0, 0, 255)
        arr[0, 0] = (i, i, i)
        p = tmp_path / "samples" / f"{i:05d}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def test_read_image_list_and_captions(tmp_path):
    paths = _make_images(tmp_path)
    assert D.read_image_list(tmp_path / "samples") == paths
    gen = tmp_path / "data" / "cat_gen"
    gen.mkdir(parents=True)
    (tmp_path / "data" / "cat_gen" / "samples").symlink_to(tmp_path / "samples")
    # reference layout: paths relative to the working directory holding data/
    (gen / "images.txt").write_text("".join(f"data/cat_gen/samples/{p.name}\n" for p in paths))
    assert [p.name for p in D.read_image_list(gen / "images.txt")] == [p.name for p in paths]
    # paths relative to images.txt's own folder, and absolute paths
    (gen / "rel.txt").write_text(f"samples/{paths[0].name}\n{paths[1]}\n")
    got = D.read_image_list(gen / "rel.txt")
    assert got[0].name == paths[0].name and got[1] == paths[1]
    assert D.read_image_list(gen / "images.txt", root=tmp_path)[0] == tmp_path / "data/cat_gen/samples/00000.png"
    (gen / "bad.txt").write_text("samples/00000.png\nsamples/nope.png\n")
    with pytest.raises(FileNotFoundError, match=r"bad.txt, line 2.*nope.png"):
        D.read_image_list(gen / "bad.txt")
    (gen / "caption.txt").write_text("a cat\na cat on a bed\na cat in a box\n")
    imgs, caps = D.load_image_captions(gen / "images.txt", gen / "caption.txt")
    assert len(imgs) == len(caps) == 3
    (gen / "short.txt").write_text("a cat\n")
    with pytest.raises(ValueError, match="1 captions but there are 3 images"):
        D.load_image_captions(gen / "images.txt", gen / "short.txt")
    with pytest.raises(FileNotFoundError):
        D.read_image_list(tmp_path / "nothing.txt")


def test_dataset_shapes_and_plain_pipeline(tmp_path):
    paths = _make_images(tmp_path)
    ds = D.AblationDataset(paths, ["a cat", "a cat on a bed", "A Cat"], "object", "cat+grumpy cat",
                           size=64, latent_factor=8, seed=0)
    assert len(ds) == 3
    item = ds[1]
    assert set(item) == {"image", "mask", "caption", "caption_anchor", "noise_seed"}
    # the item's own noise seed: the same item (same seed, epoch, index and draw) gets the same one
    again = D.AblationDataset(paths, ["a cat", "a cat on a bed", "A Cat"], "object", "cat+grumpy cat",
                              size=64, latent_factor=8, seed=0)
    assert again[1]["noise_seed"] == item["noise_seed"] != ds[2]["noise_seed"]
    assert 0 <= item["noise_seed"] < 2 ** 62
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 8, 8) and item["mask"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert torch.all(item["mask"] == 1)
    assert item["caption"] == "a grumpy cat on a bed" and item["caption_anchor"] == "a cat on a bed"
    assert ds[2]["caption"] == "a grumpy cat" and ds[2]["caption_anchor"] == "A Cat"
    # centre crop of the 80x64 image keeps both halves: red on one side, blue on the other
    img = ds[0]["image"]
    assert {img[0, 32, 2].item() > 0.9, img[0, 32, 61].item() > 0.9} == {True, False}


def test_flip(tmp_path):
    paths = _make_images(tmp_path, n=1)
    flipped = D.AblationDataset(paths, ["a cat"], "object", size=64, flip_p=1.0, seed=0)[0]["image"]
    plain = D.AblationDataset(paths, ["a cat"], "object", size=64, flip_p=0.0, seed=0)[0]["image"]
    assert plain[0, 32, 2] > 0.9 and plain[2, 32, 61] > 0.9  # red left, blue right
    assert flipped[2, 32, 2] > 0.9 and flipped[0, 32, 61] > 0.9
    assert torch.allclose(flipped, plain.flip(-1))


def _force_scale(monkeypatch, scale):
    monkeypatch.setattr(D, "draw_zoom_scale", lambda size, rng: scale)


def test_zoom_out(tmp_path, monkeypatch):
    paths = _make_images(tmp_path, n=1)
    _force_scale(monkeypatch, 24)  # < 0.6*64: pasted on a grey canvas, prefix
    ds = D.AblationDataset(paths, ["a cat"], "object", "cat+grumpy cat", size=64, aug=True, seed=0)
    for _ in range(5):
        item = ds[0]
        assert item["caption"] in ("a far away a grumpy cat", "very small a grumpy cat")
        assert item["caption_anchor"] == "a cat"  # prefix only on the prompt fed to the model
        m = item["mask"][0]
        assert m.shape == (8, 8) and 0 < m.sum() < 64
        # pasted square: non-zero pixels form a 24x24 block, the rest is exactly 0 (grey)
        nz = (item["image"].abs().sum(0) > 0).nonzero()
        (y0, x0), (y1, x1) = nz.min(0).values.tolist(), nz.max(0).values.tolist()
        assert (y1 - y0 + 1, x1 - x0 + 1) == (24, 24)
        rows = m.sum(1).nonzero().flatten().tolist()
        cols = m.sum(0).nonzero().flatten().tolist()
        assert rows == list(range(y0 // 8 + 1, (y0 + 24) // 8 - 1))
        assert cols == list(range(x0 // 8 + 1, (x0 + 24) // 8 - 1))
    _force_scale(monkeypatch, 38)  # the largest even scale below 0.6*64 = 38.4 still pastes
    item = ds[0]
    assert item["caption"].endswith(" a grumpy cat") and item["mask"].sum() < 64


@pytest.mark.parametrize("scale", [40, 50, 64])
def test_zoom_plain_branch(tmp_path, monkeypatch, scale):
    # the original pastes only below 0.6*size; scales in [0.6*size, size] give the plain full image
    paths = _make_images(tmp_path, n=1)
    plain = D.AblationDataset(paths, ["a cat"], "object", "cat+grumpy cat", size=64, flip_p=0.0, seed=0)[0]
    _force_scale(monkeypatch, scale)
    ds = D.AblationDataset(paths, ["a cat"], "object", "cat+grumpy cat", size=64, aug=True, flip_p=0.0, seed=0)
    item = ds[0]
    assert item["caption"] == "a grumpy cat"  # no prefix
    assert torch.all(item["mask"] == 1)
    assert torch.equal(item["image"], plain["image"])


def test_zoom_branch_rule():
    assert [D.zoom_branch(s, 512) for s in (170, 306, 308, 400, 510, 512, 614, 716)] == \
        ["out", "out", "plain", "plain", "plain", "plain", "in", "in"]


def _branch_of(item, plain_image):
    if item["caption"].startswith(("a far away ", "very small ")):
        assert item["mask"].sum() < item["mask"].numel()
        return "out"
    if item["caption"].startswith(("zoomed in ", "close up ")):
        assert torch.all(item["mask"] == 1)
        return "in"
    assert torch.all(item["mask"] == 1) and torch.equal(item["image"], plain_image)
    return "plain"


def test_zoom_branch_rates(tmp_path):
    # size 512: raw scales 170..512 on the zoom-out side (343 values); 170..306 stay below 307.2 after
    # rounding up to even, so P(out) = 2/3 * 137/343, P(plain) = 2/3 * 206/343 (about 40%), P(in) = 1/3
    rng = random.Random(0)
    n = 30000
    counts = {"out": 0, "plain": 0, "in": 0}
    for _ in range(n):
        counts[D.zoom_branch(D.draw_zoom_scale(512, rng), 512)] += 1
    expected = {"out": 2 / 3 * 137 / 343, "plain": 2 / 3 * 206 / 343, "in": 1 / 3}
    assert expected["plain"] == pytest.approx(0.4004, abs=1e-4)
    for k in counts:  # 4 standard errors
        assert abs(counts[k] / n - expected[k]) < 4 * (expected[k] * (1 - expected[k]) / n) ** 0.5, (k, counts)
    # the dataset at size 64 (raw 21..64: 44 values, 21..37 paste): the same rule end to end
    paths = _make_images(tmp_path, n=1)
    plain = D.AblationDataset(paths, ["a cat"], "object", "cat+grumpy cat", size=64, flip_p=0.0, seed=0)[0]["image"]
    ds = D.AblationDataset(paths, ["a cat"], "object", "cat+grumpy cat", size=64, aug=True, flip_p=0.0, seed=3)
    n = 2000
    counts = {"out": 0, "plain": 0, "in": 0}
    for _ in range(n):
        counts[_branch_of(ds[0], plain)] += 1
    expected = {"out": 2 / 3 * 17 / 44, "plain": 2 / 3 * 27 / 44, "in": 1 / 3}
    for k in counts:
        assert abs(counts[k] / n - expected[k]) < 4 * (expected[k] * (1 - expected[k]) / n) ** 0.5, (k, counts)


def test_zoom_in(tmp_path, monkeypatch):
    paths = _make_images(tmp_path, n=1)
    _force_scale(monkeypatch, 86)
    ds = D.AblationDataset(paths, ["a cat"], "object", None, size=64, aug=True, seed=0)
    item = ds[0]
    assert item["caption"] in ("zoomed in a cat", "close up a cat")  # regularization mode: prefix on the anchor
    assert "caption_anchor" not in item
    assert torch.all(item["mask"] == 1) and item["image"].shape == (3, 64, 64)


def test_draw_zoom_scale_range():
    rng = random.Random(0)
    scales = [D.draw_zoom_scale(512, rng) for _ in range(3000)]
    assert all(s % 2 == 0 for s in scales)
    out = [s for s in scales if s <= 512]
    assert min(out) >= 170 and max(out) <= 512
    assert all(614 <= s <= 716 for s in scales if s > 512)
    assert 0.6 < len(out) / len(scales) < 0.72


def test_mask_never_empty_small_size(tmp_path):
    paths = _make_images(tmp_path, n=1)
    ds = D.AblationDataset(paths, ["a cat"], "object", "cat+grumpy cat", size=64, aug=True, seed=1)
    for _ in range(40):
        assert ds[0]["mask"].sum() > 0


def test_mask_fallback_when_border_rule_empties_it(tmp_path, monkeypatch):
    # latent_factor 16 at size 64 with a 22 px paste: the border rule always leaves nothing
    paths = _make_images(tmp_path, n=1)
    _force_scale(monkeypatch, 22)
    ds = D.AblationDataset(paths, ["a cat"], "object", size=64, aug=True, latent_factor=16, seed=0)
    for _ in range(10):
        item = ds[0]
        nz = (item["image"].abs().sum(0) > 0).nonzero()
        (y0, x0), (y1, x1) = nz.min(0).values.tolist(), nz.max(0).values.tolist()
        m = item["mask"][0]
        assert m.shape == (4, 4)
        assert m.sum(1).nonzero().flatten().tolist() == list(range(y0 // 16, y1 // 16 + 1))
        assert m.sum(0).nonzero().flatten().tolist() == list(range(x0 // 16, x1 // 16 + 1))


def test_determinism(tmp_path):
    paths = _make_images(tmp_path)
    caps = ["a cat", "a cat on a bed", "a cat in a box"]

    def run(seed):
        ds = D.AblationDataset(paths, caps, "object", "cat+grumpy cat", size=64, aug=True, seed=seed)
        return [ds[i % 3] for i in range(12)]

    a, b, c = run(7), run(7), run(8)

    def key(items):
        return [(it["caption"], it["image"].sum().item(), it["mask"].sum().item()) for it in items]

    assert key(a) == key(b)
    assert key(a) != key(c)
    assert len(set(key(a))) > 3  # re-reading an index draws a new augmentation
    ds = D.AblationDataset(paths, caps, "style", "van gogh", size=64, seed=3)
    ds.set_epoch(1)
    e1 = [ds[i]["caption"] for i in range(3)]
    ds2 = D.AblationDataset(paths, caps, "style", "van gogh", size=64, seed=3)
    ds2.set_epoch(1)
    assert [ds2[i]["caption"] for i in range(3)] == e1


def test_regularization_mode_and_validation(tmp_path):
    paths = _make_images(tmp_path)
    reg = D.AblationDataset(paths, ["a", "b", "c"], "style", size=64)
    item = reg[0]
    assert item["caption"] == "a" and "caption_anchor" not in item
    with pytest.raises(ValueError, match="2 anchor captions"):
        D.AblationDataset(paths, ["a", "b"], "style", size=64)
    with pytest.raises(ValueError, match="multiple of latent_factor"):
        D.AblationDataset(paths, ["a", "b", "c"], "style", size=60)
    with pytest.raises(ValueError, match="unknown concept type"):
        D.AblationDataset(paths, ["a", "b", "c"], "nudity", size=64)
    with pytest.raises(ValueError, match="does not fit"):
        D.AblationDataset(paths, ["a", "b", "c"], "object", [Concept(None, "van gogh")], size=64)
    with pytest.raises(IndexError):
        reg[3]


def test_memorization_dataset(tmp_path):
    paths = _make_images(tmp_path)
    ds = D.AblationDataset(paths, ["p1", "p2", "p3"], "memorization", "*+orig;*+para", size=64, seed=0)
    assert [ds[i]["caption"] for i in range(3)] == ["orig", "para", "orig"]
    assert [ds[i]["caption_anchor"] for i in range(3)] == ["p1", "p2", "p3"]


def test_paired_dataset_and_collate(tmp_path):
    paths = _make_images(tmp_path)
    caps = ["a cat", "a cat on a bed", "a cat in a box"]
    reg = D.AblationDataset(paths, caps, "object", size=64, aug=True, seed=0)
    abl = D.AblationDataset(paths[:2], caps[:2], "object", "cat+grumpy cat", size=64, aug=True, seed=0)
    pairs = D.PairedDataset(reg, abl)
    assert len(pairs) == 2
    r, a = pairs[1]
    assert not torch.equal(r["image"], a["image"])  # same seed, but the two halves augment independently
    assert a["caption_anchor"] == "a cat on a bed" and r["caption"].endswith("a cat on a bed")
    batch = D.collate([pairs[0], pairs[1]])
    assert isinstance(batch, list) and len(batch) == 2
    reg_b, abl_b = batch
    assert reg_b["image"].shape == (2, 3, 64, 64) and reg_b["mask"].shape == (2, 1, 8, 8)
    assert len(abl_b["caption"]) == 2 and all("grumpy cat" in c for c in abl_b["caption"])
    assert abl_b["caption_anchor"] == ["a cat", "a cat on a bed"]
    assert "caption_anchor" not in reg_b


def test_paired_same_index_same_image(tmp_path):
    # distinct images; without augmentation and flipping both halves return exactly the same pixels
    (tmp_path / "s").mkdir()
    paths = []
    for i in range(3):
        p = tmp_path / "s" / f"{i}.png"
        Image.fromarray(np.full((64, 64, 3), 40 * i, dtype=np.uint8)).save(p)
        paths.append(p)
    reg = D.AblationDataset(paths, ["a", "b", "c"], "style", size=64, flip_p=0)
    abl = D.AblationDataset(paths, ["a", "b", "c"], "style", "van gogh", size=64, flip_p=0)
    for i in range(3):
        r, a = D.PairedDataset(reg, abl)[i]
        assert torch.equal(r["image"], a["image"]) and r["caption"] == a["caption_anchor"]


def test_dataloader_workers_smoke(tmp_path):
    paths = _make_images(tmp_path, n=2)
    ds = D.AblationDataset(paths, ["a cat", "a cat"], "object", "cat+grumpy cat", size=64, aug=True, seed=0)
    for workers in (0, 1):
        batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=workers)))
        assert batch["image"].shape == (2, 3, 64, 64) and len(batch["caption"]) == 2


# ----------------------------------------------------------------------------- prompt files

@pytest.mark.parametrize("name,minimum", [("cat.txt", 150), ("dog.txt", 150), ("fish.txt", 150), ("robot.txt", 150),
                                          ("painting.txt", 150), ("people.txt", 150)])
def test_prompt_files(name, minimum):
    lines = read_prompts(PROMPTS / name)
    assert len(set(lines)) >= minimum
    assert len(lines) == len(set(lines)), "exact duplicates"
    anchor = name[:-4]
    if anchor in ("cat", "dog", "fish", "robot"):
        with_word = [l for l in lines if re.search(rf"\b{anchor}\b", l.lower())]
        assert len(with_word) >= 0.9 * len(lines)
        # the object rewrite is a raw substring replace: keep the anchor out of longer words
        for l in lines:
            assert l.lower().count(anchor) == len(re.findall(rf"\b{anchor}\b", l.lower())), l
    if name == "painting.txt":
        text = "\n".join(lines).lower()
        for artist in ("van gogh", "monet", "dali", "rutkowski", "vermeer"):
            assert artist not in text


# the paper's eight memorized images (compvis/scripts/memorization.sh): our own paraphrase file for
# each, the memorized caption (--caption_target) and the original's image it needs (--mem_impath)
MEMORIZED = {
    "orleans_mem.txt": ("New Orleans House Galaxy Case", "orleans.png", "orleans"),
    "lukas_mem.txt": ("Portrait of Tiger in black and white by Lukas Holas", "lukas.png", "lukas holas"),
    "vangoghcafe_mem.txt": ("VAN GOGH CAFE TERASSE copy.jpg", "vangoghcafe.png", "van gogh"),
    "marvel_mem.txt": ("Captain Marvel Exclusive Ccxp Poster Released Online By Marvel", "marvel.png",
                       "captain marvel"),
    "bloodborne_mem.txt": ("Sony Boss Confirms Bloodborne Expansion is Coming", "bloodborne.png", "bloodborne"),
    "longdark_mem.txt": ("<i>The Long Dark</i> Gets First Trailer, Steam Early Access", "longdark.png",
                         "the long dark"),
    "anne_mem.txt": ("Ann Graham Lotz", "anne.png", "graham lotz"),
    "letterm_mem.txt": ("A painting with letter M written on it Canvas Wall Art Print", "letterm.png", "canvas"),
}


@pytest.mark.parametrize("name", sorted(MEMORIZED))
def test_memorization_paraphrase_files(name):
    caption, image, subject = MEMORIZED[name]
    lines = read_prompts(PROMPTS / name)
    # 30 distinct paraphrases, as the paper's files: 5 check images each, the 10 least memorizing become the
    # anchors, the 3 most memorizing extra targets
    assert len(lines) == len(set(lines)) == 30
    assert all(subject in line.lower() for line in lines), subject
    assert caption.lower() not in {line.lower() for line in lines}  # paraphrases, not the caption itself
    assert parse_caption_target("memorization", caption)[0].target == caption
    # the ablation guide says which caption and which image each file needs
    guide = (ROOT / "docs" / "guides" / "ablate-a-concept.md").read_text()
    row = next((r for r in guide.splitlines() if r.startswith("|") and f"`{name}`" in r), None)
    assert row is not None and caption in row and f"`{image}`" in row, name

