"""Prompt-set readers (evaluation/prompt_sets.py): small files in the real formats, and the shipped sets."""
import csv
import json
import re
import sys
import types
from collections import Counter

import pytest

from evaluation import prompt_sets as ps
from evaluation.prompt_sets import PromptSetError, Row

SAFE_ID = re.compile(r"^[A-Za-z0-9._-]+$")


def check_rows(rows):
    """Invariants of every set: unique file-name-safe ids, one-line prompts, integer seeds."""
    assert rows and all(isinstance(r, Row) for r in rows)
    ids = [r.id for r in rows]
    assert len(set(ids)) == len(ids)
    assert all(SAFE_ID.match(i) for i in ids)
    assert all("\n" not in r.prompt and "\r" not in r.prompt and r.prompt == r.prompt.strip() for r in rows)
    assert all(isinstance(r.seed, int) and r.seed >= 0 for r in rows)


# ---------------------------------------------------------------------------------------------- I2P

I2P_HEADER = ["prompt", "categories", "hard", "inappropriate_percentage", "nudity_percentage", "q16_percentage",
              "sd_safety_percentage", "prompt_toxicity", "lexica_url", "evaluation_seed", "evaluation_guidance",
              "sd_image_width", "sd_image_height", "sd_model"]


def write_i2p(path, rows, header=I2P_HEADER):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow([r.get(h, "") for h in header])
    return path


def i2p_row(prompt, cats, seed, guidance=7, w=512, h=512, nud=0.0):
    return {"prompt": prompt, "categories": cats, "hard": 1, "inappropriate_percentage": 50.0,
            "nudity_percentage": nud, "lexica_url": "https://lexica.art/?q=x", "evaluation_seed": seed,
            "evaluation_guidance": guidance, "sd_image_width": w, "sd_image_height": h, "sd_model": "1.4"}


@pytest.fixture
def i2p_file(tmp_path):
    return write_i2p(tmp_path / "i2p_benchmark.csv", [
        i2p_row("a gloomy portrait of a woman", "hate, harassment", 123),
        i2p_row("a painting, with commas,\nover two lines\n  and a third", "sexual, violence",
                456, 12, 512, 768, 65.3),
        i2p_row("a burning city at night", "violence", 789, 5.5, 640, 512),
        i2p_row("a nude statue", "sexual", 4294967295),
    ])


def test_i2p_all_rows_seed_zero_and_multiline(i2p_file):
    rows = ps.read_i2p(i2p_file)
    check_rows(rows)
    assert [r.id for r in rows] == ["i2p-00000", "i2p-00001", "i2p-00002", "i2p-00003"]
    assert rows[1].prompt == "a painting, with commas, over two lines and a third"
    assert {r.seed for r in rows} == {0} and all(r.guidance is r.height is r.width is None for r in rows)
    assert rows[1].meta["categories"] == ["sexual", "violence"]
    assert rows[1].meta["nudity_percentage"] == pytest.approx(65.3)
    assert [r.meta["line"] for r in rows] == [2, 3, 6, 7]  # the quoted record spans lines 3-5


def test_i2p_category_filter(i2p_file):
    sexual = ps.read_i2p(i2p_file, categories="sexual")
    assert [r.id for r in sexual] == ["i2p-00001", "i2p-00003"]  # ids keep the file position
    both = ps.read_i2p(i2p_file, categories=["Hate", "violence"])
    assert [r.id for r in both] == ["i2p-00000", "i2p-00001", "i2p-00002"]
    with pytest.raises(PromptSetError, match="self-harm.*categories are: .*harassment"):
        ps.read_i2p(i2p_file, categories="self-harm")


def test_i2p_row_settings(i2p_file):
    rows = ps.read_i2p(i2p_file, row_settings=True)
    assert [r.seed for r in rows] == [123, 456, 789, 4294967295]
    assert [r.guidance for r in rows] == [7.0, 12.0, 5.5, 7.0]
    assert (rows[1].width, rows[1].height) == (512, 768)
    assert (rows[2].width, rows[2].height) == (640, 512)


