"""experiments.anchor_study: settings parsing and the table's means, standard errors and differences."""
import math

import pytest

from experiments.anchor_study import parse_setting, table


def test_parse_setting():
    assert parse_setting("dpmpp_2m-20") == ("dpmpp_2m", 20)
    assert parse_setting("ddim-200") == ("ddim", 200)
    for bad in ("euler-20", "ddim", "ddim-0", "ddim-x"):
        with pytest.raises(ValueError, match="anchor setting"):
            parse_setting(bad)


def _run(setting, seed, target, neg, calls):
    summary = {"recipe": "style", "target": "stripes", "anchor": "painting", "target_accuracy": (1.0, target),
               "hard_negative_accuracy": {"polka dots": (1.0, neg)}, "anchor_clip_score": (0.5, 0.4),
               "judge": {"stripes": (1.0, target / 2), "painting": (0.9, 0.8), "polka dots": (0.9, neg)}}
    cost = {"anchor_unet_calls": calls, "anchor_unet_rows": 72 * calls, "anchor_s": calls / 10, "train_total_s": 100,
            "eval_s": 50, "total_s": 150}
    return {"setting": setting, "seed": seed, "recipe": "style", "summary": summary, "cost": cost}


def test_table_mean_se_and_delta():
    runs = [_run("ddim-200", s, t, 0.9, 1000) for s, t in enumerate((0.2, 0.3, 0.4))]
    runs += [_run("dpmpp_2m-20", s, t, 0.9, 100) for s, t in enumerate((0.3, 0.3, 0.3))]
    md = table({"runs": runs})
    se = 0.1 / math.sqrt(3)  # stdev of (0.2, 0.3, 0.4) over sqrt(3)
    line = next(l for l in md.splitlines() if "stripes (target) | CLIP acc" in l)
    assert f"0.300 ± {se:.3f}" in line and f"(Δ +0.000 ± {se:.3f})" in line
    assert "| ddim-200 (n=3) | dpmpp_2m-20 (n=3) |" in md
    assert "| dpmpp_2m-20 | 100 (7200 image evaluations) |" in md
