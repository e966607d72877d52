"""Golden record of the whole fixed-seed pipeline, driven only through the root commands a user runs.

The test runs, as subprocesses of ``sys.executable`` with the working directory at the root of the checkout this
file lives in, on the shipped toy world (``assets/toyworld/``: toy LDM, toy CLIP, judge features) with tiny
settings (32 px, 3 training steps, 4-5 sampler steps, one CPU thread, no GPU, no network)::

    python train.py -t --concept_type style --caption_target stripes --regularization ...   (3 steps -> delta)
    python sample.py ... --delta_ckpt {delta}                  (DDIM, 2 prompts from a file, --metadata)
    python sample.py ... --plms --fixed_code                   (base model, PLMS, 2 copies of one prompt, grid)
    python evaluate.py --root {run} ... --numgen 2 --steps 5    (the paper's protocol: baseline vs ablated)
    python conceptprune.py discover --concept stripes ...       (4 prompt pairs, PLMS 4 steps, skill_ratio 0.1)
    python conceptprune.py prune --tau 3 ...                     (-> pruned delta)
    python benchmark.py artist coco --delta ca={delta} --delta cp={pruned} ...

(``COMMANDS`` below holds the exact argument lists.) It imports nothing from the project's packages: module paths
may change, the root commands and their flags do not. Every input it needs besides the shipped toy assets (prompt
files, the evaluation json) is written by the test itself into ``tmp_path``.

What is recorded in ``tests/data/pipeline_golden.json`` (names relative to the output folder, never a tmp or
machine path, never a run timestamp: the training run folder is found by glob):

* ``tensors``: for each output tensor file (training delta, ConceptPrune norms / masks / pruned delta) and each
  tensor in it: sha256 of the raw bytes, dtype, shape, float64 sum and sum of absolute values;
* ``images``: for each PNG/JPEG written (training anchors, sample.py, evaluate.py's baseline and ablated
  generations, ConceptPrune's discover images, benchmark.py's images): sha256 of the decoded RGB pixel array and
  its mean pixel value;
* ``metrics``: the numbers of evaluate.py's ``evaluation.json``, benchmark.py's ``summary.json`` and per-image
  records, and conceptprune.py's ``discover.json`` / ``delta_pruned.json``;
* ``meta``: exact-match facts (the training delta's safetensors metadata, caption/image list files).

Comparison, by default with tolerance (CPU kernels may differ by ~1e-5 between machines, and one pixel that
flips by 1/255 moves the image metrics computed from it further): the set of outputs, dtypes and shapes must
match exactly; tensor sums within 1e-5 relative (relative to the recorded sum of absolute values); image means
within 0.5 (hashes may differ); metrics within 1e-3 relative (absolute floor 1e-8). A change of behaviour moves
these by far more; PIPELINE_GOLDEN_EXACT=1 is the bit-for-bit check on the machine that wrote the record.
With ``PIPELINE_GOLDEN_EXACT=1`` every hash and every number must be identical (bit-identity on one machine, e.g.
before and after a refactor step). A failure lists every output that differs and by how much.

Regenerate the record with::

    PIPELINE_GOLDEN_WRITE=1 python -m pytest tests/test_pipeline_golden.py

ONLY when a change is meant to change numbers, and say so (and why) in the commit message. A behaviour-preserving
change must pass this test unchanged, with PIPELINE_GOLDEN_EXACT=1 on the machine the record was checked on.

The record was first made at commit 408a091. The pipeline takes 45-65 s of wall time on 2 idle CPU cores (about
46 s of CPU time; up to ~2 min when the cores are shared with other jobs).
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
RECORD = ROOT / "tests" / "data" / "pipeline_golden.json"
TOY = "assets/toyworld"  # relative to ROOT (the subprocesses' working directory)
LDM_CONFIG = f"{TOY}/ldm/ldm.yaml"
LDM_WEIGHTS = f"{TOY}/ldm/toyworld-ldm.safetensors"
CLIP = f"{TOY}/clip"
FEATURES = f"{TOY}/judge/features.torchscript.pt"

TENSOR_RTOL = 1e-5
IMAGE_MEAN_ATOL = 0.5
METRIC_RTOL = 1e-3  # pixel flips on another CPU move CLIP/KID/FID by more than 1e-5
METRIC_ATOL = 1e-8

# Inputs written by the test (lines of the toy world's own prompt files), so that the record depends only on the
# commands and the shipped model files.
FILES = {
    "prompts/painting.txt": ["a painting of a red circle on the grass",
                             "a painting of a red square against a blue sky",
                             "a painting of a red triangle on a plain background",
                             "a painting of a red star in a grassy field"],
    "prompts/sample.txt": ["a painting of a red circle, in the style of stripes",
                           "a painting of a blue heart"],
    "eval_prompts/stripes_eval.txt": ["a painting of a red circle, in the style of stripes",
                                      "a red square on a light grey background, in the style of stripes"],
    "eval_prompts/painting_eval.txt": ["a painting of a red circle",
                                       "a red square on a light grey background"],
    "eval_prompts/polka_dots_eval.txt": ["a painting of a red circle, in the style of polka dots",
                                         "a red square on a light grey background, in the style of polka dots"],
    "eval_prompts/checkerboard_eval.txt": ["a painting of a red circle, in the style of checkerboard",
                                           "a red square on a light grey background, in the style of checkerboard"],
    "prune_prompts/stripes_base.txt": ["a painting of a red circle", "a painting of an orange square",
                                       "a painting of a yellow triangle", "a painting of a green star"],
    "prune_prompts/stripes_target.txt": ["a red circle in the style of stripes",
                                         "an orange square in the style of stripes",
                                         "a yellow triangle in the style of stripes",
                                         "a green star in the style of stripes"],
    "artist/stripes.txt": ["a painting of a red circle, in the style of stripes",
                           "a red square on a light grey background, in the style of stripes"],
    "artist/polka dots.txt": ["a painting of a red circle, in the style of polka dots",
                              "a red square on a light grey background, in the style of polka dots"],
    "captions.txt": ["an image of a purple triangle",
                     "An artwork in the style of checkerboard showing a yellow heart",
                     "a large orange grumpy cat on a plain background",
                     "A green heart on a blank background"],
}
EVAL_JSON = {"style": {"stripes": {"target": "stripes", "anchor": "painting",
                                   "hard_negative": ["polka dots", "checkerboard"]}}}

# {OUT}: the test's output folder; {DELTA}: the training delta (found by glob after train.py); {RUN}: its run folder.
COMMANDS = [
    ["train.py", "-t", "--concept_type", "style", "--caption_target", "stripes", "--prompts",
     "{OUT}/in/prompts/painting.txt", "--name", "golden", "--train_size", "4", "--model_config", LDM_CONFIG,
     "--config", "configs/toyworld/style.yaml", "-rc", LDM_WEIGHTS, "--logdir", "{OUT}/logs", "--root",
     "{OUT}/data", "--n_samples", "4", "--ckpt_format", "safetensors", "--image_logging_freq", "0",
     "--regularization", "training.max_steps=3", "training.save_freq=3", "generation.steps=5"],
    ["sample.py", "--from-file", "{OUT}/in/prompts/sample.txt", "--outdir", "{OUT}/sample_ddim", "--ckpt",
     LDM_WEIGHTS, "--config", LDM_CONFIG, "--delta_ckpt", "{DELTA}", "--ddim_steps", "5", "--H", "32", "--W", "32",
     "--n_samples", "2", "--precision", "full", "--seed", "42", "--skip_grid", "--metadata"],
    ["sample.py", "--prompt", "a painting of a blue heart, in the style of stripes", "--outdir",
     "{OUT}/sample_plms", "--ckpt", LDM_WEIGHTS, "--config", LDM_CONFIG, "--plms", "--fixed_code",
     "--ddim_steps", "5", "--H", "32", "--W", "32", "--n_samples", "2", "--precision", "full", "--seed", "7"],
    ["evaluate.py", "--root", "{RUN}", "--filter", "delta_step_*", "--concept_type", "style", "--caption_target",
     "stripes", "--eval_json", "{OUT}/in/eval.json", "--eval_prompts", "{OUT}/in/eval_prompts", "--numgen", "2",
     "--outpkl", "{OUT}/metrics/evaluation.pkl", "--base_ckpt", LDM_WEIGHTS, "--base_outpath", "{OUT}/baseline",
     "--clip_model", CLIP, "--feature_model", FEATURES, "--feature_size", "32", "--H", "32", "--W", "32",
     "--n_samples", "50", "--precision", "full", "--steps", "5"],
    ["conceptprune.py", "discover", "--concept", "stripes", "--base_file", "{OUT}/in/prune_prompts/stripes_base.txt",
     "--target_file", "{OUT}/in/prune_prompts/stripes_target.txt", "--skill_ratio", "0.1", "--outdir",
     "{OUT}/prune/discover", "--H", "32", "--W", "32", "--precision", "full", "--batch_size", "4", "--steps", "4",
     "--save_images", "2", "--ckpt", LDM_WEIGHTS, "--config", LDM_CONFIG, "--device", "cpu"],
    ["conceptprune.py", "prune", "--masks", "{OUT}/prune/discover/masks_sr0.1.safetensors", "--tau", "3", "--out",
     "{OUT}/prune/checkpoints/delta_pruned.safetensors", "--ckpt", LDM_WEIGHTS, "--config", LDM_CONFIG],
    ["benchmark.py", "artist", "coco", "--base", LDM_WEIGHTS, "--config", LDM_CONFIG, "--outdir", "{OUT}/bench",
     "--H", "32", "--W", "32", "--steps", "5", "--batch_size", "50", "--precision", "full", "--clip_model", CLIP,
     "--feature_model", FEATURES, "--feature_size", "32", "--captions", "{OUT}/in/captions.txt", "--n_captions", "4",
     "--score_device", "cpu", "--artist", "{OUT}/in/artist/stripes.txt", "--artist", "{OUT}/in/artist/polka dots.txt",
     "--delta", "ca={DELTA}", "--delta", "cp={OUT}/prune/checkpoints/delta_pruned.safetensors"],
]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
               PYTHONHASHSEED="0", TQDM_DISABLE="1")
    return env


def _run(argv: list[str], subs: dict) -> float:
    cmd = [sys.executable] + [a.format(**subs) for a in argv]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return time.perf_counter() - t0


def run_pipeline(out: Path) -> dict:
    """Run COMMANDS into ``out``; return {command: seconds}."""
    for rel, lines in FILES.items():
        (out / "in" / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / "in" / rel).write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "in" / "eval.json").write_text(json.dumps(EVAL_JSON), encoding="utf-8")
    subs = {"OUT": str(out)}
    times = {}
    for i, argv in enumerate(COMMANDS):
        if i == 1:  # after train.py: the run folder carries a timestamp, so find it
            runs = sorted((out / "logs").glob("*_golden"))
            assert len(runs) == 1, runs
            deltas = sorted((runs[0] / "checkpoints").glob("delta_step_*.safetensors"))
            assert [d.name for d in deltas] == ["delta_step_3.safetensors"], deltas
            subs.update(RUN=str(runs[0]), DELTA=str(deltas[0]))
        times[" ".join(argv[:2] if argv[0] == "conceptprune.py" else argv[:1]) + f" #{i}"] = _run(argv, subs)
    return times


# ----------------------------------------------------------------------------------------------- summaries
def _one(pattern: str) -> Path:
    found = sorted(glob.glob(pattern))
    assert len(found) == 1, f"expected one match of {pattern}, got {found}"
    return Path(found[0])


def tensor_stats(path: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    out = {}
    for key, t in sorted(load_file(str(path)).items()):
        t = t.detach().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        d = t.to(torch.float64)
        out[key] = {"sha256": hashlib.sha256(raw).hexdigest(), "dtype": str(t.dtype).removeprefix("torch."),
                    "shape": list(t.shape), "sum": float(d.sum()), "abs_sum": float(d.abs().sum())}
    return out


def image_stats(folder: Path, patterns=("*.png", "*.jpg")) -> dict:
    from PIL import Image

    out = {}
    files = sorted(f for p in patterns for f in folder.glob(p))
    assert files, f"no images in {folder}"
    for f in files:
        with Image.open(f) as im:
            a = np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))
        h = hashlib.sha256(f"{a.shape}".encode() + a.tobytes()).hexdigest()
        out[f.name] = {"sha256": h, "mean": float(a.astype(np.float64).mean())}
    return out


def _flatten(prefix: str, value, out: dict):
    """Numeric leaves (and None) of a JSON value, keyed by path; strings are left out."""
    if isinstance(value, dict):
        for k in value:
            _flatten(f"{prefix}/{k}", value[k], out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _flatten(f"{prefix}/{i}", v, out)
    elif value is None or isinstance(value, (bool, int, float)):
        out[prefix] = value


def collect(out: Path) -> dict:
    run = _one(str(out / "logs" / "*_golden"))
    tensors = {
        "train/delta_step_3.safetensors": tensor_stats(run / "checkpoints" / "delta_step_3.safetensors"),
        "prune/discover/norms.safetensors": tensor_stats(_one(str(out / "prune/discover/norms-*.safetensors"))),
        "prune/discover/masks_sr0.1.safetensors": tensor_stats(out / "prune/discover/masks_sr0.1.safetensors"),
        "prune/delta_pruned.safetensors": tensor_stats(out / "prune/checkpoints/delta_pruned.safetensors"),
    }
    folders = {"train/anchors": out / "data/painting_gen/samples",
               "sample_ddim": out / "sample_ddim/samples",
               "sample_plms": out / "sample_plms/samples",
               "sample_plms/grid": out / "sample_plms",
               "prune/discover/images": out / "prune/discover/images"}
    for concept in ("stripes", "painting", "polka_dots", "checkerboard"):
        folders[f"evaluate/baseline/{concept}"] = out / "baseline" / f"base-{concept}" / "samples"
        folders[f"evaluate/ablated/{concept}"] = run / "eval" / f"delta_step_3-{concept}" / "samples"
    for suite in ("artist", "coco"):
        for model in ("base", "ca", "cp"):
            folders[f"benchmark/{suite}/{model}"] = _one(str(out / "bench/images" / suite / model / "*")) / "samples"
    images = {name: image_stats(folder) for name, folder in folders.items()}

    metrics: dict = {}
    rows = json.loads((out / "metrics/evaluation.json").read_text())
    assert len(rows) == 1, list(rows)  # one checkpoint; its key (the run name) carries a timestamp
    _flatten("evaluate", next(iter(rows.values())), metrics)
    for suite in ("artist", "coco"):
        _flatten(f"benchmark/{suite}/summary",
                 json.loads((out / "bench" / suite / "summary.json").read_text())["models"], metrics)
        for model in ("base", "ca", "cp"):
            for line in (out / "bench" / suite / "records" / f"{model}.jsonl").read_text().splitlines():
                rec = json.loads(line)
                _flatten(f"benchmark/{suite}/records/{model}/{rec['id']}", rec, metrics)
    _flatten("benchmark/results", json.loads((out / "bench/results.json").read_text()), metrics)
    discover = json.loads((out / "prune/discover/discover.json").read_text())
    _flatten("conceptprune/discover", {k: discover[k] for k in ("n_calls", "masked_per_call", "n_pairs",
                                                                 "skill_ratio")}, metrics)
    pruned = json.loads((out / "prune/checkpoints/delta_pruned.json").read_text())
    _flatten("conceptprune/prune", {k: pruned[k] for k in ("tau", "skill_ratio", "pruned_weights", "ff2_weights",
                                                            "density_per_layer")}, metrics)

    from safetensors import safe_open

    with safe_open(str(run / "checkpoints" / "delta_step_3.safetensors"), "pt") as f:
        delta_meta = dict(f.metadata() or {})
    meta = {"train/delta_step_3.safetensors metadata": delta_meta,
            "train/anchors caption.txt": (out / "data/painting_gen/caption.txt").read_text(),
            "sample_ddim caption.txt": (out / "sample_ddim/caption.txt").read_text(),
            "sample_ddim images.txt": (out / "sample_ddim/images.txt").read_text()}
    return {"tensors": tensors, "images": images, "metrics": metrics, "meta": meta}


# ----------------------------------------------------------------------------------------------- comparison
def _rel(a: float, b: float, scale: float) -> float:
    return abs(a - b) / max(abs(scale), 1e-30)


def compare(got: dict, want: dict, exact: bool) -> list[str]:
    """Every difference, one line each, naming the output and by how much."""
    bad = []
    if got["commands"] != want["commands"]:
        bad.append("the test's COMMANDS differ from the record's: regenerate the record if that is intended")
    for file in sorted(set(got["tensors"]) | set(want["tensors"])):
        g, w = got["tensors"].get(file), want["tensors"].get(file)
        if g is None or w is None:
            bad.append(f"tensor file {file}: {'missing' if g is None else 'not in the record'}")
            continue
        if set(g) != set(w):
            bad.append(f"tensor file {file}: keys differ: missing {sorted(set(w) - set(g))}, "
                       f"extra {sorted(set(g) - set(w))}")
        for key in sorted(set(g) & set(w)):
            a, b, name = g[key], w[key], f"tensor {file}:{key}"
            if (a["dtype"], a["shape"]) != (b["dtype"], b["shape"]):
                bad.append(f"{name}: dtype/shape {a['dtype']}{a['shape']} vs recorded {b['dtype']}{b['shape']}")
                continue
            if a["sha256"] == b["sha256"]:
                continue
            if exact:
                bad.append(f"{name}: bytes differ (sha256 {a['sha256'][:12]} vs recorded {b['sha256'][:12]}); "
                           f"sum {a['sum']!r} vs {b['sum']!r}, abs_sum {a['abs_sum']!r} vs {b['abs_sum']!r}")
                continue
            scale = b["abs_sum"] if b["abs_sum"] else 1.0
            for stat in ("sum", "abs_sum"):
                r = _rel(a[stat], b[stat], scale)
                if r > TENSOR_RTOL:
                    bad.append(f"{name}: {stat} {a[stat]!r} vs recorded {b[stat]!r} "
                               f"(diff {a[stat] - b[stat]:.3g}, {r:.3g} of the recorded abs_sum; tol {TENSOR_RTOL})")
    for folder in sorted(set(got["images"]) | set(want["images"])):
        g, w = got["images"].get(folder), want["images"].get(folder)
        if g is None or w is None:
            bad.append(f"image folder {folder}: {'missing' if g is None else 'not in the record'}")
            continue
        if set(g) != set(w):
            bad.append(f"image folder {folder}: files differ: missing {sorted(set(w) - set(g))}, "
                       f"extra {sorted(set(g) - set(w))}")
        for name in sorted(set(g) & set(w)):
            a, b = g[name], w[name]
            if a["sha256"] == b["sha256"]:
                continue
            d = a["mean"] - b["mean"]
            if exact:
                bad.append(f"image {folder}/{name}: pixels differ (mean {a['mean']:.4f} vs recorded {b['mean']:.4f}, "
                           f"diff {d:.4g})")
            elif abs(d) > IMAGE_MEAN_ATOL:
                bad.append(f"image {folder}/{name}: mean pixel {a['mean']:.4f} vs recorded {b['mean']:.4f} "
                           f"(diff {d:.4g}; tol {IMAGE_MEAN_ATOL})")
    g, w = got["metrics"], want["metrics"]
    for key in sorted(set(g) | set(w)):
        if key not in g or key not in w:
            bad.append(f"metric {key}: {'missing' if key not in g else 'not in the record'}")
            continue
        a, b = g[key], w[key]
        if a is None or b is None or isinstance(a, bool) or isinstance(b, bool):
            if a != b or type(a) is not type(b):
                bad.append(f"metric {key}: {a!r} vs recorded {b!r}")
            continue
        if a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
            continue
        if exact:
            bad.append(f"metric {key}: {a!r} vs recorded {b!r} (diff {a - b:.3g})")
        elif not (abs(a - b) <= max(METRIC_ATOL, METRIC_RTOL * abs(b))):
            bad.append(f"metric {key}: {a!r} vs recorded {b!r} (diff {a - b:.3g}, rel {_rel(a, b, b):.3g}; "
                       f"tol {METRIC_RTOL})")
    for key in sorted(set(got["meta"]) | set(want["meta"])):
        if got["meta"].get(key) != want["meta"].get(key):
            bad.append(f"{key}: {got['meta'].get(key)!r} vs recorded {want['meta'].get(key)!r}")
    return bad


@pytest.mark.slow
def test_pipeline_matches_golden_record(tmp_path):
    out = tmp_path / "pipeline"
    out.mkdir()
    times = run_pipeline(out)
    got = {"commands": COMMANDS, **collect(out)}
    text = json.dumps(got, indent=1, sort_keys=True) + "\n"
    assert str(tmp_path) not in text and str(ROOT) not in text  # relative names only
    if os.environ.get("PIPELINE_GOLDEN_WRITE") == "1":
        RECORD.parent.mkdir(parents=True, exist_ok=True)
        RECORD.write_text(text)
        print(f"wrote {RECORD} ({sum(times.values()):.0f} s of commands: {times})")
        return
    assert RECORD.is_file(), f"no record {RECORD}: run once with PIPELINE_GOLDEN_WRITE=1"
    want = json.loads(RECORD.read_text())
    got = json.loads(text)  # the same JSON round trip as the record
    exact = os.environ.get("PIPELINE_GOLDEN_EXACT") == "1"
    bad = compare(got, want, exact)
    mode = "exact (PIPELINE_GOLDEN_EXACT=1)" if exact else "with tolerance"
    assert not bad, (f"{len(bad)} output(s) differ from {RECORD.relative_to(ROOT)}, compared {mode}:\n"
                     + "\n".join(bad[:60]) + (f"\n... and {len(bad) - 60} more" if len(bad) > 60 else ""))