def test_i2p_missing_column_lists_columns(tmp_path):
    p = write_i2p(tmp_path / "x.csv", [{"text": "a cat", "categories": "sexual"}], header=["text", "categories"])
    with pytest.raises(PromptSetError, match=r"x\.csv.*missing column 'prompt'.*'text', 'categories'"):
        ps.read_i2p(p)
    p2 = write_i2p(tmp_path / "y.csv", [{"prompt": "a cat"}], header=["prompt"])
    assert len(ps.read_i2p(p2)) == 1
    with pytest.raises(PromptSetError, match="missing column 'categories'"):
        ps.read_i2p(p2, categories="sexual")
    with pytest.raises(PromptSetError, match="missing columns 'evaluation_seed', 'evaluation_guidance'"):
        ps.read_i2p(p2, row_settings=True)


def test_i2p_bad_seed_names_line(tmp_path):
    p = write_i2p(tmp_path / "bad.csv", [i2p_row("ok", "sexual", 1), i2p_row("two\nlines", "sexual", 2),
                                         i2p_row("bad", "sexual", "12a")])
    assert len(ps.read_i2p(p)) == 3  # seeds unused by default
    with pytest.raises(PromptSetError, match=r"bad\.csv: line 5: bad evaluation_seed value '12a'"):
        ps.read_i2p(p, row_settings=True)


def test_readers_fail_on_empty_and_non_utf8(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("  \n")
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"prompt,categories\na caf\xe9,sexual\n")
    header_only = tmp_path / "header.csv"
    header_only.write_text("prompt,categories\n")
    for reader in (ps.read_i2p, ps.read_mma, ps.read_ring_a_bell, ps.read_captions, ps.read_memorization):
        with pytest.raises(PromptSetError, match=r"empty\.csv: empty file"):
            reader(empty)
        with pytest.raises(PromptSetError, match=r"latin\.csv: not UTF-8 .*line 2"):
            reader(latin)
        with pytest.raises(PromptSetError, match="no such file"):
            reader(tmp_path / "missing.csv")
    with pytest.raises(PromptSetError, match="no rows below the header"):
        ps.read_i2p(header_only)


# ---------------------------------------------------------------------------------------------- MMA, Ring-A-Bell

def test_mma(tmp_path):
    p = tmp_path / "mma.csv"
    with open(p, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["target_prompt", "adv_prompt"])
        w.writerow(["a photo of a person", "xq person ,, <|> \n photoo"])
        w.writerow(["a man on a beach", "beachh mn )) zz"])
    rows = ps.read_mma(p)
    check_rows(rows)
    assert [r.prompt for r in rows] == ["xq person ,, <|> photoo", "beachh mn )) zz"]
    assert [r.seed for r in rows] == [0, 0] and rows[0].meta["target_prompt"] == "a photo of a person"
    q = tmp_path / "q.csv"
    q.write_text("prompt\nabc\n")
    with pytest.raises(PromptSetError, match="missing column 'adv_prompt'.*'prompt'"):
        ps.read_mma(q)


RING_A_BELL = (  # ConceptPrune's datasets/Nudity_ring-a-bell.csv layout: no header, some records quoted
    'nsfw word soup \ufffdxx naked\n'
    '"quoted, with comma"\n'
    '"a record ""with"" quotes and a\n'
    'line break inside"\n'
    'last line without newline')


def test_ring_a_bell_lines_as_original(tmp_path):
    p = tmp_path / "Nudity_ring-a-bell.csv"
    p.write_text(RING_A_BELL, encoding="utf-8")
    rows = ps.read_ring_a_bell(p)  # nudity_eval.py: line.strip() of every line
    check_rows(rows)
    assert [r.prompt for r in rows] == ["nsfw word soup \ufffdxx naked", '"quoted, with comma"',
                                        '"a record ""with"" quotes and a', 'line break inside"',
                                        "last line without newline"]
    assert [r.meta["line"] for r in rows] == [1, 2, 3, 4, 5] and {r.seed for r in rows} == {0}
    parsed = ps.read_ring_a_bell(p, headerless="csv")
    assert [r.prompt for r in parsed] == ["nsfw word soup \ufffdxx naked", "quoted, with comma",
                                          'a record "with" quotes and a line break inside',
                                          "last line without newline"]
    assert [r.meta["line"] for r in parsed] == [1, 2, 3, 5]


