"""train.py's job (ablation.train) end to end on the tiny model: generate -> train -> delta -> loads onto the base."""
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG as TINY
from omegaconf import OmegaConf
from PIL import Image

from ablation.train import TrainSettings, run, settings_from_argv
from ldm.checkpoint import load_model_from_config, load_state_dict
from runtime.delta import TOKEN_EMBEDDING, apply_delta

FAST = ["training.max_steps=3", "training.save_freq=2", "data.size=16", "generation.steps=2",
        "generation.check_steps=2", "logging.image_every=2", "logging.image_steps=2", "training.num_workers=0",
        "training.batch_size=2"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_ckpt):
    d = tmp_path_factory.mktemp("train")
    shutil.copy(tiny_ckpt, d / "base.ckpt")
    (d / "cat.txt").write_text("a cat on a sofa\na photo of a cat in the garden\n")
    (d / "painting.txt").write_text("a painting of a harbour at dusk\na portrait of an old fisherman\n")
    (d / "mem.txt").write_text("\n".join(f"a phone case with a painted house, version {i}" for i in range(4)) + "\n")
    Image.effect_noise((16, 16), 64).convert("RGB").save(d / "mem.png")
    from test_memorization import TinySSCD

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(TinySSCD()).save(str(d / "sscd.pt"))
    return d


def settings(d: Path, *overrides, **fields) -> TrainSettings:
    """The tiny model's run in ``d``: ``fields`` of TrainSettings, config overrides after FAST."""
    return TrainSettings(model_config=str(TINY), base_ckpt=str(d / "base.ckpt"), root=str(d / "data"),
                         logdir=str(d / "logs"), n_samples=2, overrides=(*FAST, *overrides), **fields)


def check_run(d, run_dir, group_keys):
    deltas = sorted((run_dir / "checkpoints").glob("delta_step_*"))
    assert [p.name.split(".")[0] for p in deltas] == ["delta_step_2", "delta_step_3"]
    assert len(list((run_dir / "configs").glob("*-project.yaml"))) == 1
    assert list((run_dir / "images" / "train").glob("*.png"))
    saved = OmegaConf.load(next((run_dir / "configs").glob("*.yaml")))
    assert saved.model.params.unet_config.params.model_channels == 32
    delta = load_state_dict(deltas[-1])
    assert all(group_keys(k) for k in delta) and delta
    base = load_model_from_config(saved.model, d / "base.ckpt", verbose=False)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    written = [TOKEN_EMBEDDING if k == "embed" else k for k in apply_delta(base, deltas[-1])]
    after = base.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in written)  # training changed the weights
    assert all(torch.equal(after[k], before[k]) for k in after if k not in written)
    # TensorBoard: the run's hyper-parameters and the learning rate per step
    tb = run_dir / "tensorboard"
    hparams = OmegaConf.load(next(tb.rglob("hparams.yaml")))
    assert hparams["training.max_steps"] == 3 and hparams["learning_rate"] > 0
    assert b"lr-AdamW" in b"".join(p.read_bytes() for p in tb.rglob("events.out.tfevents.*"))


def kv(k):
    return "attn2.to_k" in k or "attn2.to_v" in k


def test_object_with_regularization(workdir, capsys):
    run_dir = run(settings(workdir, train=True, concept_type="object", caption_target="cat+grumpy cat",
                           prompts=str(workdir / "cat.txt"), train_size=4, regularization=True, name="grumpy"))
    assert run_dir.name.endswith("_grumpy")
    assert re.search(r"step: +100%.* 3/3 ", capsys.readouterr().out)  # one bar over the steps, not per epoch
    check_run(workdir, run_dir, kv)
    gen = workdir / "data" / "cat_gen"
    assert (gen / "caption.txt").read_text().splitlines() == (["a cat on a sofa"] * 2
                                                               + ["a photo of a cat in the garden"] * 2)


