"""toyworld.judge: ground-truth classifier (train / save / load / classify) and the SSCD stand-in copy descriptor."""
import json

import pytest
import torch
from PIL import Image

from toyworld import COLOUR_NAMES, STYLES, SUBJECTS, iter_samples, render_memorized
from toyworld.judge import (
    EVAL_SEED,
    HEADS,
    ToyJudge,
    classify,
    copy_detection_rates,
    judge_accuracy,
    judge_loss,
    load_judge,
    main,
    perturb,
    render_pool,
    to_tensor,
    train_copy_descriptor,
    train_judge,
)


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("judge")
    model, history = train_judge(out, steps=6, batch_size=16, pool=96, eval_n=48, log_every=2, progress=False)
    return out, model, history


@pytest.fixture(scope="module")
def copy_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("copy")
    model, history = train_copy_descriptor(out, steps=60, batch_size=32, lr=3e-3, pool=300, eval_n=0,
                                           progress=False)
    return out, model, history


def test_render_pool_targets():
    images, targets = render_pool(0, 64, size=32)
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.uint8
    assert (targets[:, 3] == 1).sum() == 2  # items 55 and 63 of world 0 are the memorized picture
    for k, (_, _, label) in enumerate(iter_samples(0, 32, start=0, n=64)):
        if label["memorized"]:
            assert targets[k].tolist() == [-1, -1, -1, 1]
        else:
            assert targets[k].tolist() == [SUBJECTS.index(label["subject"]), COLOUR_NAMES.index(label["colour"]),
                                           STYLES.index(label["style"]), 0]


def test_loss_masks_memorized_heads():
    model = ToyJudge()
    x = torch.rand(3, 3, 32, 32, requires_grad=False)
    logits = model(x)
    for v in logits.values():
        v.retain_grad()
    targets = torch.tensor([[-1, -1, -1, 1]] * 3)
    loss, parts = judge_loss(logits, targets)
    assert torch.isfinite(loss) and parts["subject"] == parts["colour"] == parts["style"] == 0
    loss.backward()
    assert logits["subject"].grad.abs().sum() == 0 and logits["memorized"].grad.abs().sum() > 0


def test_judge_shapes_any_size():
    model = ToyJudge().eval()
    n = sum(p.numel() for p in model.parameters())
    assert 100_000 <= n <= 400_000
    for size in (32, 64, 48):
        out = model(torch.rand(2, 3, size, size))
        assert {k: tuple(v.shape) for k, v in out.items()} == {k: (2, len(v)) for k, v in HEADS.items()}


def test_train_judge_files_and_roundtrip(judge_dir):
    out, model, history = judge_dir
    names = {p.name for p in out.iterdir()}
    assert {"judge.safetensors", "judge.json", "loss.png", "features.torchscript.pt"} <= names
    meta = json.loads((out / "judge.json").read_text())
    assert meta["steps"] == 6 and meta["eval_seed"] == EVAL_SEED
    assert set(meta["accuracy"]) >= set(HEADS) and all(0 <= meta["accuracy"][k] <= 1 for k in HEADS)
    assert history[0]["step"] == 0 and history[-1]["step"] == 5
    loaded = load_judge(out)
    assert not loaded.training and all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    for k in HEADS:
        assert torch.equal(a[k], b[k])
    assert torch.equal(load_judge(out / "judge.safetensors")(x)["subject"], a["subject"])


def test_feature_model_is_the_judges_embedding(judge_dir, tmp_path):
    """features.torchscript.pt (evaluate.py --feature_model) = ToyJudge.embed on [0, 255] images, at any size."""
    from scoring.metrics import torchscript_features

    out, model, _ = judge_dir
    paths = []
    for i, (im, _, _) in enumerate(iter_samples(4, 32, n=3)):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    x = torch.stack([to_tensor(Image.open(p)).float() / 255 for p in paths])
    with torch.no_grad():
        want = model.embed(x).double()
    got = torchscript_features(out / "features.torchscript.pt", size=32)(paths)
    assert got.shape == (3, 256) and torch.allclose(got, want, atol=1e-5)
    assert torchscript_features(out / "features.torchscript.pt", size=64)(paths).shape == (3, 256)


def test_classify_names(judge_dir, tmp_path):
    _, model, _ = judge_dir
    items = list(iter_samples(EVAL_SEED, 32, start=0, n=3))
    path = tmp_path / "big.png"
    render_memorized(64).save(path)
    res = classify(model, [im for im, _, _ in items] + [path])
    assert len(res) == 4
    for r in res:
        assert set(r) == {"subject", "colour", "style", "memorized", "probs"}
        assert r["subject"] in SUBJECTS and r["colour"] in COLOUR_NAMES and r["style"] in STYLES
        assert isinstance(r["memorized"], bool)
        assert all(0 <= p <= 1 for p in r["probs"].values())


