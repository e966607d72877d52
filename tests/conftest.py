import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def _find_reference() -> Path:
    """``shared/reference`` beside the checkout; for a scratch clone, beside the repository it was cloned from."""
    candidates = [ROOT.parent / "shared" / "reference"]
    try:
        origin = subprocess.run(["git", "-C", str(ROOT), "config", "--get", "remote.origin.url"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        origin = ""
    if origin and Path(origin).is_dir():
        candidates.append(Path(origin).resolve().parent / "shared" / "reference")
    return next((c for c in candidates if c.is_dir()), candidates[0])


REF = _find_reference()


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


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Every model in the suite is tiny: one thread is faster, and OpenMP spinning on busy shared
    cores can make a tiny op 50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Evil:
    """A hostile pickle payload: runs ``touch marker`` when unpickled (the marker file proves code ran)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


TINY_CONFIG = ROOT / "configs" / "tiny" / "v1-tiny.yaml"
_CACHE = {}


def tiny_model(seed: int = 0, perturb: float = 0.05):
    """A fresh tiny LatentDiffusion; UNet weights perturbed so zero-initialised layers are not zero."""
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    torch.manual_seed(seed)
    model = instantiate_from_config(OmegaConf.load(TINY_CONFIG).model)
    if perturb:
        with torch.no_grad():
            for p in model.model.parameters():
                p.add_(perturb * torch.randn_like(p))
    return model


def sampler_case(batch: int, shape=(4, 8, 8)):
    """The sampler tests' inputs: a perturbed tiny model (eval), start noise [batch, *shape] and the conditional and
    unconditional conditionings [batch, 77, 32], all seeded 0."""
    torch.manual_seed(0)
    model = tiny_model().eval()
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(batch, *shape, generator=g)
    c, uc = torch.randn(batch, 77, 32, generator=g), torch.randn(batch, 77, 32, generator=g)
    return model, x_T, c, uc


def run_sampler(sampler_cls, case, steps: int, scale: float):
    """The latents ``sampler_cls`` (a CompVis-API sampler) makes from a :func:`sampler_case` with CFG ``scale``."""
    model, x_T, c, uc = case
    z, _ = sampler_cls(model).sample(S=steps, batch_size=x_T.shape[0], shape=tuple(x_T.shape[1:]), conditioning=c,
                                     unconditional_conditioning=uc, unconditional_guidance_scale=scale, x_T=x_T,
                                     verbose=False)
    return z


def tiny_factory(device):
    """Module-level (picklable) model factory for generation: the same tiny weights in every process."""
    if "model" not in _CACHE:
        _CACHE["model"] = tiny_model(perturb=0).eval()
    return _CACHE["model"].to(device)


class CountingFactory:
    def __init__(self):
        self.calls = 0

    def __call__(self, device):
        self.calls += 1
        return tiny_factory(device)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A full tiny checkpoint file (the base model of train/sample tests)."""
    from ldm.checkpoint import save_state_dict

    path = tmp_path_factory.mktemp("tiny") / "base.ckpt"
    save_state_dict(tiny_model().state_dict(), path)
    return path


@pytest.fixture(scope="session")
def toy_clip_dir(tmp_path_factory):
    """A random-weights toy CLIP with the text tower configs/toyworld/ldm.yaml expects
    (toyworld.ldm trainer tests)."""
    from transformers import CLIPModel

    from toyworld.clip import tiny_clip_config

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("clip")
    CLIPModel(tiny_clip_config(image_size=32)).save_pretrained(out, safe_serialization=True)
    return out


def pytest_configure(config):
    config.addinivalue_line("markers",
                            "slow: long end-to-end runs (minutes); `pytest -m \"not slow\"` is the fast tier")
