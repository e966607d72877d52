"""runtime.files when writing fails (issue 30, items 2 and 13): a real file-size limit (RLIMIT_FSIZE: the OS answers
EFBIG) and a full disk reported by the OS (ENOSPC from fsync) leave no temporary file and the old file intact, and
raise one line naming the folder; temporary names are unique per process and call; the lock file is not left
half-written."""
import errno
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import files
from runtime.files import WriteError

ROOT = Path(__file__).resolve().parents[2]


def test_a_file_size_limit_leaves_no_temporary_file_and_one_line(tmp_path):
    """A child process whose files may not exceed 4 KiB (the OS refuses the write itself, with EFBIG)."""
    code = r"""
import json, resource, signal, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from pathlib import Path
from runtime.files import WriteError, save_png_atomic, write_text_atomic
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
out = Path(sys.argv[2])
result = {}
for name, write in (("text", lambda: write_text_atomic(out / "records.jsonl", "x" * 100_000)),
                    ("png", lambda: save_png_atomic(np.random.default_rng(0).integers(0, 255, (128, 128, 3),
                                                                                      dtype=np.uint8),
                                                    out / "00000.png"))):
    try:
        write()
        result[name] = "written"
    except WriteError as e:
        result[name] = [str(e), e.errno]
print(json.dumps(result))
"""
    (tmp_path / "records.jsonl").write_text("old\n")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    big = os.strerror(errno.EFBIG)
    assert result["text"] == [f"cannot write records.jsonl to {tmp_path}: {big} (errno {errno.EFBIG})", errno.EFBIG]
    assert result["png"] == [f"cannot write images to {tmp_path}: {big} (errno {errno.EFBIG})", errno.EFBIG]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records.jsonl"]  # no temporary file, no PNG
    assert (tmp_path / "records.jsonl").read_text() == "old\n"  # the old file intact


def _disk_full(monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)


def test_a_full_disk_leaves_no_temporary_file_and_one_line(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    target.write_text("{}\n")
    _disk_full(monkeypatch)
    with pytest.raises(WriteError) as e:
        files.write_text_atomic(target, '{"models": {}}\n')
    assert str(e.value) == f"cannot write summary.json to {tmp_path}: No space left on device (errno 28)"
    assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError)
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"] and target.read_text() == "{}\n"
    # the lock file: not left behind half-written
    with pytest.raises(WriteError, match=f"cannot write the lock file to {tmp_path / 'run'}: No space left"):
        files.lock_folder(tmp_path / "run")
    assert list((tmp_path / "run").iterdir()) == []
    # a job's main: that line and exit status 1, no traceback
    from runtime.cli import exit_on_run_error

    with pytest.raises(SystemExit) as ex:
        exit_on_run_error(lambda: files.write_text_atomic(target, "x"))
    assert ex.value.code == 1


def test_a_delta_on_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    import torch

    from runtime.delta import save_delta

    _disk_full(monkeypatch)
    for name in ("delta.safetensors", "delta.ckpt"):
        with pytest.raises(WriteError) as e:
            save_delta(tmp_path / name, {"w": torch.ones(4)})
        assert str(e.value) == f"cannot write the delta to {tmp_path}: No space left on device (errno 28)"
    assert list(tmp_path.iterdir()) == []


def test_an_error_inside_the_writer_removes_the_temporary_file(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with files.atomic_target(tmp_path / "chart.png") as tmp:
            tmp.write_bytes(b"half a chart")
            1 / 0
    assert list(tmp_path.iterdir()) == []


def test_temporary_names_are_unique_per_process_and_call(tmp_path):
    a, b = files.temp_name(tmp_path / "summary.png"), files.temp_name(tmp_path / "summary.png")
    assert a != b and a.parent == tmp_path and a.name.startswith(f".summary.png.{os.getpid()}.")
    assert a.name.endswith(".tmp")
    # a clean-up of leftovers spares the temporary files of processes still running on this host
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        assert files.temp_in_use(tmp_path / f".00001.png.{live.pid}.0a1b2c3d.tmp")
        assert not files.temp_in_use(tmp_path / f".00001.png.{live.pid}.tmp")  # an older version's: no token
        assert not files.temp_in_use(tmp_path / f".00001.png.{dead.pid}.0a1b2c3d.tmp")
        assert not files.temp_in_use(tmp_path / f".00001.png.{os.getpid()}.0a1b2c3d.tmp")
    finally:
        live.communicate(b"")


def test_write_error_is_one_line_and_survives_a_worker_process():
    e = files.write_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), Path("/x/y/00003.png"), "images")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is WriteError and back.errno == errno.ENOSPC
    assert str(back) == str(e) == "cannot write images to /x/y: No space left on device (errno 28)"
