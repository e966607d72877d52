"""evaluate.py (evaluation.protocol) end to end on tiny local models: a fake run with one delta, a tiny eval.json and
prompt files, a tiny CLIPModel, a tiny TorchScript feature extractor and a tiny SSCD stand-in."""
import json
import math
import shutil
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CONFIG, tiny_model
from PIL import Image

from evaluation import protocol
from runtime.delta import save_delta

KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"
GEN = ["--numgen", "2", "--steps", "2", "--H", "16", "--W", "16", "--n_samples", "4"]
CONCEPTS = ["grumpy cat", "cat", "persian cat"]


class _MeanStd(torch.nn.Module):
    """Stand-in feature model: per-channel mean and std of the (resized) image -> 6-D features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


class _TinySSCD(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(0.1 * torch.randn(self.conv.weight.shape,
                                                     generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.adaptive_avg_pool2d(self.conv(x), 2).flatten(1)
        return y - y.mean(dim=1, keepdim=True)


def _script(module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(module).save(str(path))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    from ldm.checkpoint import save_state_dict

    d = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=77, eos_token_id=2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(d / "clip")
    base = tiny_model()
    save_state_dict(base.state_dict(), d / "base.ckpt")
    run = d / "logs" / "2024-01-01T00-00-00_grumpy"
    (run / "configs").mkdir(parents=True)
    shutil.copy(TINY_CONFIG, run / "configs" / "2024-01-01T00-00-00-project.yaml")
    (run / "checkpoints").mkdir()
    save_delta(run / "checkpoints" / "delta_step_2.safetensors", {KEY: base.state_dict()[KEY] * 3})
    (run / "checkpoints" / "notes.txt").write_text("not a checkpoint")
    prompts = d / "prompts"
    prompts.mkdir()
    (prompts / "cat_eval.txt").write_text("a photo of a cat\n a cat on a sofa \n\n")
    (prompts / "painting_eval.txt").write_text("")
    eval_json = d / "eval.json"
    eval_json.write_text(json.dumps({
        "object": {"grumpy cat": {"target": "grumpy cat", "anchor": "cat", "hard_negative": ["persian cat"]}},
        "style": {"van gogh": {"target": "van gogh", "anchor": "painting", "hard_negative": []}}}))
    mem = d / "mem.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(mem)
    return {"dir": d, "run": run, "clip": d / "clip", "base": d / "base.ckpt", "eval_json": eval_json,
            "prompts": prompts, "features": _script(_MeanStd(), d / "feat.pt"),
            "sscd": _script(_TinySSCD(), d / "sscd.pt"), "mem": mem}


def evaluate_argv(env, *extra, root=None, caption="grumpy cat", concept_type="object"):
    d = env["dir"]
    return ["--root", str(root or env["run"]), "--concept_type", concept_type, "--caption_target", caption,
            "--eval_json", str(env["eval_json"]), "--eval_prompts", str(env["prompts"]),
            "--outpkl", str(d / "out" / "metrics" / "evaluation.pkl"), "--base_ckpt", str(env["base"]),
            "--base_outpath", str(d / "baseline"), "--clip_model", str(env["clip"]),
            "--feature_model", str(env["features"]), *GEN, *extra]


def run_evaluate(argv):
    """What ``python evaluate.py argv`` computes: the metrics table (errors raise instead of exiting 2)."""
    return protocol.run(protocol.parse_settings(argv))


def test_prompts_and_names():
    # the original's rewrite: strip, then a plain case-sensitive substring replace
    assert protocol.replace_word(" A Cat on a cat category ", "cat", "grumpy cat") == \
        "A Cat on a grumpy cat grumpy category"
    assert protocol.folder_name("C-3PO") == "c_3po"
    assert protocol.folder_name("van gogh") == "van_gogh"


def test_end_to_end_object(env, monkeypatch, capsys):
    df = run_evaluate(evaluate_argv(env))
    run, d = env["run"], env["dir"]
    expname = f"{run.name}_delta_step_2"
    # folders and their contents: 4*numgen for target and anchor, numgen for the hard negative
    for concept, n in zip(CONCEPTS, (8, 8, 2)):
        name = concept.replace(" ", "_")
        for folder in (run / "eval" / f"delta_step_2-{name}", d / "baseline" / f"base-{name}"):
            assert len(list((folder / "samples").glob("*.png"))) == n, folder
            caps = (folder / "caption.txt").read_text().splitlines()
            assert caps[0] == f"a photo of a {concept}" and caps[1] == f"a {concept} on a sofa"
            prompts = json.loads((folder / "prompts.json").read_text())
            assert list(prompts) == [f"{i:05d}" for i in range(n)] and prompts["00000"] == caps[0]
    # every column, finite
    cols = []
    for t in CONCEPTS:
        cols += [f"KID_{t}", f"FID_{t}", f"CLIP scores_{t}_{t}", f"CLIP accuracy_{t}_cat",
                 f"Baseline CLIP scores_{t}_{t}", f"Baseline CLIP accuracy_{t}_cat"]
    assert set(cols) <= set(df.columns) and list(df.index) == [expname]
    assert all(math.isfinite(float(df.loc[expname, c])) for c in cols)
    assert df.loc[expname, "CLIP accuracy_cat_cat"] == 0.0 == df.loc[expname, "Baseline CLIP accuracy_cat_cat"]
    assert df.loc[expname, "KID_grumpy cat"] != 0.0  # the delta changes the images
    out = d / "out" / "metrics"
    stored = pd.read_pickle(out / "evaluation.pkl")
    pd.testing.assert_frame_equal(stored, df)
    assert pd.read_csv(out / "evaluation.csv", index_col=0).shape == df.shape
    assert expname in json.loads((out / "evaluation.json").read_text())
    chart = out / "evaluation_grumpy_cat.png"
    assert chart.is_file() and Image.open(chart).size[0] > 100
    printed = capsys.readouterr().out
    assert "CLIP accuracy_grumpy cat_cat" in printed and str(chart) in printed
    # per-image records beside the table: the column values are their means
    for model, folder in ((expname, run / "eval" / "delta_step_2-grumpy_cat"),
                          ("base", d / "baseline" / "base-grumpy_cat")):
        lines = (out / "evaluation_records" / "grumpy_cat" / f"{model}.jsonl").read_text().splitlines()
        recs = [json.loads(x) for x in lines]
        assert [r["image"] for r in recs] == [str(folder / "samples" / f"{i:05d}.png") for i in range(8)]
        assert [r["seed"] for r in recs] == [42 + i for i in range(8)]
        prefix = "" if model == expname else "Baseline "
        assert df.loc[expname, f"{prefix}CLIP scores_grumpy cat_grumpy cat"] == pytest.approx(
            sum(r["clip_score"] for r in recs) / 8, rel=1e-5)
        assert df.loc[expname, f"{prefix}CLIP accuracy_grumpy cat_cat"] == sum(
            r["clip_score"] > r["anchor_clip_score"] for r in recs) / 8

    # second run: everything cached, no model is built; the table is updated in place
    def no_model(*a, **k):
        raise AssertionError("regenerated")

    monkeypatch.setattr("runtime.loading.load_model_from_config", no_model)  # base + delta
    monkeypatch.setattr("ldm.checkpoint.load_model_from_config", no_model)  # the base alone (evaluation.models)
    mtimes = {p: p.stat().st_mtime_ns for p in (d / "baseline").rglob("*.png")}
    table = json.loads((out / "evaluation.json").read_text())  # the JSON is the table, the pickle only a copy
    table["other_run"] = {"KID_cat": 1.0}
    (out / "evaluation.json").write_text(json.dumps(table))
    df2 = run_evaluate(evaluate_argv(env))
    assert {p: p.stat().st_mtime_ns for p in (d / "baseline").rglob("*.png")} == mtimes
    assert set(df2.index) == {expname, "other_run"}
    assert df2.loc[expname, "KID_cat"] == pytest.approx(df.loc[expname, "KID_cat"])

    # metrics only, from a folder of runs
    df3 = run_evaluate(evaluate_argv(env, "--eval_stage", root=run.parent))
    assert df3.loc[expname, "FID_cat"] == pytest.approx(df.loc[expname, "FID_cat"])

    # a second run reuses the baseline cache (a fresh run with the same delta: only ablated images are made)
    run2 = run.parent / "run2"
    shutil.copytree(run, run2, ignore=shutil.ignore_patterns("eval"))
    calls = []
    from evaluation import models
    monkeypatch.undo()
    real = models.load_model

    def counting(spec, model_config, base, device="cpu"):  # every model the protocol loads, base included
        calls.append(None if spec.kind == "base" else spec.path)
        return real(spec, model_config, base, device)

    monkeypatch.setattr(models, "load_model", counting)
    run_evaluate(evaluate_argv(env, root=run2))
    assert calls and all(c is not None for c in calls)  # never the base model
    assert {p: p.stat().st_mtime_ns for p in (d / "baseline").rglob("*.png")} == mtimes


def test_memorization(env, tmp_path):
    argv = evaluate_argv(env, "--mem_impath", str(env["mem"]), "--sscd_ckpt", str(env["sscd"]), "--numgen", "1",
                 caption="A memorized caption", concept_type="memorization")
    argv[argv.index("--outpkl") + 1] = str(tmp_path / "mem.pkl")
    argv[argv.index("--base_outpath") + 1] = str(tmp_path / "baseline")
    df = run_evaluate(argv)
    row = df.iloc[0]
    for col in ("Memorization rate", "Baseline memorization rate", "KID_a memorized caption",
                "FID_a memorized caption", "CLIP scores_a memorized caption_a memorized caption"):
        assert math.isfinite(float(row[col])), col
    assert 0.0 <= row["Memorization rate"] <= 1.0
    folder = env["run"] / "eval" / "delta_step_2-a_memorized_caption"
    assert (folder / "caption.txt").read_text().splitlines() == ["A memorized caption"] * 4
    assert (tmp_path / "mem_a_memorized_caption.png").is_file()
    recs = [json.loads(x) for x in (tmp_path / "mem_records/a_memorized_caption" / f"{df.index[0]}.jsonl")
            .read_text().splitlines()]
    assert row["Memorization rate"] == sum(r["sscd_similarity"] > 0.5 for r in recs) / len(recs) and len(recs) == 4


@pytest.mark.parametrize("change, exc, match", [
    ({"--caption_target": "nemo"}, ValueError, r"known object targets: 'grumpy cat'"),
    ({"--filter": "step_*.ckpt"}, FileNotFoundError, "no checkpoint matches"),
    ({"--root": "MISSING"}, FileNotFoundError, "--root not found"),
    ({"--base_ckpt": "MISSING"}, FileNotFoundError, "--base_ckpt"),
    ({"--feature_model": "MISSING"}, FileNotFoundError, "--feature_model"),
    ({"--clip_model": "MISSING"}, FileNotFoundError, "--clip_model"),
    ({"--concept_type": "style", "--caption_target": "van gogh"}, FileNotFoundError, "van_gogh_eval.txt"),
    ({"--concept_type": "memorization"}, ValueError, "--mem_impath"),
    ({"--numgen": "1"}, ValueError, "KID needs at least 2"),
    ({"--outpkl": "/proc/no-such-dir/evaluation.pkl"}, ValueError, "--outpkl.*cannot write"),
    ({"--base_outpath": "/proc/no-such-dir/base"}, ValueError, "--base_outpath.*cannot write"),
])
def test_clear_errors(env, change, exc, match):
    argv = evaluate_argv(env)
    for k, v in change.items():
        v = str(env["dir"] / v) if v == "MISSING" else v
        if k in argv:
            argv[argv.index(k) + 1] = v
        else:
            argv += [k, v]
    with pytest.raises(exc, match=match):
        protocol.settings_from_argv(argv)


def test_empty_prompt_file_and_missing_sscd(env, tmp_path):
    (env["prompts"] / "van_gogh_eval.txt").write_text("a starry night by van gogh\n")
    try:
        with pytest.raises(ValueError, match="painting_eval.txt"):
            protocol.settings_from_argv(evaluate_argv(env, concept_type="style", caption="van gogh"))
    finally:
        (env["prompts"] / "van_gogh_eval.txt").unlink()
    with pytest.raises(FileNotFoundError, match="SSCD"):
        protocol.settings_from_argv(evaluate_argv(env, "--mem_impath", str(env["mem"]), "--sscd_ckpt",
                                                  str(tmp_path / "no.pt"), concept_type="memorization", caption="x"))


def test_eval_stage_without_generations(env, tmp_path):
    argv = evaluate_argv(env, "--eval_stage")
    argv[argv.index("--base_outpath") + 1] = str(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="images.txt"):
        run_evaluate(argv)


def test_conceptprune_delta_is_evaluated_like_an_ablation_run(env, tmp_path):
    """conceptprune.py discover -> prune into {run}/checkpoints/ -> evaluate.py --root {run} (no --config)."""
    from ldm.checkpoint import load_state_dict
    from prune.jobs import DiscoverSettings, PruneSettings, run_discover, run_prune

    base, target = tmp_path / "base.txt", tmp_path / "target.txt"
    base.write_text("a photo of a cat\na photo of a dog\n")
    target.write_text("a photo of a grumpy cat\na photo of a grumpy dog\n")
    model = dict(ckpt=str(env["base"]), config=str(TINY_CONFIG))
    s = run_discover(DiscoverSettings(concept="grumpy", base_file=str(base), target_file=str(target), skill_ratio=0.3,
                                      save_images=0, outdir=str(tmp_path / "discover"), H=16, W=16, steps=2,
                                      precision="full", device="cpu", **model))
    run = tmp_path / "logs" / "grumpy_pruned"
    delta = run / "checkpoints" / "delta_pruned.safetensors"
    run_prune(PruneSettings(masks=(s["masks"],), tau=2, out=str(delta), **model))
    assert len(list((run / "configs").glob("*.yaml"))) == 1
    zeroed = load_state_dict(delta)
    assert zeroed and all(k.endswith("ff.net.2.weight") for k in zeroed)

    out = tmp_path / "metrics" / "evaluation.pkl"
    argv = evaluate_argv(env, "--filter", "delta_pruned*", root=run)
    argv[argv.index("--outpkl") + 1] = str(out)
    df = run_evaluate(argv)
    expname = f"{run.name}_delta_pruned"
    assert list(df.index) == [expname]
    assert all(math.isfinite(float(v)) for v in df.loc[expname].values)
    # the pruned model made the images: they differ from the cached base model's for the same prompts and seeds
    pruned = sorted((run / "eval" / "delta_pruned-grumpy_cat" / "samples").glob("*.png"))
    baseline = sorted((env["dir"] / "baseline" / "base-grumpy_cat" / "samples").glob("*.png"))
    assert len(pruned) == len(baseline) == 8
    import numpy as np
    diff = [np.abs(np.asarray(Image.open(a), float) - np.asarray(Image.open(b), float)).mean()
            for a, b in zip(pruned, baseline)]
    assert max(diff) > 0


def test_baseline_cache_notices_rewritten_base_weights(env, tmp_path):
    """Retrained weights of the same size at the same path must not reuse the old base generations."""
    import os

    base = tmp_path / "base.ckpt"
    shutil.copy(env["base"], base)
    argv = evaluate_argv(env)
    for flag, value in (("--base_ckpt", base), ("--base_outpath", tmp_path / "baseline"),
                        ("--outpkl", tmp_path / "m" / "evaluation.pkl")):
        argv[argv.index(flag) + 1] = str(value)
    run_evaluate(argv)
    st = base.stat()
    os.utime(base, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same size, rewritten later
    with pytest.raises(RuntimeError, match="another base model"):
        run_evaluate(argv)


@pytest.mark.parametrize("change, flag", [({"numgen": 0}, "--numgen"), ({"H": 12}, "--H"),
                                          ({"eta": float("nan")}, "--eta"), ({"steps": 2.5}, "--steps"),
                                          ({"precision": "half"}, "--precision")])
def test_settings_built_in_python_are_checked_like_the_command_line(env, change, flag):
    import dataclasses

    from runtime.cli import UsageError

    settings = protocol.parse_settings(evaluate_argv(env))
    with pytest.raises(UsageError, match=flag):
        protocol.run(dataclasses.replace(settings, **change))