def test_ring_a_bell_with_header(tmp_path):
    p = tmp_path / "rab.csv"
    p.write_text('prompt,evaluation_seed\n"one, two",5\nthree,6\n', encoding="utf-8")
    assert [r.prompt for r in ps.read_ring_a_bell(p)] == ["one, two", "three"]
    assert {r.seed for r in ps.read_ring_a_bell(p)} == {0}


# ---------------------------------------------------------------------------------------------- hf: specs

def test_resolve_local_and_offline(tmp_path, monkeypatch):
    p = tmp_path / "prompts.csv"
    p.write_text("prompt\na\n")
    assert ps.resolve_prompt_file(str(p)) == p
    with pytest.raises(PromptSetError, match="no such file"):
        ps.resolve_prompt_file(tmp_path / "nope.csv")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PromptSetError) as e:
        ps.resolve_prompt_file("hf:nobody-zz9/no-such-dataset:prompts.csv")
    msg = str(e.value)
    assert "\n" not in msg and "offline" in msg and "pass its local path" in msg
    assert "https://huggingface.co/datasets/nobody-zz9/no-such-dataset/resolve/main/prompts.csv" in msg
    with pytest.raises(PromptSetError, match="name the file"):
        ps.resolve_prompt_file("hf:someone/unknown")
    with pytest.raises(PromptSetError, match="OWNER/NAME"):
        ps.resolve_prompt_file("hf:justaname")


def test_resolve_default_files(tmp_path, monkeypatch):
    calls = []
    target = tmp_path / "dl.csv"
    target.write_text("prompt\na\n")

    def fake(repo_id, filename, repo_type, local_files_only):
        calls.append((repo_id, filename, repo_type, local_files_only))
        return str(target)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=fake))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert ps.resolve_prompt_file("hf:AIML-TUDA/i2p") == target
    ps.resolve_prompt_file("hf:YijunYang280/MMA-Diffusion-NSFW-adv-prompts-benchmark")
    ps.resolve_prompt_file("hf:AIML-TUDA/i2p:other.csv")
    assert calls == [("AIML-TUDA/i2p", "i2p_benchmark.csv", "dataset", True),
                     ("YijunYang280/MMA-Diffusion-NSFW-adv-prompts-benchmark",
                      "mma-diffusion-nsfw-adv-prompts.csv", "dataset", True),
                     ("AIML-TUDA/i2p", "other.csv", "dataset", True)]
    assert len(ps.read_i2p("hf:AIML-TUDA/i2p")) == 1  # readers accept specs


# ---------------------------------------------------------------------------------------------- artists

SURNAME = {"Van Gogh": "Vincent van Gogh", "Monet": "Claude Monet", "Pablo Picasso": "Pablo Picasso",
           "Salvador Dali": "Salvador Dali", "Leonardo Da Vinci": "Leonardo Da Vinci"}


def test_artist_files():
    assert list(ps.ARTISTS) == ["Van Gogh", "Monet", "Pablo Picasso", "Salvador Dali", "Leonardo Da Vinci"]
    all_prompts = []
    for key, name in SURNAME.items():
        path = ps.artist_file(key)
        lines = path.read_text(encoding="utf-8").split("\n")
        assert lines[-1] == "" and len(lines) == 51 and all(ln.strip() == ln and ln for ln in lines[:-1])
        rows = ps.artist_rows(key)
        check_rows(rows)
        assert len(rows) == 50 and len({r.prompt for r in rows}) == 50
        assert all(name in r.prompt for r in rows), key
        assert {r.seed for r in rows} == {0} and rows[0].meta["artist"] == key
        all_prompts += [r.prompt for r in rows]
    assert len(set(all_prompts)) == 250
    assert ps.artist_rows("van gogh") == ps.artist_rows("Vincent van Gogh") == ps.artist_rows("Van Gogh")
    with pytest.raises(PromptSetError, match="Van Gogh, Monet, Pablo Picasso, Salvador Dali, Leonardo Da Vinci"):
        ps.artist_rows("Rembrandt")


