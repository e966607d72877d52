"""Numbers that mean what the originals' mean (issue 32, items 1 and 2).

* COCO from COCO's captions JSON: the original (ConceptPrune 72927d9, ``utils/base_utils.py: coco_dataset``) loads
  the ``annotations`` list, calls ``np.random.seed(0); np.random.shuffle(annotations)`` and keeps the first 480
  (``eval_coco.py``). That is now the default of ``benchmark.py coco``; ``--coco_order file`` keeps file order.
* Gender reversal per profession, as the development repository's ``benchmarks/ratio-gender.py`` computes it, and
  the mean over professions, beside the pooled rate.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from evaluation import benchmark as bench
from evaluation import scores
from evaluation.settings import BenchmarkSettings
from evaluation.suites import SUITES
from toyworld.mission import asset_paths

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "assets/toyworld"


# ------------------------------------------------------------------ COCO: the original's 480
def _coco_json(path: Path, n_images: int = 250, per_image: int = 5) -> Path:
    """A captions file in the layout of COCO's ``annotations/captions_val2014.json`` (info, images, licenses,
    annotations with image_id / id / caption; five captions per image, ids not in image order)."""
    rng = np.random.default_rng(7)
    images = [{"license": 1, "file_name": f"COCO_val2014_{i:012d}.jpg", "coco_url": "", "height": 480, "width": 640,
               "date_captured": "2013-11-14 16:28:13", "flickr_url": "", "id": int(i)}
              for i in rng.choice(600000, n_images, replace=False)]
    things = ["cat", "dog", "bus", "kite", "pizza", "train", "horse", "clock"]
    anns, ann_id = [], 10000
    for k in range(per_image):
        for j, img in enumerate(images):
            ann_id += int(rng.integers(1, 50))
            anns.append({"image_id": img["id"], "id": ann_id,
                         "caption": f"A {things[(j + k) % len(things)]} number {j} seen from view {k}. "})
    doc = {"info": {"description": "COCO 2014 Dataset", "year": 2014, "version": "1.0"},
           "images": images, "licenses": [{"url": "", "id": 1, "name": "x"}], "annotations": anns}
    path.write_text(json.dumps(doc))
    return path


def _original_selection(path: Path, n: int) -> list[dict]:
    """The original's steps, with numpy's legacy global generator (its state restored after)."""
    data = json.loads(path.read_text())["annotations"]
    state = np.random.get_state()
    try:
        np.random.seed(0)
        np.random.shuffle(data)
    finally:
        np.random.set_state(state)
    return data[:n]


def test_coco_json_default_is_the_originals_shuffled_480(tmp_path):
    path = _coco_json(tmp_path / "captions_val2014.json")
    settings = bench.parse_argv(["coco", "--captions", str(path), "--n_captions", "480"])
    assert settings.coco_order == "shuffled"
    rows = SUITES["coco"].rows(settings)
    want = _original_selection(path, 480)
    assert [r.meta["annotation_id"] for r in rows] == [a["id"] for a in want]
    assert [r.prompt for r in rows] == [" ".join(a["caption"].split()) for a in want]
    assert [r.meta["image_id"] for r in rows] == [a["image_id"] for a in want]
    assert [r.seed for r in rows] == list(range(480))  # seeds follow the row, as before
    file_order = json.loads(path.read_text())["annotations"][:480]
    assert [r.meta["annotation_id"] for r in rows] != [a["id"] for a in file_order]  # the shuffle matters
    # --coco_order file: the first 480 annotations as the file lists them
    rows = SUITES["coco"].rows(bench.parse_argv(["coco", "--captions", str(path), "--n_captions", "480",
                                                 "--coco_order", "file"]))
    assert [r.meta["annotation_id"] for r in rows] == [a["id"] for a in file_order]


def test_coco_selection_through_benchmark_check(tmp_path):
    """The command line's checks build the same rows (toy CLIP and feature model; nothing generated)."""
    path = _coco_json(tmp_path / "captions_val2014.json", n_images=40)
    p = asset_paths(ASSETS)
    plan = bench.check(bench.parse_argv([
        "coco", "--captions", str(path), "--n_captions", "20", "--base", str(p["weights"]), "--config",
        str(p["config"]), "--outdir", str(tmp_path / "out"), "--H", "32", "--W", "32", "--clip_model", str(p["clip"]),
        "--feature_model", str(p["features"]), "--gpus", "cpu"]))
    assert [r.meta["annotation_id"] for r in plan.rows["coco"]] == [a["id"] for a in _original_selection(path, 20)]
    assert not (tmp_path / "out").exists()


def test_coco_text_file_keeps_its_order(tmp_path):
    """A text file (the original's coco_prompts.txt is the shuffled selection already) is never shuffled."""
    path = tmp_path / "coco_prompts.txt"
    path.write_text("".join(f"caption {i}\n" for i in range(30)))
    rows = SUITES["coco"].rows(BenchmarkSettings(suites=("coco",), captions=str(path)))
    assert [r.prompt for r in rows] == [f"caption {i}" for i in range(30)]


def test_coco_order_from_python_is_checked(tmp_path):
    path = _coco_json(tmp_path / "c.json", n_images=4)
    with pytest.raises(ValueError, match="--coco_order must be one of shuffled, file"):
        SUITES["coco"].rows(BenchmarkSettings(suites=("coco",), captions=str(path), coco_order="random"))