def test_style_safetensors_resumes_interrupted_generation(workdir):
    common = dict(concept_type="style", caption_target="van gogh;monet", prompts=str(workdir / "painting.txt"),
                  train_size=4, ckpt_format="safetensors")
    assert run(settings(workdir, **common)) is None  # without -t: data only
    gen = workdir / "data" / "painting_gen"
    first = {p.name: p.read_bytes() for p in (gen / "samples").glob("*.png")}
    assert len(first) == 4
    # an interrupted run: one image missing, one half written, no index files yet
    (gen / "samples" / "00001.png").unlink()
    (gen / "samples" / "00002.png").write_bytes(first["00002.png"][:40])
    (gen / "images.txt").unlink()
    run_dir = run(settings(workdir, train=True, **common))
    assert {p.name: p.read_bytes() for p in (gen / "samples").glob("*.png")} == first
    check_run(workdir, run_dir, kv)


def test_memorization_full_weight(workdir):
    run_dir = run(settings(workdir, "generation.anchor_size=2", "generation.target_size=1",
                           "generation.check_images_per_prompt=1", "generation.eta=0.5", "generation.scale=3.0",
                           train=True, concept_type="memorization",
                           caption_target="New Orleans House Galaxy Case", prompts=str(workdir / "mem.txt"),
                           mem_impath=str(workdir / "mem.png"), sscd_ckpt=str(workdir / "sscd.pt"), train_size=4,
                           regularization=True))
    check_run(workdir, run_dir, lambda k: k.startswith("model.diffusion_model."))
    gen = workdir / "data" / "mem_gen"
    assert (gen / "target.txt").read_text().splitlines()[0] == "New Orleans House Galaxy Case"
    for folder in ("check", "anchor"):  # generation.eta/scale reach both of memorization's generations
        plan = json.loads((gen / folder / "plan.json").read_text())
        assert (plan["eta"], plan["scale"]) == (0.5, 3.0)


def test_embedding_group(workdir):
    run_dir = run(settings(workdir, train=True, concept_type="style", caption_target="van gogh",
                           prompts=str(workdir / "painting.txt"), train_size=4, parameter_group="embedding",
                           loss_type_reverse="noise-based"))
    delta = load_state_dict(next((run_dir / "checkpoints").glob("delta_step_3.*")))
    assert set(delta) == {"embed", "embed_ids"}
    check_run(workdir, run_dir, lambda k: k in ("embed", "embed_ids"))


