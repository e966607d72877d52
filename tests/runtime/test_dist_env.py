"""The launcher environment (issue 30, item 10): a bad RANK / WORLD_SIZE / LOCAL_RANK is one line naming the
variable and exit status 2 before any work, and a process group whose ranks never meet fails after the set-up
timeout with what to check, instead of waiting the group's 4 hours."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_CONFIG

from runtime import dist, sample
from runtime.cli import UsageError

ROOT = Path(__file__).resolve().parents[2]
VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
        dist.SETUP_TIMEOUT_ENV)


@pytest.fixture
def env(monkeypatch):
    for k in VARS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


@pytest.mark.parametrize("values, message", [
    ({"RANK": "0", "WORLD_SIZE": "abc"}, "WORLD_SIZE='abc': expected an integer >= 1"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x': expected an integer >= 0"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK='-1': expected an integer >= 0"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE='0': expected an integer >= 1"),
    ({"RANK": "3", "WORLD_SIZE": "2"}, "RANK=3 is not below WORLD_SIZE=2 (ranks run 0..1)"),
    ({"LOCAL_RANK": "one"}, "LOCAL_RANK='one': expected an integer"),
    ({"LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2"),
    ({"NODE_RANK": "1.5"}, "NODE_RANK='1.5': expected an integer"),
    ({"RANK": "1", "WORLD_SIZE": "2"}, "MASTER_ADDR is not set"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "http"}, "MASTER_PORT='http'"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1", dist.SETUP_TIMEOUT_ENV: "-5"},
     f"{dist.SETUP_TIMEOUT_ENV}='-5'"),
])
def test_bad_launcher_env_is_one_line_exit_2_before_work(env, tmp_path, capsys, tiny_ckpt, values, message):
    for k, v in values.items():
        env.setenv(k, v)
    with pytest.raises(UsageError, match="environment variable"):  # every reader, not only the commands' check
        dist.check_launcher_env()
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(tiny_ckpt), "--config", str(TINY_CONFIG), "--H", "16", "--W", "16",
                     "--ddim_steps", "2", "--n_samples", "1", "--outdir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: environment variable ") and message in err[0], err
    assert not out.exists()


def test_the_rank_helpers_read_validated_values(env):
    assert dist.is_rank_zero() and dist.external_shard() is None and dist.local_devices(("cpu",)) == ("cpu",)
    env.setenv("RANK", "1")
    env.setenv("WORLD_SIZE", "2")
    env.setenv("LOCAL_RANK", " 1 ")  # surrounding blanks are no error
    assert not dist.is_rank_zero() and dist.external_shard() == (1, 2)
    assert dist.local_devices(("cpu", "cpu")) == ("cpu",)
    env.setenv("WORLD_SIZE", "two")
    for helper in (dist.is_rank_zero, dist.external_shard):
        with pytest.raises(UsageError, match="WORLD_SIZE='two'"):
            helper()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two fresh Python processes (~25 s each on a shared 2-core machine)
@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_group_whose_ranks_never_meet_fails_after_the_setup_timeout(tmp_path, tiny_ckpt, rank):
    """Rank 0 whose peer never starts, or rank 1 with no rank 0 at the address: a one-line error after the
    set-up timeout (2 s here) naming MASTER_ADDR/PORT and the missing ranks, exit 2, nothing written."""
    envs = {k: v for k, v in os.environ.items() if k not in VARS}
    envs.update(RANK=rank, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                OMP_NUM_THREADS="1", **{dist.SETUP_TIMEOUT_ENV: "2"})
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "sample.py"), "--ckpt", str(tiny_ckpt), "--config", str(TINY_CONFIG),
           "--H", "16", "--W", "16", "--ddim_steps", "2", "--n_samples", "1", "--outdir", str(out)]
    start = time.monotonic()
    r = subprocess.run(cmd, env=envs, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    took = time.monotonic() - start
    ours = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(ours) == 1, r.stderr[-3000:]
    assert f"rank {rank} of 2: the process group was not set up within 2 s" in ours[0]
    assert "MASTER_ADDR:MASTER_PORT (127.0.0.1:" in ours[0] and "every rank 0..1 was started" in ours[0]
    assert r.stderr.rstrip().splitlines()[-1] == ours[0]  # torch's own log lines come before, ours is the last
    assert took < 200, took  # not the group's 4 h
    assert not out.exists()  # the group is joined before any generation
