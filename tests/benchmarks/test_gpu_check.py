"""benchmarks/gpu_check.sh must run as-is on the first GPU machine: its CPU dry run (tiny models) keeps every
step's command line, JSON and table alive."""
import json
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs the whole GPU check script in its CPU mode: minutes

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny", "--out",
                        str(out)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"unet", "generate", "anchor-batch+train", "discover", "attack-step",
                                    "noise-original", "ddp"}
    assert not [k for k, v in data["results"].items() if "error" in v]
    assert data["results"]["ddp"]["run_folders"] == 1
    assert [r["name"] for r in data["results"]["attack-step"]["rows"]] == ["unlearndiff", "p4d-n", "p4d-k",
                                                                           "p4d-n-original"]
    assert data["results"]["noise-original"]["refused_on_cpu"] is True  # CUDA-only, refused elsewhere
    table = r.stdout[r.stdout.index("| step |"):]
    assert all(f"| {name} |" in table for name in data["results"])
