"""Every entry point at the real SD-v1 size, end to end, on random weights: wall time and peak RSS per step.

    python benchmarks/sd_size_e2e.py --workdir /tmp/sd-e2e [--size 256] [--json out.json]

Builds ``configs/stable-diffusion/v1-inference.yaml`` with random weights and saves it in the layout of
the real ``sd-v1-4.ckpt`` (a Lightning 1.x checkpoint: ``state_dict``, ``global_step``, ``epoch``,
``pytorch-lightning_version`` and the ``callbacks`` state keyed by the ``ModelCheckpoint`` class), then
runs, each as its own process, as a user would:

1. ``train.py`` (style, cross-attn, model-based): 2 anchor images by DDIM, 2 training steps at batch 1;
2. ``sample.py --delta_ckpt``: one image;
3. ``tools/export.py``: the merged single file and a diffusers folder;
4. ``conceptprune.py discover`` (2 prompt pairs) and ``prune``;
5. ``evaluate.py`` with a random-weight CLIP ViT-B/32 built from its config and saved locally, and a
   TorchScript feature extractor for KID/FID (clean-fid's Inception needs a download).

Images are ``--size`` square (256 by default; evaluate.py's ``--eval-size``, 128) with 2 sampling steps:
the point is the code path at full model size, not the pictures. Peak RSS is each process's own (``wait4``), including the processes it
waited for. Prints a markdown table; ``--json`` writes the numbers. No download, CPU or GPU.
"""  # noqa: E501 (--help text, kept as printed)
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONFIG = REPO / "configs/stable-diffusion/v1-inference.yaml"