def test_judge_accuracy_keys(judge_dir):
    _, model, _ = judge_dir
    acc = judge_accuracy(model, n=40, size=64)
    assert acc["n"] == 40 and acc["size"] == 64 and all(0 <= acc[k] <= 1 for k in HEADS)


def test_training_refuses_eval_seed(tmp_path):
    with pytest.raises(ValueError):
        train_judge(tmp_path, steps=1, seed=EVAL_SEED, progress=False)
    with pytest.raises(ValueError):
        train_copy_descriptor(tmp_path, steps=1, seed=EVAL_SEED, progress=False)


def test_perturb_is_light_and_seeded():
    x = to_tensor(render_memorized(32)).float()[None].repeat(4, 1, 1, 1) / 255
    a = perturb(x, torch.Generator().manual_seed(1), 0.5)
    b = perturb(x, torch.Generator().manual_seed(1), 0.5)
    assert torch.equal(a, b) and a.shape == x.shape and 0 <= a.min() and a.max() <= 1
    assert 0 < (a - x).abs().mean() < 0.15
    assert torch.equal(perturb(x, torch.Generator(), 0.0), x)


def test_copy_descriptor_through_sscd_code_path(copy_dir):
    from scoring.sscd import load_sscd, preprocess_sscd

    out, _, history = copy_dir
    assert {"copydetect.torchscript.pt", "copydetect.json", "loss.png"} <= {p.name for p in out.iterdir()}
    assert history[-1]["loss"] < history[0]["loss"]
    model = load_sscd(out / "copydetect.torchscript.pt")
    assert isinstance(model, torch.jit.ScriptModule)
    images = [render_memorized(32), render_memorized(64)] + [im for im, _, _ in iter_samples(EVAL_SEED, 32, n=2)]
    x = torch.stack([preprocess_sscd(im) for im in images])
    assert x.shape == (4, 3, 288, 288)
    with torch.no_grad():
        d = model(x)
    assert d.shape == (4, 64)
    assert torch.allclose(d.norm(dim=1), torch.ones(4), atol=1e-5)
    assert (d[0] @ d[1]).item() > 0.9  # the same picture at 32 and 64 px


def test_copy_descriptor_separates_copies(copy_dir, tmp_path):
    from scoring.sscd import load_sscd, similarities

    out, _, _ = copy_dir
    model = load_sscd(out / "copydetect.torchscript.pt")
    ref = tmp_path / "ref.png"
    render_memorized(32).save(ref)
    gen = torch.Generator().manual_seed(3)
    mem = to_tensor(render_memorized(32)).float()[None].repeat(8, 1, 1, 1) / 255
    copies = []
    for i, t in enumerate(perturb(mem, gen, 0.5)):
        copies.append(tmp_path / f"c{i}.png")
        Image.fromarray((t * 255).round().byte().permute(1, 2, 0).numpy()).save(copies[-1])
    others = []
    for i, (im, _, label) in enumerate(iter_samples(EVAL_SEED, 32, n=40)):
        if not label["memorized"]:
            others.append(tmp_path / f"o{i}.png")
            im.save(others[-1])
    s_copy = similarities(model, copies, ref)
    s_other = similarities(model, others, ref)
    # Even after 60 steps every perturbed copy must be closer to the memorized picture than any render.
    assert s_copy.min() > s_other.max()
    assert s_copy.mean() - s_other.mean() > 0.3


def test_copy_detection_rates_small(copy_dir):
    out, _, _ = copy_dir
    r = copy_detection_rates(out / "copydetect.torchscript.pt", n=12)
    assert r["n"] == 12 and 0 < r["n_ordinary"] <= 12
    for k in ("copy_rate", "copy_rate_64px", "false_positive_rate", "near_copy_rate"):
        assert 0 <= r[k] <= 1
    assert r["sim_copy"]["mean"] > r["sim_ordinary"]["mean"]


def test_cli_both(tmp_path):
    main(["--out", str(tmp_path), "--what", "both", "--steps", "2", "--batch_size", "8", "--pool", "40",
          "--eval_n", "0", "--no_progress"])
    assert (tmp_path / "judge" / "judge.safetensors").is_file()
    assert (tmp_path / "copydetect" / "copydetect.torchscript.pt").is_file()
    assert isinstance(load_judge(tmp_path / "judge"), ToyJudge)
