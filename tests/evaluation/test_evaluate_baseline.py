"""evaluate.py --baseline_set: the paired base images (ours, default) and the original's 4*numgen base images per
concept (``paper``), on the tiny models of test_evaluate.py."""
import json

import pytest
from test_evaluate import env, evaluate_argv, run_evaluate  # noqa: F401  (env is the module fixture)

from evaluation import protocol
from scoring.metrics import feature_extractor, kid


def _paths(env, tmp_path, *extra):  # noqa: F811
    argv = evaluate_argv(env, *extra)
    argv[argv.index("--outpkl") + 1] = str(tmp_path / "metrics" / "evaluation.pkl")
    argv[argv.index("--base_outpath") + 1] = str(tmp_path / "baseline")
    return argv


def test_paper_baseline_set(env, tmp_path):  # noqa: F811
    paired = run_evaluate(_paths(env, tmp_path))
    paper = run_evaluate(_paths(env, tmp_path, "--baseline_set", "paper"))
    base = tmp_path / "baseline"
    # numgen 2: the hard negative gets 4 * 2 = 8 base images in its own folder, each line repeated consecutively
    lines = ["a photo of a persian cat", "a persian cat on a sofa"]
    assert (base / "base8-persian_cat" / "caption.txt").read_text().splitlines() == [lines[0]] * 4 + [lines[1]] * 4
    assert len(list((base / "base8-persian_cat" / "samples").glob("*.png"))) == 8
    assert (base / "base-persian_cat" / "caption.txt").read_text().splitlines() == lines  # the paired set
    # target and anchor: one base set for both modes (already 4 * numgen, same prompts and seeds)
    assert not list(base.glob("base8-grumpy_cat")) and not list(base.glob("base8-cat"))
    row_paired, row_paper = paired.iloc[-1], paper.iloc[-1]
    for t in ("grumpy cat", "cat"):
        assert row_paper[f"KID_{t}"] == row_paired[f"KID_{t}"]
        assert row_paper[f"Baseline CLIP scores_{t}_{t}"] == row_paired[f"Baseline CLIP scores_{t}_{t}"]
    # the hard negative: 2 ablated images against the 8 base images
    settings = protocol.parse_settings(_paths(env, tmp_path))
    features = feature_extractor(settings.feature_model, settings.feature_size, "cpu")
    ablated = sorted((env["run"] / "eval" / "delta_step_2-persian_cat" / "samples").glob("*.png"))
    big = sorted((base / "base8-persian_cat" / "samples").glob("*.png"))
    small = sorted((base / "base-persian_cat" / "samples").glob("*.png"))
    assert len(ablated) == 2 and len(big) == 8
    assert row_paper["KID_persian cat"] == pytest.approx(kid(features(ablated), features(big)))
    assert row_paired["KID_persian cat"] == pytest.approx(kid(features(ablated), features(small)))
    assert row_paper["KID_persian cat"] != row_paired["KID_persian cat"]
    # metrics only, from the existing folders; a missing paper set is named
    again = run_evaluate(_paths(env, tmp_path, "--baseline_set", "paper", "--eval_stage"))
    assert again.iloc[-1]["KID_persian cat"] == pytest.approx(row_paper["KID_persian cat"])
    json.loads((base / "base8-persian_cat" / "prompts.json").read_text())
    for f in (base / "base8-persian_cat").iterdir():
        if f.is_file():
            f.unlink()
    with pytest.raises(FileNotFoundError, match="base8-persian_cat"):
        run_evaluate(_paths(env, tmp_path, "--baseline_set", "paper", "--eval_stage"))
