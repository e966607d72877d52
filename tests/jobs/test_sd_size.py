"""Every entry point at the real SD-v1 size (random weights, the real sd-v1-4.ckpt layout), end to end on CPU.

The slowest test of the suite (several minutes): the driver is benchmarks/sd_size_e2e.py, which also
prints each step's wall time and peak RSS (docs/guides/speed.md)."""
import json
import shutil
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every job at the full SD-v1 size on CPU: minutes

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_sd_v1_size_end_to_end(tmp_path):
    import sd_size_e2e

    from ldm.checkpoint import load_checkpoint, load_state_dict

    w = tmp_path / "e2e"
    try:
        rows = sd_size_e2e.main(["--workdir", str(w), "--json", str(tmp_path / "steps.json")])
        assert [r["step"].split(" ")[0] for r in rows][1:] == [
            "train.py", "sample.py", "tools/export.py", "conceptprune.py", "conceptprune.py", "evaluate.py"]
        # the base is in the real checkpoint's layout, and every step left its result
        base = load_checkpoint(w / "sd-v1-4.ckpt")
        assert base["global_step"] == 470000 and len(base["callbacks"]) == 1 and len(base["state_dict"]) > 1000
        run = next((w / "logs").iterdir())
        delta = load_state_dict(next((run / "checkpoints").glob("delta_step_2.*")))
        assert len(delta) == 32 and all("attn2.to_k" in k or "attn2.to_v" in k for k in delta)
        assert len(list((w / "samples" / "samples").glob("*.png"))) == 1
        assert len(load_state_dict(w / "merged.safetensors")) == len(base["state_dict"])
        assert (w / "merged-diffusers" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        assert len(load_state_dict(w / "delta_pruned.safetensors")) == 16  # the 16 ff.net.2 weights
        table = json.loads((w / "metrics" / "evaluation.json").read_text())
        assert list(table) == [f"{run.name}_delta_step_2"] and "KID_van gogh" in table[f"{run.name}_delta_step_2"]
        assert json.loads((tmp_path / "steps.json").read_text())[1]["peak_rss_gb"] > 0
    finally:
        shutil.rmtree(w, ignore_errors=True)  # about 14 GB