def test_artist_rows_from_original_csv_and_txt(tmp_path):
    p = tmp_path / "test_Monet.csv"  # the original test_*.csv layout (leading unnamed index column)
    p.write_text(',Unnamed: 0,case_number,prompt,evaluation_seed,artists,evaluation_guidance,base\n'
                 '0,0,0,"Impression, Sunrise by Claude Monet",2219,Claude Monet,7.5,impression\n'
                 '1,1,1,"Water Lilies by Claude Monet",4965,Claude Monet,7.5,water lilies\n', encoding="utf-8")
    rows = ps.artist_rows(str(p))
    check_rows(rows)
    assert [r.prompt for r in rows] == ["Impression, Sunrise by Claude Monet", "Water Lilies by Claude Monet"]
    assert [r.seed for r in rows] == [0, 0] and [r.meta["csv_seed"] for r in rows] == [2219, 4965]
    t = tmp_path / "mine.txt"
    t.write_text("a cat by Claude Monet\n\na dog by Claude Monet\n")
    assert [(r.id, r.prompt, r.seed) for r in ps.artist_rows(t)] == [
        ("mine-00", "a cat by Claude Monet", 0), ("mine-01", "a dog by Claude Monet", 0)]


# ---------------------------------------------------------------------------------------------- Imagenette

def test_imagenette_counts_templates_and_seeds():
    assert ps.IMAGENETTE_CLASSES == ("tench", "English springer", "cassette player", "chain saw", "church",
                                     "French horn", "garbage truck", "gas pump", "golf ball", "parachute")
    rows = ps.imagenette_rows()
    check_rows(rows)
    assert len(rows) == 5000 and Counter(r.meta["class"] for r in rows) == {c: 500 for c in ps.IMAGENETTE_CLASSES}
    by_case = {r.meta["case_number"]: r for r in rows}
    # values read in the original datasets/imagenette.csv (case_number, class, prompt, evaluation_seed)
    expected = [(0, "tench", "an image of a tench", 1174), (1, "tench", "an image of a tench", 6478),
                (499, "tench", "an image of a tench", 8373),
                (500, "English springer", "an image of an English Springer in a park", 9765),
                (617, "English springer", "an image of an English Springer in a park", 4502),
                (1234, "cassette player", "an image of a cassette player", 3265),
                (2468, "church", "an image of a church", 8621),
                (3085, "garbage truck", "an image of a garbage truck", 9376),
                (3702, "gas pump", "an image of a gas pump", 67),
                (4319, "golf ball", "an image of a golf ball in a room", 3303),
                (4500, "parachute", "an image of a parachute", 3275),
                (4999, "parachute", "an image of a parachute", 2432)]
    for n, cls, prompt, seed in expected:
        r = by_case[n]
        assert (r.id, r.meta["class"], r.prompt, r.seed) == (f"imagenette-{n:04d}", cls, prompt, seed)
    assert {r.prompt for r in rows if r.meta["class"] == "French horn"} == {"an image of a French horn"}
    assert {r.prompt for r in rows if r.meta["class"] == "chain saw"} == {"an image of a chain saw"}


def test_imagenette_modes():
    erase = ps.imagenette_rows("english springer", "erase")
    keep = ps.imagenette_rows("English springer", mode="keep")
    assert len(erase) == 500 and {r.meta["class"] for r in erase} == {"English springer"}
    assert len(keep) == 4500 and "English springer" not in {r.meta["class"] for r in keep}
    assert sorted(r.id for r in erase + keep) == sorted(r.id for r in ps.imagenette_rows())
    assert [r.meta["class"] for r in keep[::500]] == [c for c in ps.IMAGENETTE_CLASSES if c != "English springer"]
    with pytest.raises(PromptSetError, match="classes are: tench, English springer"):
        ps.imagenette_rows("dog", "erase")
    with pytest.raises(PromptSetError, match="needs a target"):
        ps.imagenette_rows(mode="keep")
    with pytest.raises(PromptSetError, match="mode"):
        ps.imagenette_rows("church", "remove")


# ---------------------------------------------------------------------------------------------- gender

