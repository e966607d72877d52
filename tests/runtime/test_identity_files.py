"""Records a run keeps about its folders (generation plans, hand-over journals) are not caches: a damaged one is one
line naming the file, what is wrong and what to do, exit status 2, before any work and with nothing touched
(runtime.files.read_json). A worker process of a several-device generation hands its one-line error (a full disk,
a broken model) to the parent as it is (runtime.generate._portable), never a child's traceback."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_CONFIG

from ldm.checkpoint import UnsafeCheckpointError
from runtime.cli import RunError, run_error_status
from runtime.files import DamagedFileError, WriteError, read_json
from runtime.generate import PLAN_FILE, NonFiniteSampleError, Sampling, _portable, generate_images
from runtime.sample import HANDOVER, main, settings_from_argv, staging_folder

ROOT = Path(__file__).resolve().parents[2]
DAMAGED = {  # what a file holds -> what the message says is wrong with it
    b'{"targets": ["00000.png"], "lines_bef': "not valid JSON: Unterminated string",
    b"": "empty file",
    b"\xff\xfe\x00garbage": "not UTF-8 text",
    b'["a", "list"]': "a JSON array where an object was written",
}


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------------- the shared reader
@pytest.mark.parametrize("data,problem", DAMAGED.items(), ids=["truncated", "empty", "binary", "list"])
def test_read_json_names_the_file_the_problem_and_the_remedy(tmp_path, data, problem):
    path = tmp_path / "plan.json"
    path.write_bytes(data)
    with pytest.raises(DamagedFileError) as info:
        read_json(path, "the generation plan", "delete the folder X")
    message = str(info.value)
    assert message.startswith(f"the generation plan {path} is damaged (") and problem in message
    assert message.endswith("; delete the folder X") and "\n" not in message
    assert run_error_status(info.value) == 2  # printed as one line, exit 2, also when met during the work


def test_folder_refusals_met_mid_run_are_one_line_exit_2(capsys):
    """A folder made from another plan (generate_images) or prepared with other memorization settings (train.py)
    can show only once the work runs: printed as one line with exit status 2 (runtime.cli.exit_on_run_error)."""
    from ablation.memorization import MemorizationSettingsError
    from runtime.cli import exit_on_run_error
    from runtime.generate import GenerationPlanError

    for kind in (GenerationPlanError, MemorizationSettingsError, DamagedFileError):
        message = f"/x/gen was made with a different plan ({kind.__name__}); delete it"

        def fail():
            raise kind(message)
        with pytest.raises(SystemExit) as e:
            exit_on_run_error(fail)
        assert e.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"


def test_read_json_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError):  # absent is the caller's decision, not damage
        read_json(tmp_path / "none.json", "the plan", "-")
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(DamagedFileError, match=r"dir.json is damaged \(Is a directory\)"):
        read_json(tmp_path / "dir.json", "the plan", "-")
    (tmp_path / "ok.json").write_text('{"a": 1}')
    assert read_json(tmp_path / "ok.json", "the plan", "-") == {"a": 1}


# ---------------------------------------------------------------------------------------- sample.py
def _sample_argv(ckpt, outdir, *extra, side=16, n_samples=2) -> list[str]:
    return ["--ckpt", str(ckpt), "--config", str(TINY_CONFIG), "--outdir", str(outdir), "--H", str(side),
            "--W", str(side), "--ddim_steps", "2", "--n_samples", str(n_samples), "--prompt", "a cat", "--skip_grid",
            *extra]


@pytest.mark.parametrize("record", [HANDOVER, PLAN_FILE])
def test_sample_refuses_a_damaged_record_of_an_interrupted_call(tiny_ckpt, tmp_path, capsys, record):
    """The journal of an interrupted hand-over, or the staging folder's generation plan: exit 2 before any model is
    loaded, nothing written or removed."""
    outdir = tmp_path / "out"
    argv = _sample_argv(tiny_ckpt, outdir, "--metadata")
    staging = staging_folder(settings_from_argv(argv))
    (staging / "samples").mkdir(parents=True)
    (staging / "samples" / "00001.png").write_bytes(b"a staged image")
    (outdir / "samples").mkdir()
    (outdir / "samples" / "00000.png").write_bytes(b"an image moved before the crash")
    (staging / record).write_bytes(b'{"targets": ["00000.png", "00001.png"], "lines_bef')
    before = _tree(outdir)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    what = "the hand-over journal" if record == HANDOVER else "the generation plan"
    assert line.startswith(f"error: {what} {staging / record} is damaged (not valid JSON: Unterminated string")
    assert f"delete the folder {staging}" in line
    assert _tree(outdir) == before and not list(outdir.rglob(".*.tmp"))


def test_a_journal_without_its_fields_is_damaged_too(tiny_ckpt, tmp_path, capsys):
    outdir = tmp_path / "out"
    argv = _sample_argv(tiny_ckpt, outdir)
    staging = staging_folder(settings_from_argv(argv))
    staging.mkdir(parents=True)
    (staging / HANDOVER).write_text(json.dumps({"targets": "00000.png"}))
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "no list of targets and line counts" in _one_error_line(capsys.readouterr().err)


def test_generate_images_refuses_a_damaged_plan_before_building_the_model(tmp_path):
    out = tmp_path / "g"
    (out / "samples").mkdir(parents=True)
    (out / PLAN_FILE).write_bytes(b"\x00" * 64)  # a crash of the file system, not of our atomic writes
    before = _tree(out)
    calls = []
    with pytest.raises(DamagedFileError, match=rf"^the generation plan {out / PLAN_FILE} is damaged \(not valid "
                                               rf"JSON.*delete the folder {out} to generate its images again"):
        generate_images(lambda device: calls.append(device), ["a cat"], out, Sampling(steps=2, height=16, width=16))
    assert calls == [] and _tree(out) == before


# ---------------------------------------------------------------------------------------- worker processes
def test_worker_errors_cross_to_the_parent_with_class_and_message():
    full = WriteError(28, "cannot write images to /x/samples: No space left on device (errno 28)")
    for e in (full, DamagedFileError("the plan /x is damaged (empty file); delete /x"),
              NonFiniteSampleError("m: sampling gave NaN"), RunError("ranks never met")):
        copy = pickle.loads(pickle.dumps(_portable(e)))  # what the queue does to it
        assert type(copy) is type(e) and str(copy) == str(e) and run_error_status(copy) == run_error_status(e)
    assert _portable(full).errno == 28
    # a class whose constructor takes more than its message cannot be rebuilt by pickle: its message, status 2
    unsafe = UnsafeCheckpointError("--ckpt x.ckpt refers to os.system, which is not allowed", "x.ckpt", "os.system")
    sent = pickle.loads(pickle.dumps(_portable(unsafe)))
    assert type(sent) is RunError and str(sent) == str(unsafe) and run_error_status(sent) == 2


def _file_size_limit(limit: int):
    """A real operating-system write failure for the command and the workers it spawns (they inherit both): files
    may not grow past ``limit`` bytes (EFBIG, "File too large"), and the signal that would kill the writer is
    ignored so that the write returns the error, as a full disk does (ENOSPC)."""
    import resource
    import signal

    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return apply


@pytest.mark.slow  # three processes import torch: ~25 s of CPU, about a minute on a shared 2-core machine
@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE and SIGXFSZ as on Linux")
def test_a_workers_write_error_is_the_commands_one_line(tiny_ckpt, tmp_path):
    """sample.py --gpus cpu:2: both spawned workers meet a file they cannot write; the command prints the workers'
    one-line WriteError naming the folder and exits 1, as with one process, and leaves no temporary file."""
    outdir = tmp_path / "out"
    argv = _sample_argv(tiny_ckpt, outdir, "--gpus", "cpu:2", "--n_iter", "2", side=64, n_samples=1)
    # 64x64 pixels of the tiny model are PNGs of about 10 KB; the run's own records (plan.json) stay below 4 KB
    proc = subprocess.run([sys.executable, "sample.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          preexec_fn=_file_size_limit(4096), timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = _one_error_line(proc.stderr)
    staging = staging_folder(settings_from_argv(argv))
    assert line == f"error: cannot write images to {staging / 'samples'}: File too large (errno 27)", line
    assert not [p for p in outdir.rglob("*") if p.name.endswith(".tmp")]
    assert not list((staging / "samples").glob("*.png"))