def test_preserve_prompts(workdir, tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("a painting of a harbour in the style of monet\na photo of a dog\n")
    run_dir = run(settings(workdir, "training.preservation_weight=2.0", train=True, concept_type="style",
                           caption_target="van gogh", prompts=str(workdir / "painting.txt"), train_size=4,
                           preserve_prompts=str(keep)))
    check_run(workdir, run_dir, kv)
    events = b"".join(p.read_bytes() for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert b"train/loss_preservation" in events
    common = ["--concept_type", "style", "--caption_target", "van gogh", "--prompts", str(workdir / "painting.txt"),
              "--model_config", str(TINY), "-rc", str(workdir / "base.ckpt"), "--root", str(tmp_path / "data"),
              "--logdir", str(tmp_path / "logs"), "--preserve_prompts"]
    keep.write_text("a photo of a dog\na Van Gogh painting of a harbour\n")
    with pytest.raises(ValueError, match="mention the target"):
        settings_from_argv([*common, str(keep)])
    keep.write_text("a photo of a dog\n")
    with pytest.raises(ValueError, match="embedding"):
        settings_from_argv([*common, str(keep), "--parameter_group", "embedding"])
    with pytest.raises(FileNotFoundError):
        settings_from_argv([*common, str(tmp_path / "missing.txt")])
    assert not (tmp_path / "data").exists() and not (tmp_path / "logs").exists()


@pytest.mark.parametrize("extra,match", [
    (["--concept_type", "object", "--caption_target", "grumpy cat"], "anchor\\+target"),
    (["--concept_type", "object", "--caption_target", "cat+"], r"the target \(right of '\+'\) is empty"),
    (["--concept_type", "style", "--caption_target", "van gogh", "--train_size", "3"], "multiple of the number"),
    (["--concept_type", "memorization", "--caption_target", "X"], "mem_impath"),
    (["--concept_type", "style", "--caption_target", "van gogh", "--gpus", "0"], "CUDA"),
    (["--concept_type", "style", "--caption_target", "van gogh", "--regularization", "training.batch_size=3"], "even"),
])
def test_bad_input_fails_before_any_work(workdir, tmp_path, extra, match):
    argv = ["--prompts", str(workdir / "cat.txt"), "--model_config", str(TINY), "-rc", str(workdir / "base.ckpt"),
            "--root", str(tmp_path / "data"), "--logdir", str(tmp_path / "logs"), *extra]
    with pytest.raises((ValueError, RuntimeError, FileNotFoundError), match=match):
        settings_from_argv(argv)
    assert not (tmp_path / "data").exists() and not (tmp_path / "logs").exists()


def test_missing_files_fail_clearly(workdir, tmp_path):
    base = ["--concept_type", "style", "--caption_target", "van gogh", "--model_config", str(TINY)]
    with pytest.raises(FileNotFoundError, match="base checkpoint"):
        settings_from_argv([*base, "--prompts", str(workdir / "cat.txt"), "-rc", str(tmp_path / "nope.ckpt")])
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        settings_from_argv([*base, "--prompts", str(tmp_path / "empty.txt"), "-rc", str(workdir / "base.ckpt")])
    with pytest.raises(FileNotFoundError):
        settings_from_argv([*base, "--prompts", str(tmp_path / "missing.txt"), "-rc", str(workdir / "base.ckpt")])
    mem = ["--concept_type", "memorization", "--caption_target", "X", "--prompts", str(workdir / "mem.txt"),
           "-rc", str(workdir / "base.ckpt"), "--model_config", str(TINY), "--mem_impath", str(workdir / "mem.png")]
    with pytest.raises(FileNotFoundError, match="SSCD"):
        settings_from_argv([*mem, "--sscd_ckpt", str(tmp_path / "none.pt")])
    with pytest.raises(SystemExit):
        settings_from_argv(["--concept_type", "texture", "--caption_target", "x", "--prompts",
                            str(workdir / "cat.txt")])
    with pytest.raises(SystemExit):
        settings_from_argv([*base, "--prompts", str(workdir / "cat.txt"), "--bogus-flag"])


def test_settings_from_python_and_from_the_command_line(workdir, tmp_path):
    """TrainSettings built in Python get train.py's checks in run(), before any work; the flags that give a
    settings object parse back to it."""
    import dataclasses

    from ablation.train import command_line

    s = dataclasses.replace(settings(workdir, concept_type="style", caption_target="van gogh",
                                     prompts=str(workdir / "painting.txt"), train_size=3),
                            root=str(tmp_path / "data"), logdir=str(tmp_path / "logs"))
    with pytest.raises(ValueError, match="multiple of the number"):
        run(s)
    assert not (tmp_path / "data").exists() and not (tmp_path / "logs").exists()
    s = dataclasses.replace(s, train_size=4, train=True, regularization=True, scale_lr=False, seed=5)
    checked = settings_from_argv(command_line(s))
    assert checked == dataclasses.replace(s, command=tuple(command_line(s)), devices=("cpu",))


def test_wandb_logs_offline_without_login(workdir, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run_dir = run(settings(workdir, "logging.image_every=0", train=True, concept_type="object",
                           caption_target="cat+grumpy cat", prompts=str(workdir / "cat.txt"), train_size=4,
                           wandb_entity="someone"))
    assert list((run_dir / "wandb").glob("offline-run-*"))
