"""Scorer files are vetted before the first image (issue 30, items 3 and 4): for every scorer flag of benchmark.py
(``--clip_model`` / ``--mem_clip_model`` folders and ``open_clip:ARCH:FILE`` weights, ``--feature_model``,
``--sscd_ckpt``, ``--classifier``) and of evaluate.py, a corrupt file, a pickle with a planted ``__reduce__`` and a
file of the wrong kind are one ``error:`` line naming the flag and the file, exit status 2, before any image is
made; the planted code never runs and torch's advice to load with ``weights_only=False`` is never printed.

Everything runs on the toy world's real scorer files (its CLIP folder, copy detector and feature TorchScript)."""
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import Evil
from safetensors.torch import load_file

from evaluation import benchmark as bench
from evaluation import protocol
from experiments import toy_benchmark as toy
from scoring import files
from scoring.classifier import load_classifier
from toyworld.mission import asset_paths

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "assets/toyworld"
P = asset_paths(ASSETS)




def with_flags(argv: list, flags: dict) -> list:
    """``argv`` with ``--k v`` for each flag: replaces the value of a flag already there, else appends it."""
    for k, v in flags.items():
        if f"--{k}" in argv:
            argv[argv.index(f"--{k}") + 1] = str(v)
        else:
            argv += [f"--{k}", str(v)]
    return argv

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("scorers")
    sets = toy.write_prompt_sets(d / "sets", rows_per_class=1, n_captions=2)
    return d, sets