# ------------------------------------------------------------------ gender: per profession
PROFS = ["A", "A", "A", "A", "B", "B", "B", "C", "C"]
BASE = ["man", "man", "woman", "woman", "man", "man", "man", "woman", "woman"]
EDITED = ["woman", "man", "man", "woman", "woman", "woman", "man", "woman", "man"]


def test_per_profession_reversal_by_hand():
    """A: 2 base men, 1 flips (1/2); 2 base women, 1 flips (1/2). B: 3 base men, 2 flip (2/3); no base women.
    C: no base men; 2 base women, 1 flips (1/2). Pooled: 3 of 5 men, 2 of 4 women."""
    r = scores.reversal_rates(BASE, EDITED, professions=PROFS)
    assert r["m_to_f"] == pytest.approx(3 / 5) and r["f_to_m"] == pytest.approx(2 / 4)
    per = r["per_profession"]
    assert list(per) == ["A", "B", "C"]
    assert per["A"] == {"m_to_f": 0.5, "f_to_m": 0.5, "n_base_man": 2, "n_base_woman": 2}
    assert per["B"]["m_to_f"] == pytest.approx(2 / 3) and per["B"]["f_to_m"] is None and per["B"]["n_base_woman"] == 0
    assert per["C"]["m_to_f"] is None and per["C"]["f_to_m"] == 0.5
    # the mean over the professions where the rate exists ...
    assert r["m_to_f_mean"] == pytest.approx((1 / 2 + 2 / 3) / 2) and r["m_to_f_professions"] == 2
    assert r["f_to_m_mean"] == pytest.approx((1 / 2 + 1 / 2) / 2) and r["f_to_m_professions"] == 2
    # ... and ratio-gender.py's own: a profession without base images of the gender counts 0.0 (it divides by 1)
    assert r["m_to_f_mean_zero_filled"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert r["f_to_m_mean_zero_filled"] == pytest.approx((1 / 2 + 0 + 1 / 2) / 3)
    # without professions: the pooled rates only, as before
    assert "per_profession" not in scores.reversal_rates(BASE, EDITED)
    with pytest.raises(ValueError, match="9 predictions but 2 professions"):
        scores.reversal_rates(BASE, EDITED, professions=["A", "B"])


def _ratio_gender_rule(base, edited, profs):
    """ratio-gender.py's per-profession counting, re-created from its conditions (one edited model for both
    directions): a success is a base image of the gender whose prediction changed; the rate divides by the base
    count of that gender, or by 1 when there is none."""
    out = {}
    for p in dict.fromkeys(profs):
        pairs = [(b, e) for b, e, q in zip(base, edited, profs) if q == p]
        m = [(b, e) for b, e in pairs if b == "man"]
        f = [(b, e) for b, e in pairs if b == "woman"]
        out[p] = (sum(b != e for b, e in m) / (len(m) or 1.0), sum(b != e for b, e in f) / (len(f) or 1.0))
    return out


def test_zero_filled_mean_is_ratio_gender_rule_on_random_predictions():
    rng = np.random.default_rng(3)
    profs = [f"p{i % 7}" for i in range(300)]
    base = [("man", "woman")[x] for x in rng.integers(0, 2, 300)]
    edited = [("man", "woman")[x] for x in rng.integers(0, 2, 300)]
    base[0::7] = ["man"] * len(base[0::7])  # profession p0: no base women
    r = scores.reversal_rates(base, edited, professions=profs)
    orig = _ratio_gender_rule(base, edited, profs)
    assert r["m_to_f_mean_zero_filled"] == pytest.approx(np.mean([v[0] for v in orig.values()]))
    assert r["f_to_m_mean_zero_filled"] == pytest.approx(np.mean([v[1] for v in orig.values()]))
    assert r["per_profession"]["p0"]["f_to_m"] is None and r["f_to_m_professions"] == 6


def test_gender_suite_reports_per_profession_rates(tmp_path):
    """The toy model against itself with every ff.net.2 weight zeroed: the summary's per-profession rates and their
    mean are those of its own records, and the table shows the mean beside the pooled rate."""
    from runtime.delta import save_delta

    sd = load_file(str(ASSETS / "ldm/toyworld-ldm.safetensors"))
    delta = tmp_path / "zero_ffn.safetensors"
    save_delta(delta, {k: torch.zeros_like(v) for k, v in sd.items() if k.endswith("ff.net.2.weight")})
    p = asset_paths(ASSETS)
    out = tmp_path / "b"
    assert bench.main(["gender", "--professions", "doctor,nurse,baker", "--gender_seeds", "2", "--base",
                       str(p["weights"]), "--config", str(p["config"]), "--outdir", str(out), "--H", "32", "--W",
                       "32", "--clip_model", str(p["clip"]), "--steps", "10", "--precision", "full",
                       "--score_device", "cpu", "--gpus", "cpu", "--delta", f"zero-ffn={delta}"]) == 0
    summary = json.loads((out / "gender/summary.json").read_text())["models"]["zero-ffn"]
    records = [json.loads(x) for x in (out / "gender/records/zero-ffn.jsonl").read_text().splitlines()]
    by_hand = scores.reversal_rates([r["base_gender"] for r in records], [r["gender"] for r in records],
                                    professions=[r["profession"] for r in records])
    assert set(summary["per_profession"]) == {"doctor", "nurse", "baker"}
    for key in ("m_to_f", "f_to_m", "m_to_f_mean", "f_to_m_mean", "m_to_f_mean_zero_filled"):
        assert summary[key] == by_hand[key], key
    assert summary["per_profession"] == json.loads(json.dumps(by_hand["per_profession"]))
    assert "gender: m->f mean/prof" in (out / "results.md").read_text()
