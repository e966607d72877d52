"""One ``--outdir`` and several runs (issue 30, items 2 and 9): a second run on a folder in use is refused before any
work, naming the holder; a lock left by a crashed run is taken over; models scored by separate runs all stay in
``summary.json`` and ``results.md``; a damaged ``summary.json`` of another suite is a warning and is rebuilt; a
disk-full write is one line and exit status 1 (toy world, artist suite, 2 sampling steps)."""
import dataclasses
import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_evaluate import env, evaluate_argv  # noqa: F401 (its tiny evaluate.py run, for the last test)

from evaluation import benchmark as bench
from experiments import toy_benchmark as toy

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "assets/toyworld"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The toy prompt sets and two deltas (every ff.net.2 weight zeroed; every attn2.to_out weight zeroed)."""
    from runtime.delta import save_delta

    out = tmp_path_factory.mktemp("safety")
    sets = toy.write_prompt_sets(out / "sets", rows_per_class=1, n_captions=2)
    sd = load_file(str(ASSETS / "ldm/toyworld-ldm.safetensors"))
    for name, end in (("ffn", "ff.net.2.weight"), ("attn", "attn2.to_out.0.weight")):
        zero = {k: torch.zeros_like(v) for k, v in sd.items() if k.endswith(end)}
        assert zero, end
        save_delta(out / f"zero_{name}.safetensors", zero)
    return out, sets


def _settings(world, outdir, deltas, suites=("artist",), **changes):
    out, sets = world
    s = toy.benchmark_settings(out, sets, [f"{n}={out / f'zero_{f}.safetensors'}" for n, f in deltas.items()],
                               steps=2, limit=1, suites=suites)
    return dataclasses.replace(s, outdir=str(outdir), **changes)


def _argv(world, outdir, deltas) -> list[str]:
    """benchmark.py's command line for :func:`_settings` (artist suite)."""
    out, sets = world
    p = toy.asset_paths(ASSETS)
    argv = ["artist", "--base", str(p["weights"]), "--config", str(p["config"]), "--outdir", str(outdir),
            "--H", "32", "--W", "32", "--steps", "2", "--limit", "1", "--precision", "full", "--batch_size", "8",
            "--clip_model", str(p["clip"]), "--score_device", "cpu"]
    for a in sets["artists"]:
        argv += ["--artist", str(a)]
    for n, f in deltas.items():
        argv += ["--delta", f"{n}={out / f'zero_{f}.safetensors'}"]
    return argv


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _holder(outdir: Path):
    """Another process holding ``outdir``'s lock the way a running benchmark does; it lets go when its stdin
    closes."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from runtime.files import lock_folder; "
            "lock = lock_folder(sys.argv[2], 'benchmark.py artist --outdir X'); print('held', flush=True); "
            "sys.stdin.read(); lock.release()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(outdir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_on_a_folder_in_use_is_refused_before_any_work(world, tmp_path, capsys):
    """Two real runs: benchmark.py in a child process is paused (SIGSTOP) once it holds the folder, so the second
    run (here, in-process) meets it mid-run every time; then the first goes on and finishes with its table."""
    import signal
    import time

    outdir = tmp_path / "bench"
    first = subprocess.Popen([sys.executable, "benchmark.py", *_argv(world, outdir, {"zero-attn": "attn"})],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while f'"pid": {first.pid}' not in ((outdir / ".lock").read_text() if (outdir / ".lock").exists() else ""):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)
        before = _tree(outdir)
        with pytest.raises(SystemExit) as e:
            bench.main(_argv(world, outdir, {"zero-ffn": "ffn"}))
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "in use by another run" in err[0], err
        assert f"pid {first.pid} on {socket.gethostname()}" in err[0] and "benchmark.py artist --base" in err[0]
        assert _tree(outdir) == before  # nothing generated, nothing written, the first run's lock untouched
        # the API refuses the same way (run() takes the lock itself)
        from runtime.files import FolderLocked

        with pytest.raises(FolderLocked, match=f"pid {first.pid}"):
            bench.run(_settings(world, outdir, {"zero-ffn": "ffn"}))
        assert _tree(outdir) == before
    finally:
        first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert "| zero-attn |" in (outdir / "results.md").read_text() and not (outdir / ".lock").exists()
    assert not list((outdir / "images/artist").glob("zero-ffn"))  # the refused run made nothing


def test_a_lock_left_by_a_dead_process_is_taken_over(world, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    outdir = tmp_path / "bench"
    outdir.mkdir()
    (outdir / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                              "command": "benchmark.py crashed", "started": "2026-01-01T00:00:00"}))
    assert bench.main(_argv(world, outdir, {"zero-ffn": "ffn"})) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and f"took over the lock of pid {dead.pid}" in notes[0] and "no longer running" in notes[0]
    assert not (outdir / ".lock").exists() and "| zero-ffn |" in (outdir / "results.md").read_text()
    # a lock from another host cannot be checked from here: refused, saying which file to delete
    (outdir / ".lock").write_text(json.dumps({"host": "elsewhere.example", "pid": 1, "command": "benchmark.py",
                                              "started": "2026-01-01T00:00:00"}))
    with pytest.raises(SystemExit) as e:
        bench.main(_argv(world, outdir, {"zero-ffn": "ffn"}))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "on elsewhere.example" in err and f"delete {outdir.resolve() / '.lock'}" in err


def test_models_of_separate_runs_all_stay_in_the_summary_and_the_table(world, tmp_path, capsys):
    outdir = tmp_path / "bench"
    first = bench.run(_settings(world, outdir, {"zero-ffn": "ffn"}))
    second = bench.run(_settings(world, outdir, {"zero-attn": "attn"}))
    doc = json.loads((outdir / "artist/summary.json").read_text())
    assert list(doc["models"]) == ["base", "zero-attn", "zero-ffn"]  # this run's first, then the others
    assert doc["models"]["zero-ffn"] == first["artist"]["zero-ffn"]
    assert doc["models"]["zero-attn"] == second["artist"]["zero-attn"] and doc["not_comparable"] == []
    table = json.loads((outdir / "results.json").read_text())
    assert list(table) == ["base", "zero-attn", "zero-ffn", "(provenance)"]  # the models, then how they were made
    assert table["zero-ffn"]["artist: CLIP sim"] == first["artist"]["zero-ffn"]["clip_similarity"]
    md = (outdir / "results.md").read_text()
    assert "| zero-ffn |" in md and "| zero-attn |" in md and "\\*" not in md
    assert [r.split(",")[0] for r in (outdir / "artist/summary.csv").read_text().splitlines()[1:]] == \
        ["base", "zero-attn", "zero-ffn"]
    # a model scored on other settings stays, marked, with a warning naming what differs
    capsys.readouterr()
    bench.run(_settings(world, outdir, {"zero-ffn": "ffn"}, steps=4))
    err = capsys.readouterr().err
    assert "warning: artist: zero-attn was scored on other rows or settings than base (differs in: steps)" in err
    md = (outdir / "results.md").read_text()
    assert "| zero-attn \\* |" in md and "| zero-ffn |" in md and "scored on other rows or settings" in md
    # deleting a model's records drops it
    (outdir / "artist/records/zero-attn.jsonl").unlink()
    bench.run(_settings(world, outdir, {"zero-ffn": "ffn"}, steps=4, score_only=True))
    assert list(json.loads((outdir / "results.json").read_text())) == ["base", "zero-ffn", "(provenance)"]


def test_a_damaged_summary_of_another_suite_is_a_warning_and_is_rebuilt(world, tmp_path, capsys):
    outdir = tmp_path / "bench"
    judge = toy.JudgeClassifier(ASSETS / "judge/judge.safetensors")
    both = bench.run(_settings(world, outdir, {"zero-ffn": "ffn"}, suites=("artist", "objects")), classifier=judge)
    good = json.loads((outdir / "objects/summary.json").read_text())
    (outdir / "objects/summary.json").write_text('{"suite": "objects", "models": {')  # a run killed mid-write
    capsys.readouterr()
    settings = _settings(world, outdir, {"zero-ffn": "ffn"}, score_only=True)  # the images are there
    bench.check(settings)  # the warning comes with the checks, before any work
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {outdir / 'objects/summary.json'} is unreadable (Expecting property name enclosed "
                   f"in double quotes: line 1 column 33 (char 32)): it will be rebuilt from its models' summaries"]
    bench.run(settings)
    table = json.loads((outdir / "results.json").read_text())
    assert table["zero-ffn"]["objects: erased class acc"] == both["objects"]["zero-ffn"]["accuracy_erase"]
    assert table["base"]["objects: other classes acc"] == both["objects"]["base"]["accuracy_keep"]
    rebuilt = json.loads((outdir / "objects/summary.json").read_text())
    assert rebuilt["models"] == good["models"] and rebuilt["metrics"] == good["metrics"]
    # without the per-model summaries (a folder of an older version) the suite is left out, with a warning
    (outdir / "objects/summary.json").write_text("{")
    for f in (outdir / "objects/summaries").iterdir():
        f.unlink()
    capsys.readouterr()
    bench.run(settings)
    err = capsys.readouterr().err
    assert "the table leaves that suite out" in err and "objects:" not in (outdir / "results.md").read_text()
    assert "| zero-ffn |" in (outdir / "results.md").read_text()


def test_disk_full_is_one_line_exit_1_and_leaves_no_temporary_file(world, tmp_path, capsys, monkeypatch):
    outdir = tmp_path / "bench"

    fsync = os.fsync

    def full(fd):  # the disk fills after the lock was taken: the OS reports it when the data is flushed
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".lock"):
            return fsync(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(SystemExit) as e:
        bench.main(_argv(world, outdir, {"zero-ffn": "ffn"}))
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: cannot write ") and "No space left on device (errno 28)" in last
    assert f"to {outdir.resolve()}" in last or f"to {outdir}" in last
    assert not [p for p in outdir.rglob("*") if p.name.endswith(".tmp")]
    assert not (outdir / ".lock").exists()  # released on the way out


def test_evaluate_refuses_a_table_folder_in_use(env, tmp_path, capsys):  # noqa: F811 (the imported fixture)
    """evaluate.py reads, merges and writes back the table beside --outpkl: a second evaluation there is refused
    before any generation (test_evaluate's tiny run, model and scorers)."""
    from evaluation import protocol

    argv = evaluate_argv(env)
    argv[argv.index("--outpkl") + 1] = str(tmp_path / "metrics" / "evaluation.pkl")
    argv[argv.index("--base_outpath") + 1] = str(tmp_path / "baseline")
    holder = _holder(tmp_path / "metrics")
    try:
        with pytest.raises(SystemExit) as e:
            protocol.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and f"pid {holder.pid} on" in err[0], err
        assert not (tmp_path / "baseline").exists() and not (env["run"] / "eval").exists()
        assert [p.name for p in (tmp_path / "metrics").iterdir()] == [".lock"]
    finally:
        holder.communicate("")


def test_under_a_launcher_only_rank_zero_takes_the_lock(tmp_path, monkeypatch):
    """torchrun's ranks are one run: rank 0 holds the folder, the others work in it without the lock."""
    from types import SimpleNamespace

    from runtime.files import FolderLocked

    outdir = tmp_path / "bench"
    holder = _holder(outdir)  # stands in for rank 0
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "1")
        with bench.lock_outdir(SimpleNamespace(outdir=outdir)):
            pass
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(FolderLocked, match=f"pid {holder.pid}"):
            bench.lock_outdir(SimpleNamespace(outdir=outdir))
    finally:
        holder.communicate("")
