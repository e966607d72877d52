"""Concept Ablation's own diffusers checkpoints (``delta.bin``) load through every delta path, keys mapped.

The file is built here as the original's ``CustomDiffusionPipeline.save_pretrained`` writes it:
``torch.save({'unet': {UNet2DConditionModel parameter name: tensor}})`` with the ``attn2.to_k``/``attn2.to_v``
parameters ("cross-attn") or all of them ("full-weight"), optionally with ``'text_encoder'`` (the whole
CLIPTextModel state dict). The diffusers UNet and text encoder are the tiny model's own, built by diffusers'
converters (``runtime.export.build_pipeline``); which CompVis tensor each diffusers parameter must land on is
taken from diffusers' converter too (``convert_ldm_unet_checkpoint``), not from our map.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG as TINY
from omegaconf import OmegaConf

from evaluation.models import ModelSpec, ModelSpecError, check_models
from evaluation.models import load_model as load_benchmark_model
from evaluation.protocol import find_checkpoints
from ldm.checkpoint import CheckpointError, UnsafeCheckpointError, load_model_from_config
from runtime import export
from runtime.loading import check_delta, load_model
from runtime.sample import SampleSettings
from runtime.sample import main as sample_main
from runtime.sample import run as run_sample

pytest.importorskip("diffusers")
UNET = "model.diffusion_model."
TEXT = "cond_stage_model.transformer."


class NotAllowed:
    """A class a pickle may not build (the unsafe-file case)."""


def _config() -> dict:
    return OmegaConf.to_container(OmegaConf.load(TINY).model, resolve=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_ckpt):
    """The base checkpoint, the base model, and the diffusers UNet / text encoder holding the base's weights."""
    d = tmp_path_factory.mktemp("ca")
    shutil.copy(tiny_ckpt, d / "base.ckpt")
    base = load_model_from_config(_config(), d / "base.ckpt", verbose=False)
    pipe = export.build_pipeline(base, _config())
    return d, base, pipe


def _edited(params: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: (v.detach() + 0.5 * torch.randn(v.shape, generator=g)).contiguous() for k, v in params.items()}


def _cross_attn(unet) -> dict:
    return {n: p for n, p in unet.named_parameters() if "attn2.to_k" in n or "attn2.to_v" in n}


def _diffusers_name_of(model) -> dict[str, str]:
    """CompVis UNet key (prefixed) -> diffusers parameter name, by diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    names = {k: k for k in model.state_dict() if k.startswith(UNET)}
    cfg = export.diffusers_configs(_config())["unet"]
    return {ours: theirs for theirs, ours in convert_ldm_unet_checkpoint(names, cfg).items()}


def _text_name_of(model, text_sd) -> dict[str, str]:
    """CompVis text-encoder key -> transformers key, for the keys both have (transformers 5 drops text_model.)."""
    out = {}
    for k in model.state_dict():
        if k.startswith(TEXT):
            short = k[len(TEXT):]
            theirs = short if short in text_sd else short[len("text_model."):]
            if theirs in text_sd:
                out[k] = theirs
    return out


def _assert_loaded(model, base, unet_delta: dict, text_delta: dict | None = None):
    """Every tensor named by the delta equals it exactly under its CompVis name; every other tensor is the base's."""
    sd, base_sd = model.state_dict(), base.state_dict()
    unet_names = _diffusers_name_of(base)
    text_names = _text_name_of(base, text_delta) if text_delta is not None else {}
    written = 0
    for k, v in sd.items():
        if unet_names.get(k) in unet_delta:
            want = unet_delta[unet_names[k]]
        elif k in text_names:
            want = text_delta[text_names[k]]
        else:
            want = base_sd[k]
        assert torch.equal(v, want.to(v.dtype)), k
        written += unet_names.get(k) in unet_delta or k in text_names
    assert written == len(unet_delta) + len(text_names)
    return written


def test_cross_attn_delta_bin_through_sample_py(setup, tmp_path):
    """A "cross-attn" delta.bin: sample.py's check and loader write every to_k/to_v exactly; the images change."""
    d, base, pipe = setup
    unet_delta = _edited(_cross_attn(pipe.unet), seed=1)
    assert len(unet_delta) == 2 * 7  # tiny model: 2 down, 1 mid, 4 up transformer blocks; to_k and to_v
    path = tmp_path / "delta.bin"
    torch.save({"unet": unet_delta}, path)

    check_delta(_config(), path)  # the commands' cheap check
    _assert_loaded(load_model(_config(), d / "base.ckpt", path), base, unet_delta)
    # evaluate.py finds it in a run's checkpoints/ under its own name
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(path, tmp_path / "run" / "checkpoints" / "delta.bin")
    assert find_checkpoints(tmp_path / "run", "delta.bin") == [tmp_path / "run" / "checkpoints" / "delta.bin"]

    common = dict(ckpt=str(d / "base.ckpt"), config=str(TINY), H=16, W=16, ddim_steps=2, n_samples=2,
                  prompt="a painting", skip_grid=True)
    run_sample(SampleSettings(**common, outdir=str(tmp_path / "base")))
    run_sample(SampleSettings(**common, delta_ckpt=str(path), outdir=str(tmp_path / "ca")))
    before = [p.read_bytes() for p in sorted((tmp_path / "base" / "samples").glob("*.png"))]
    after = [p.read_bytes() for p in sorted((tmp_path / "ca" / "samples").glob("*.png"))]
    assert len(before) == len(after) == 2 and before != after