def make_base(path: Path) -> None:
    """Random SD-v1 weights in the real sd-v1-4.ckpt layout (a Lightning 1.x checkpoint)."""
    import numpy as np
    import torch

    from ldm.util import instantiate_from_config, load_model_config

    torch.manual_seed(0)
    model = instantiate_from_config(load_model_config(CONFIG))
    # the real file pickles Lightning's ModelCheckpoint class as the callbacks key; a stand-in module gives
    # the pickle that global without importing (or needing) pytorch_lightning
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    saved = {n: sys.modules.get(n) for n in names}
    mod = types.ModuleType(names[-1])
    cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
    mod.ModelCheckpoint = cls
    for n in names:
        sys.modules[n] = mod if n == names[-1] else types.ModuleType(n)
    try:
        torch.save({"epoch": 6, "global_step": 470000, "pytorch-lightning_version": "1.4.2",
                    "callbacks": {cls: {"monitor": None, "best_model_score": None, "kth_value": np.float64(np.inf),
                                        "save_last": None, "dirpath": "logs/checkpoints"}},
                    "state_dict": model.state_dict()}, path)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def make_clip(folder: Path) -> None:
    """CLIP ViT-B/32 (transformers' default CLIPConfig is that architecture) with random weights."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    CLIPModel(CLIPConfig()).save_pretrained(folder)


def make_features(path: Path) -> None:
    import warnings

    import torch

    class Features(torch.nn.Module):  # stand-in for Inception: a fixed random conv, pooled
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 16, 7, stride=4)

        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(self.conv(x), 2).flatten(1)

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(Features()).save(str(path))


def run_step(name: str, cmd: list[str], cwd: Path, log: Path) -> dict:
    """One entry point as its own process; wall time and that process tree's peak RSS."""
    t = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if proc.returncode:
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"step {name!r} failed with exit status {proc.returncode}:\n{tail}")
    return {"step": name, "wall_s": round(wall, 1), "peak_rss_gb": round(usage.ru_maxrss / 2 ** 20, 2)}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="scratch folder (about 14 GB: base, merged and diffusers copies)")
    p.add_argument("--size", type=int, default=256, help="image side (a multiple of 8)")
    p.add_argument("--eval-size", type=int, default=128, help="image side of evaluate.py's generations")
    p.add_argument("--numgen", type=int, default=1, help="evaluate.py --numgen (4x images for target and anchor)")
    p.add_argument("--json", default=None, help="write the table as JSON here")
    args = p.parse_args(argv)
    w = Path(args.workdir).resolve()
    w.mkdir(parents=True, exist_ok=True)
    py, size = sys.executable, str(args.size)
    rows = []

    t = time.perf_counter()
    base = w / "sd-v1-4.ckpt"
    make_base(base)
    make_clip(w / "clip-vit-base-patch32")
    make_features(w / "features.pt")
    (w / "painting.txt").write_text("a painting of a harbour at dusk\na portrait of an old fisherman\n")
    (w / "base_prompts.txt").write_text("a house by the sea\na tree in a field\n")
    (w / "target_prompts.txt").write_text("a house by the sea in the style of van gogh\n"
                                          "a tree in a field in the style of van gogh\n")
    (w / "eval_prompts").mkdir(exist_ok=True)
    (w / "eval_prompts" / "van_gogh_eval.txt").write_text("a starry night over a village by van gogh\n")
    (w / "eval_prompts" / "painting_eval.txt").write_text("a painting of a village at night\n")
    (w / "eval.json").write_text(json.dumps({"style": {"van gogh": {"target": "van gogh", "anchor": "painting",
                                                                    "hard_negative": []}}}))
    rows.append({"step": "build random SD-v1 + CLIP (in this process)", "wall_s": round(time.perf_counter() - t, 1),
                 "peak_rss_gb": None})

    logs = w / "logs"
    rows.append(run_step("train.py (2 anchor images, 2 steps)", [
        py, REPO / "train.py", "-t", "--concept_type", "style", "--caption_target", "van gogh", "--prompts",
        w / "painting.txt", "--train_size", "2", "--n_samples", "2", "-rc", base, "--root", w / "data",
        "--logdir", logs, "--name", "e2e", f"data.size={size}", "generation.steps=2", "training.max_steps=2",
        "training.save_freq=0", "training.batch_size=1", "training.num_workers=0", "logging.image_every=0"],
        w, w / "train.log"))
    run = next(logs.iterdir())
    delta = next((run / "checkpoints").glob("delta_step_*"))
    rows.append(run_step("sample.py --delta_ckpt (1 image)", [
        py, REPO / "sample.py", "--ckpt", base, "--delta_ckpt", delta, "--prompt", "a cat in the style of van gogh",
        "--H", size, "--W", size, "--ddim_steps", "2", "--n_samples", "1", "--outdir", w / "samples"],
        w, w / "sample.log"))
    rows.append(run_step("tools/export.py (single file + diffusers)", [
        py, REPO / "tools" / "export.py", "--ckpt", base, "--delta_ckpt", delta, "--out", w / "merged.safetensors",
        "--diffusers", w / "merged-diffusers"], w, w / "export.log"))
    prune = w / "prune"
    rows.append(run_step("conceptprune.py discover (2 pairs)", [
        py, REPO / "conceptprune.py", "discover", "--concept", "van gogh e2e", "--base_file", w / "base_prompts.txt",
        "--target_file", w / "target_prompts.txt", "--skill_ratio", "0.01", "--ckpt", base, "--H", size, "--W", size,
        "--steps", "2", "--batch_size", "2", "--save_images", "1", "--outdir", prune], w, w / "discover.log"))
    rows.append(run_step("conceptprune.py prune", [
        py, REPO / "conceptprune.py", "prune", "--masks", next(prune.glob("masks_sr*.safetensors")), "--ckpt", base,
        "--tau", "2", "--out", w / "delta_pruned.safetensors"], w, w / "prune.log"))
    n_eval = 4 * args.numgen
    rows.append(run_step(f"evaluate.py (2 concepts x {n_eval} images, base and ablated, {args.eval_size}², "
                         f"CLIP ViT-B/32)", [
        py, REPO / "evaluate.py", "--root", run, "--concept_type", "style", "--caption_target", "van gogh",
        "--eval_json", w / "eval.json", "--eval_prompts", w / "eval_prompts", "--numgen", str(args.numgen),
        "--base_ckpt", base,
        "--base_outpath", w / "baseline", "--outpkl", w / "metrics" / "evaluation.pkl", "--clip_model",
        w / "clip-vit-base-patch32", "--feature_model", w / "features.pt", "--feature_size", "64",
        "--steps", "2", "--H", str(args.eval_size), "--W", str(args.eval_size), "--n_samples", "4"],
        w, w / "evaluate.log"))

    print(f"| step ({args.size}², random SD-v1 weights) | wall time | peak RSS |\n|---|---|---|")
    for r in rows:
        rss = f"{r['peak_rss_gb']:.2f} GB" if r["peak_rss_gb"] is not None else ""
        print(f"| {r['step']} | {r['wall_s']:.1f} s | {rss} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