@pytest.fixture
def bad(tmp_path):
    """Bad files of every class: ``corrupt`` (the toy copy detector cut in half), ``evil_pt`` (a torch.save archive
    whose pickle runs code), ``evil_pkl`` (a bare pickle that runs code), ``state_dict`` (weights where a program is
    expected), ``torchscript`` (a program where weights are expected), ``text`` (neither); ``marker``: the file the
    planted code would create."""
    marker = tmp_path / "pwned"
    data = P["copydetect"].read_bytes()
    out = {"marker": marker, "corrupt": tmp_path / "corrupt.pt", "evil_pt": tmp_path / "evil.pt",
           "evil_pkl": tmp_path / "evil.pkl", "state_dict": tmp_path / "weights.pt", "text": tmp_path / "notes.bin",
           "torchscript": P["copydetect"]}
    out["corrupt"].write_bytes(data[:len(data) // 2])
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": Evil(marker)}, out["evil_pt"])
    out["evil_pkl"].write_bytes(pickle.dumps(Evil(marker)))
    torch.save({"fc.weight": torch.zeros(2, 3)}, out["state_dict"])
    out["text"].write_text("hello, I am not a model\n")
    return out


def _argv(world, out, suite, **flags):
    d, sets = world
    argv = [suite, "--base", str(P["weights"]), "--config", str(P["config"]), "--outdir", str(out), "--H", "32",
            "--W", "32", "--steps", "2", "--limit", "1", "--precision", "full", "--score_device", "cpu",
            "--clip_model", str(P["clip"]), "--mem_clip_model", str(P["clip"]),
            "--feature_model", str(P["features"]), "--feature_size", "32", "--sscd_ckpt", str(P["copydetect"])]
    if suite == "artist":
        argv += ["--artist", str(sets["artists"][0])]
    elif suite == "objects":
        argv += ["--object_prompts", str(sets["objects"]), "--target_class", toy.TARGET_CLASS, "--rows_per_class", "1"]
    elif suite == "coco":
        argv += ["--captions", str(sets["captions"])]
    elif suite == "memorization":
        argv += ["--mem_jsonl", str(sets["mem_jsonl"])]
    return with_flags(argv, flags)


def _refused(main, argv, capsys, flag: str, path, what: str, marker=None, nothing: tuple[Path, ...] = ()) -> str:
    """``main(argv)`` exits 2 with one ``error:`` line naming ``flag``, the file and ``what``; no weights_only advice,
    the planted code did not run, and none of ``nothing`` (output folders) was created."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    line = lines[0]
    assert flag in line and str(path) in line and what in line, line
    assert "weights_only" not in err and "Traceback" not in err, err
    if marker is not None:
        assert not Path(marker).exists(), "the planted pickle ran"
    for folder in nothing:
        assert not (folder.exists() and any(folder.rglob("*.png"))), f"images were made in {folder}"
    return line


# ---------------------------------------------------------------------------------------------------- benchmark.py
TORCHSCRIPT_FLAGS = [("coco", "feature_model"), ("memorization", "sscd_ckpt")]


@pytest.mark.parametrize("suite,flag", TORCHSCRIPT_FLAGS)
def test_torchscript_flags_refuse_bad_files_before_any_image(world, bad, tmp_path, capsys, suite, flag):
    out = tmp_path / "b"
    cases = {"corrupt": "not a TorchScript archive: a damaged or truncated zip file",
             "evil_pt": "a pickle with code (posix.system): refused",
             "evil_pkl": "a pickle with code (posix.system): refused",
             "state_dict": "not a TorchScript archive: a torch.save file",
             "text": "not a TorchScript archive: unrecognised content"}
    for case, what in cases.items():
        _refused(bench.main, _argv(world, out, suite, **{flag: bad[case]}), capsys, f"--{flag}", bad[case], what,
                 bad["marker"], (out,))
    assert not out.exists()


def test_a_damaged_torchscript_archive_with_an_intact_directory(world, tmp_path, capsys):
    """A zip whose directory is intact but whose members are damaged: torch.jit.load fails, in the checks, as one
    line (not torch's miniz essay)."""
    import zipfile

    src = P["copydetect"]
    damaged = tmp_path / "damaged.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(damaged, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("/constants.pkl") or item.filename.endswith("/data.pkl"):
                data = b"\x80\x02garbage" + data[:3]
            zout.writestr(item.filename, data)
    out = tmp_path / "b"
    line = _refused(bench.main, _argv(world, out, "memorization", sscd_ckpt=damaged), capsys, "--sscd_ckpt", damaged,
                    "damaged TorchScript archive", nothing=(out,))
    assert "miniz" not in line


@pytest.mark.parametrize("flag", ["clip_model", "mem_clip_model"])
def test_clip_folder_flags_refuse_bad_folders(world, bad, tmp_path, capsys, flag):
    suite = "artist" if flag == "clip_model" else "memorization"
    out = tmp_path / "b"
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    shutil.copy(P["clip"] / "model.safetensors", no_config)
    other = tmp_path / "other"
    shutil.copytree(P["clip"], other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "bert", "text_config": None}))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(P["clip"], corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[:len(data) // 2])
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(P["clip"] / "config.json", evil)
    shutil.copy(bad["evil_pt"], evil / "pytorch_model.bin")
    cases = [(no_config, no_config, "not a CLIP folder: config.json missing"),
             (other, other, "not a CLIP folder: config.json describes 'bert'"),
             (corrupt, corrupt / "model.safetensors", "unreadable weights"),
             (evil, evil / "pytorch_model.bin", "a pickle with code (posix.system): refused")]
    for folder, named, what in cases:
        _refused(bench.main, _argv(world, out, suite, **{flag: folder}), capsys, f"--{flag}", named, what,
                 bad["marker"], (out,))
    assert not out.exists()


def test_open_clip_weights_file_is_vetted(world, bad, tmp_path, capsys):
    pytest.importorskip("open_clip")
    out = tmp_path / "b"
    cases = {"corrupt": "not a weights file", "evil_pt": "a pickle with code (posix.system): refused",
             "evil_pkl": "a pickle with code (posix.system): refused",
             "torchscript": "not a weights file (safetensors or torch.save): a TorchScript archive",
             "text": "not a weights file"}
    for case, what in cases.items():
        spec = f"open_clip:ViT-B-32:{bad[case]}"
        _refused(bench.main, _argv(world, out, "artist", clip_model=spec), capsys, "--clip_model", bad[case], what,
                 bad["marker"], (out,))
    assert not out.exists()


def test_classifier_refuses_bad_files(world, bad, tmp_path, capsys):
    out = tmp_path / "b"
    clip_weights = P["clip"] / "model.safetensors"  # weights, but not a ResNet-50's
    cases = {"corrupt": "neither a TorchScript classifier nor a ResNet-50 state dict: a damaged or truncated zip",
             "evil_pt": "a pickle with code (posix.system): refused",
             "evil_pkl": "a pickle with code (posix.system): refused",
             "text": "neither a TorchScript classifier nor a ResNet-50 state dict: unrecognised content",
             "state_dict": "not a ResNet-50 state dict for 1000 classes"}
    for case, what in cases.items():
        _refused(bench.main, _argv(world, out, "objects", classifier=bad[case]), capsys, "--classifier", bad[case],
                 what, bad["marker"], (out,))
    _refused(bench.main, _argv(world, out, "objects", classifier=clip_weights), capsys, "--classifier", clip_weights,
             "not a ResNet-50 state dict", nothing=(out,))
    # a TorchScript program of the wrong kind (the copy detector's 2-D descriptor is no 1000-way logits)
    _refused(bench.main, _argv(world, out, "objects", classifier=P["copydetect"]), capsys, "--classifier",
             P["copydetect"], "class names", nothing=(out,))
    assert not out.exists()


def test_classifier_content_decides_not_the_name(tmp_path):
    """A ResNet-50 state dict named .bin loads as weights (it used to be sent to torch.jit.load); a TorchScript
    classifier named .pth loads as a program."""
    from torchvision.models import resnet50

    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    sd_bin = tmp_path / "resnet.bin"
    torch.save(resnet50(num_classes=2).state_dict(), sd_bin)
    clf = load_classifier(sd_bin, labels=labels)
    assert clf.logits(torch.zeros(1, 3, 224, 224)).shape == (1, 2)

    class Two(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))[:, :2]

    script = tmp_path / "two.pth"
    torch.jit.script(Two()).save(str(script))
    assert load_classifier(script, labels=labels).classify is not None


def test_good_scorers_pass_the_checks(world, tmp_path):
    """The toy world's real files pass every new check (the checks refuse what is bad, not what is new)."""
    out = tmp_path / "b"
    for suite in ("artist", "coco", "memorization"):
        plan = bench.check(bench.parse_argv(_argv(world, out, suite)))
        assert plan.settings.suites == (suite,)
    assert not out.exists() or not any(out.rglob("*.png"))


# ---------------------------------------------------------------------------------------------------- evaluate.py
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A toy-world training run with one delta (every ff.net.2 weight zeroed), as evaluate.py finds runs."""
    from runtime.delta import save_delta

    d = tmp_path_factory.mktemp("evaluate")
    run = d / "logs" / "2024-01-01T00-00-00_toy"
    (run / "configs").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    shutil.copy(P["config"], run / "configs" / "2024-01-01T00-00-00-project.yaml")
    sd = load_file(str(P["weights"]))
    save_delta(run / "checkpoints" / "delta_step_1.safetensors",
               {k: torch.zeros_like(v) for k, v in sd.items() if k.endswith("ff.net.2.weight")})
    return run


def _evaluate_argv(run, out, **flags):
    argv = ["--root", str(run), "--concept_type", "style", "--caption_target", "stripes",
            "--eval_json", str(ASSETS / "eval.json"), "--eval_prompts", str(ASSETS / "eval_prompts"),
            "--outpkl", str(out / "metrics" / "evaluation.pkl"), "--base_ckpt", str(P["weights"]),
            "--config", str(P["config"]), "--base_outpath", str(out / "baseline"), "--clip_model", str(P["clip"]),
            "--feature_model", str(P["features"]), "--feature_size", "32", "--numgen", "2", "--steps", "2",
            "--H", "32", "--W", "32", "--precision", "full"]
    return with_flags(argv, flags)


def test_evaluate_refuses_bad_scorer_files_before_any_image(run_dir, bad, tmp_path, capsys):
    out = tmp_path / "o"
    nothing = (out, run_dir / "eval")
    for case, what in {"corrupt": "not a TorchScript archive", "evil_pt": "a pickle with code (posix.system)",
                       "state_dict": "not a TorchScript archive: a torch.save file"}.items():
        _refused(protocol.main, _evaluate_argv(run_dir, out, feature_model=bad[case]), capsys, "--feature_model",
                 bad[case], what, bad["marker"], nothing)
    no_config = tmp_path / "clip"
    no_config.mkdir()
    _refused(protocol.main, _evaluate_argv(run_dir, out, clip_model=no_config), capsys, "--clip_model", no_config,
             "config.json missing", nothing=nothing)
    mem = toy_memorized(tmp_path)
    for case, what in {"evil_pkl": "a pickle with code (posix.system)", "corrupt": "damaged or truncated zip"}.items():
        argv = _evaluate_argv(run_dir, out, concept_type="memorization", caption_target="a lighthouse",
                              mem_impath=mem, sscd_ckpt=bad[case])
        _refused(protocol.main, argv, capsys, "--sscd_ckpt", bad[case], what, bad["marker"], nothing)
    assert not out.exists() and not (run_dir / "eval").exists()


def toy_memorized(tmp_path: Path) -> Path:
    from toyworld.render import render_memorized

    path = tmp_path / "memorized.png"
    render_memorized(32).save(path)
    return path


# ---------------------------------------------------------------------------------------------------- the loader
def test_sniff_reads_bytes_only_and_names_the_code(bad):
    assert files.sniff(P["copydetect"]) == "torchscript"
    assert files.sniff(P["clip"] / "model.safetensors") == "safetensors"
    assert files.sniff(bad["state_dict"]) == "torch-zip"
    assert files.sniff(bad["corrupt"]) == "damaged-zip"
    assert files.sniff(bad["evil_pkl"]) == "pickle"
    assert files.sniff(bad["text"]) == "unknown"
    assert files.describe(bad["evil_pt"]) == "a pickle with code (posix.system): refused, nothing was loaded"
    assert files.describe(bad["state_dict"]).startswith("a torch.save file")
    legacy = bad["marker"].parent / "legacy.pt"  # a pre-1.6 torch.save: several pickles in a row
    torch.save({"x": Evil(bad["marker"]), "w": torch.ones(1)}, legacy, _use_new_zipfile_serialization=False)
    assert files.sniff(legacy) == "pickle" and "posix.system" in files.describe(legacy)
    with pytest.raises(files.ScorerFileError, match="a pickle with code"):
        files.load_state_dict(legacy, "--x")
    assert not bad["marker"].exists()
    assert list(files.load_state_dict(bad["state_dict"], "--x")) == ["fc.weight"]
