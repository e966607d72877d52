import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT.parent / "shared" / "reference"


def ref_case(name: str):
    """(metadata dict, tensors dict) of a golden fixture in ../shared/reference."""
    if not (REF / f"{name}.json").exists():
        pytest.fail(f"reference fixture {name} not found under {REF}; clone the project beside shared/")
    meta = json.loads((REF / f"{name}.json").read_text())
    tensors = load_file(str(REF / f"{name}.safetensors")) if (REF / f"{name}.safetensors").exists() else {}
    return meta, tensors


def weights(tensors: dict, prefix: str = "weights.") -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def tol(meta: dict, output: str | None = None) -> dict:
    t = meta["tolerance"]
    if output is not None:
        t = t[output]
    s = t["suggested"]
    return {"rtol": s["rtol"], "atol": s["atol"]}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