def test_delta_bin_with_text_encoder_and_benchmark_flags(setup, tmp_path):
    """With 'text_encoder' (the whole CLIPTextModel state dict): the UNet part and every text-encoder tensor are
    written (benchmark --delta); a "full-weight" delta.bin is a whole UNet, so --unet takes it too."""
    d, base, pipe = setup
    unet_delta = _edited(_cross_attn(pipe.unet), seed=2)
    text_sd = pipe.text_encoder.state_dict()
    text_delta = {k: text_sd[k] if "position_ids" in k else v  # integer ids stay as they are
                  for k, v in _edited({k: v.float() for k, v in text_sd.items()}, seed=3).items()}
    path = tmp_path / "delta.bin"
    torch.save({"unet": unet_delta, "text_encoder": text_delta}, path)
    spec = ModelSpec("ca", "delta", str(path))
    check_models([spec], _config(), str(d / "base.ckpt"))
    model = load_benchmark_model(spec, _config(), str(d / "base.ckpt"))
    assert _assert_loaded(model, base, unet_delta, text_delta) > len(unet_delta) + 10

    full = _edited(dict(pipe.unet.named_parameters()), seed=4)
    torch.save({"unet": full}, tmp_path / "full.bin")
    spec = ModelSpec("full", "unet", str(tmp_path / "full.bin"))
    check_models([spec], _config(), str(d / "base.ckpt"))
    _assert_loaded(load_benchmark_model(spec, _config(), str(d / "base.ckpt")), base, full)
    # a cross-attn file is only part of a UNet, one with a text encoder more than a UNet: --unet refuses both
    # and names --delta
    torch.save({"unet": unet_delta}, tmp_path / "part.bin")
    for name, why in (("part.bin", "only part of the UNet"), ("delta.bin", "text-encoder tensors")):
        with pytest.raises(ModelSpecError, match=f"{why}.*--delta"):
            check_models([ModelSpec("x", "unet", str(tmp_path / name))], _config(), str(d / "base.ckpt"))


def test_bad_delta_bins_are_refused_in_one_line(setup, tmp_path, capsys):
    d, _, pipe = setup
    k = next(iter(_cross_attn(pipe.unet)))
    cases = {
        "neither.bin": ({"weights": {"a": 1}}, CheckpointError, "neither a state dict .* nor a Concept Ablation"),
        "sdxl.bin": ({"unet": {k: torch.zeros(1), "add_embedding.linear_1.weight": torch.zeros(2, 2)}},
                     CheckpointError, "'unet': UNet key 'add_embedding.linear_1.weight' has no CompVis SD-v1"),
        "nounet.bin": ({"unet": {"foo.weight": torch.zeros(2)}}, CheckpointError, "'unet': not a diffusers UNet"),
        "notensor.bin": ({"unet": {k: [1.0]}}, CheckpointError, "is not a named tensor"),
        "empty.bin": ({"unet": {}}, CheckpointError, "holds no tensors"),
        "unsafe.bin": ({"unet": {k: torch.zeros(1)}, "text_encoder": {"x": NotAllowed()}}, UnsafeCheckpointError,
                       "refused to load"),
    }
    for name, (obj, error, message) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(error, match=message) as info:
            check_delta(_config(), tmp_path / name)
        assert "\n" not in str(info.value), name
    # the wrong shape (another model's delta.bin) is named before anything runs; the command exits 2
    torch.save({"unet": {k: torch.zeros(3, 3)}}, tmp_path / "shape.bin")
    for name in ("neither.bin", "shape.bin", "unsafe.bin"):
        out = tmp_path / f"out-{name}"
        with pytest.raises(SystemExit) as exit_info:
            sample_main(["--ckpt", str(d / "base.ckpt"), "--config", str(TINY), "--delta_ckpt",
                         str(tmp_path / name), "--outdir", str(out), "--H", "16", "--W", "16"])
        assert exit_info.value.code == 2
        assert name in capsys.readouterr().err and not out.exists()


def test_attention_only_keys_map_as_the_whole_unet_at_sd_size():
    """At SD-v1 size (meta): the cross-attn subset of a diffusers UNet maps to the same CompVis keys as within the
    whole UNet (the layout is read from the attention keys when no res-block keys are there)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from ldm.diffusers_format import unet_key_map
    from ldm.util import instantiate_from_config

    cfg = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[2] /
                                                "configs/stable-diffusion/v1-inference.yaml").model, resolve=True)
    with torch.device("meta"):
        model = instantiate_from_config(cfg)
    keys = list(convert_ldm_unet_checkpoint(model.state_dict(), export.diffusers_configs(cfg)["unet"]))
    whole = unet_key_map(keys)
    part = [k for k in keys if "attn2.to_k" in k or "attn2.to_v" in k]
    assert len(part) == 32  # 16 transformer blocks in SD v1
    assert unet_key_map(part) == {k: whole[k] for k in part}
    ups = [k for k in part if k.startswith(("up_blocks.", "mid_block."))]  # no down-level keys at all
    assert unet_key_map(ups) == {k: whole[k] for k in ups}