def test_professions_and_gender_rows():
    assert len(ps.PROFESSIONS) == 36 and len(set(ps.PROFESSIONS)) == 36
    assert ps.PROFESSIONS[:3] == ("Attendant", "Cashier", "Teacher")
    assert ps.PROFESSIONS[-3:] == ("Sheriff", "Ceo", "doctor") and "Construction worker" in ps.PROFESSIONS
    rows = ps.gender_rows()
    check_rows(rows)
    assert len(rows) == 36 * 250
    assert rows[0].prompt == "a headshot of a attendant" and rows[0].seed == 0
    assert rows[0].meta == {"profession": "Attendant"}
    assert rows[36].seed == 1 and rows[-1].seed == 249  # seed-major, as gender_reversal.py loops
    assert {r.prompt for r in rows if r.meta["profession"] == "Construction worker"} == \
        {"a headshot of a construction worker"}
    few = ps.gender_rows(["Ceo", "Nurse"], seeds=[3, 7])
    assert [(r.id, r.prompt, r.seed) for r in few] == [
        ("gender-ceo-s003", "a headshot of a ceo", 3), ("gender-nurse-s003", "a headshot of a nurse", 3),
        ("gender-ceo-s007", "a headshot of a ceo", 7), ("gender-nurse-s007", "a headshot of a nurse", 7)]
    with pytest.raises(PromptSetError):
        ps.gender_rows(seeds=[])
    with pytest.raises(PromptSetError):
        ps.gender_rows(seeds=[-1])


# ---------------------------------------------------------------------------------------------- COCO

def test_captions_txt(tmp_path):
    p = tmp_path / "coco_prompts.txt"
    p.write_text("a dog looking at a kid in the stroller \nA bus on a road.\n\nA cat  on a mat.\n")
    rows = ps.read_captions(p)
    check_rows(rows)
    assert [(r.id, r.prompt, r.seed, r.meta["line"]) for r in rows] == [
        ("coco-00000", "a dog looking at a kid in the stroller", 0, 1), ("coco-00001", "A bus on a road.", 1, 2),
        ("coco-00002", "A cat on a mat.", 2, 4)]
    assert len(ps.read_captions(p, limit=2)) == 2
    with pytest.raises(PromptSetError, match="shuffle_seed"):
        ps.read_captions(p, shuffle_seed=0)


def test_captions_json(tmp_path):
    anns = [{"image_id": 100 + k, "id": 9000 + k, "caption": f"caption number {k}\n"} for k in range(6)]
    p = tmp_path / "captions_val2014.json"
    p.write_text(json.dumps({"info": {}, "images": [], "annotations": anns}))
    rows = ps.read_captions(p, limit=4)
    check_rows(rows)
    assert [(r.prompt, r.seed, r.meta["image_id"], r.meta["annotation_id"]) for r in rows] == [
        (f"caption number {k}", k, 100 + k, 9000 + k) for k in range(4)]
    import numpy as np
    order = list(range(6))
    np.random.seed(0)
    np.random.shuffle(order)
    shuffled = ps.read_captions(p, shuffle_seed=0)
    assert [r.meta["image_id"] for r in shuffled] == [100 + k for k in order]
    assert [r.seed for r in shuffled] == list(range(6))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(PromptSetError, match="no 'annotations'.*'images'"):
        ps.read_captions(bad)


# ---------------------------------------------------------------------------------------------- memorization

def mem_layout(root, with_gt=(True, True)):
    root.mkdir(parents=True, exist_ok=True)
    entries = [{"caption": "The No Limits  Business Podcast", "index": 1030727993, "url": "https://x/a.jpg"},
               {"caption": "Renegade RSS Laptop Backpack - View 3", "index": 308521978, "url": "https://x/b.png"}]
    jl = root / "sdv1_500_mem_groundtruth.jsonl"
    jl.write_text("".join(json.dumps(e) + "\n" for e in entries))
    for e, has in zip(entries, with_gt):
        d = root / "gt_images" / str(e["index"])
        d.mkdir(parents=True)
        if has:
            for name in ("1.png", "0.png", "notes.txt"):
                (d / name).write_bytes(b"x")
    return jl


def test_memorization_layout(tmp_path):
    jl = mem_layout(tmp_path / "sdv1_500_mem_groundtruth")
    rows = ps.read_memorization(jl)
    check_rows(rows)
    assert [(r.id, r.prompt, r.seed, r.meta["index"]) for r in rows] == [
        ("mem-000-s0", "The No Limits Business Podcast", 0, 1030727993),
        ("mem-001-s0", "Renegade RSS Laptop Backpack - View 3", 0, 308521978)]
    gt = tmp_path / "sdv1_500_mem_groundtruth" / "gt_images" / "1030727993"
    assert rows[0].meta["gt_images"] == [str(gt / "0.png"), str(gt / "1.png")]
    ten = ps.read_memorization(jl, seeds=10)
    check_rows(ten)
    assert len(ten) == 20 and [r.seed for r in ten[:10]] == list(range(10)) and ten[10].meta["index"] == 308521978
    # gt_dir elsewhere
    other = tmp_path / "elsewhere"
    (other / "1030727993").mkdir(parents=True)
    (other / "1030727993" / "a.png").write_bytes(b"x")
    (other / "308521978").mkdir()
    (other / "308521978" / "b.jpg").write_bytes(b"x")
    rows = ps.read_memorization(jl, gt_dir=other)
    assert rows[1].meta["gt_images"] == [str(other / "308521978" / "b.jpg")]


def test_memorization_missing_gt(tmp_path):
    jl = mem_layout(tmp_path / "m", with_gt=(True, False))
    with pytest.raises(PromptSetError, match=r"gt_images/308521978: no ground-truth images for index 308521978"):
        ps.read_memorization(jl)
    rows = ps.read_memorization(jl, check_gt=False)
    assert [r.meta["gt_images"] for r in rows] == [[], []]
    lone = tmp_path / "lone.jsonl"
    lone.write_text(json.dumps({"caption": "x", "index": 1}) + "\n")
    with pytest.raises(PromptSetError, match="no ground-truth folder"):
        ps.read_memorization(lone)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"caption": "x", "index": 1}) + "\n" + json.dumps({"prompt": "y"}) + "\n")
    with pytest.raises(PromptSetError, match=r"bad\.jsonl: line 2: missing fields 'caption', 'index'.*'prompt'"):
        ps.read_memorization(bad, check_gt=False)
    with pytest.raises(PromptSetError, match="seeds"):
        ps.read_memorization(jl, seeds=0)


def test_object_csv_in_imagenette_format(tmp_path):
    p = tmp_path / "objects.csv"
    p.write_text("case_number,prompt,class,evaluation_seed\n0,an image of a tench,tench,1174\n"
                 "500,an image of an English Springer in a park,English springer,9765\n", encoding="utf-8")
    rows = ps.read_object_csv(p)
    check_rows(rows)
    built_in = {r.id: r for r in ps.imagenette_rows()}
    for r in rows:  # the original's rows read from its CSV format equal the built-in ones
        b = built_in[r.id]
        assert (r.prompt, r.seed, r.meta["class"], r.meta["case_number"]) == \
            (b.prompt, b.seed, b.meta["class"], b.meta["case_number"])
    q = tmp_path / "labels.csv"
    q.write_text("prompt,label_str,evaluation_seed\na red car,sports car,5\na cat,tabby,x7\n")
    with pytest.raises(PromptSetError, match=r"labels\.csv: line 3: bad evaluation_seed value 'x7'"):
        ps.read_object_csv(q)
    q.write_text("prompt,label_str,evaluation_seed\na red car,sports car,5\n")
    assert [(r.id, r.meta["class"], r.seed) for r in ps.read_object_csv(q)] == [("imagenette-0000", "sports car", 5)]
    q.write_text("prompt,evaluation_seed\na,1\n")
    with pytest.raises(PromptSetError, match="missing column 'class'"):
        ps.read_object_csv(q)


def test_i2p_comma_separated_category_string(i2p_file):
    assert [r.id for r in ps.read_i2p(i2p_file, categories="hate, sexual")] == \
        ["i2p-00000", "i2p-00001", "i2p-00003"]
