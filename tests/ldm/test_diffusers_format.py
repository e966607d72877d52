"""A diffusers-format base model (pipeline folder, or a diffusers-keyed UNet file inside one) loads onto our
CompVis-keyed model: the exact inverse of diffusers' own CompVis converters (round trip through
tools/export.py), the same keys and shapes at SD-v1 size (meta tensors), and every entry point takes it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG as TINY
from conftest import tiny_model
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ldm import diffusers_format as dfmt
from ldm.checkpoint import CheckpointError, load_model_from_config, load_state_dict, state_dict_shapes
from runtime import export
from runtime.sample import SampleSettings
from runtime.sample import run as run_sample

pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[2]
SD_CONFIG = ROOT / "configs/stable-diffusion/v1-inference.yaml"


def _config(path=TINY) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path).model, resolve=True)


@pytest.fixture(scope="module")
def original():
    return tiny_model(seed=3).state_dict()


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("diffusers") / "pipe"
    model = tiny_model(seed=3)
    export.save_pipeline(export.build_pipeline(model, _config()), d)
    return d


def _assert_same(got: dict, want: dict):
    assert set(got) == set(want), (sorted(set(want) - set(got))[:5], sorted(set(got) - set(want))[:5])
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k


def test_pipeline_folder_round_trip_is_exact(pipe_dir, original):
    """CompVis -> diffusers (diffusers' converters) -> CompVis (ours): every tensor bit-identical, including the
    noise-schedule buffers (from scheduler_config.json) and the text encoder's position_ids."""
    _assert_same(load_state_dict(pipe_dir), original)
    shapes = state_dict_shapes(pipe_dir)
    assert all(v.device.type == "meta" for v in shapes.values())
    assert {k: v.shape for k, v in shapes.items()} == {k: v.shape for k, v in original.items()}


def test_unet_file_inside_its_pipeline(pipe_dir, original, tmp_path):
    """A diffusers UNet file (here: fine-tuned, saved into unet/) gives the UNet; the rest comes from the folder."""
    pipe = tmp_path / "pipe"
    shutil.copytree(pipe_dir, pipe)
    unet_file = pipe / "unet" / "diffusion_pytorch_model.safetensors"
    unet = load_file(unet_file)
    unet["conv_in.bias"] = unet["conv_in.bias"] + 1
    save_file(unet, pipe / "unet" / "finetuned.safetensors")
    got = load_state_dict(pipe / "unet" / "finetuned.safetensors")
    want = dict(original)
    want["model.diffusion_model.input_blocks.0.0.bias"] = original["model.diffusion_model.input_blocks.0.0.bias"] + 1
    _assert_same(got, want)
    # alone it has no VAE or text encoder: refused, with the reason
    save_file(unet, tmp_path / "unet_alone.safetensors")
    with pytest.raises(CheckpointError, match="no VAE or text encoder"):
        load_state_dict(tmp_path / "unet_alone.safetensors")


def test_fp16_variant_bin_files_and_shards(pipe_dir, original, tmp_path):
    pipe = tmp_path / "pipe"
    shutil.copytree(pipe_dir, pipe)
    unet = load_file(pipe / "unet" / "diffusion_pytorch_model.safetensors")
    (pipe / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(unet)
    half = len(keys) // 2
    shards = {"a.safetensors": keys[:half], "b.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: unet[k] for k in ks}, pipe / "unet" / name)
    (pipe / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    vae = pipe / "vae" / "diffusion_pytorch_model.safetensors"
    sd = load_file(vae)
    vae.unlink()
    save_file({k: v.half() for k, v in sd.items()}, pipe / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    text = pipe / "text_encoder" / "model.safetensors"
    torch.save(load_file(text), pipe / "text_encoder" / "pytorch_model.bin")
    text.unlink()
    got = load_state_dict(pipe)
    assert got["first_stage_model.encoder.conv_in.weight"].dtype == torch.float16
    _assert_same({k: v.float() if k.startswith("first_stage_model.") else v for k, v in got.items()},
                 {k: v.half().float() if k.startswith("first_stage_model.") else v for k, v in original.items()})


def test_sd_v1_size_key_mapping_matches_diffusers_converters():
    """At SD-v1 size (meta tensors): diffusers' converters map our keys to theirs, ours map them back."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from ldm.util import instantiate_from_config

    cfg = _config(SD_CONFIG)
    with torch.device("meta"):
        model = instantiate_from_config(cfg)
    sd = model.state_dict()
    cfgs = export.diffusers_configs(cfg)
    unet = convert_ldm_unet_checkpoint(sd, cfgs["unet"])
    vae = convert_ldm_vae_checkpoint(sd, cfgs["vae"])
    back = dfmt.convert(unet, vae, {})
    ours = {k: v.shape for k, v in sd.items() if k.startswith((dfmt.UNET_PREFIX, dfmt.VAE_PREFIX))}
    assert {k: v.shape for k, v in back.items()} == ours
    assert len(ours) == 934  # SD v1: 686 UNet + 248 VAE tensors


def test_model_loads_and_entry_points_accept_a_pipeline_folder(pipe_dir, original, tmp_path):
    model = load_model_from_config(_config(), pipe_dir, verbose=False)
    _assert_same(model.state_dict(), original)
    from ablation.train import settings_from_argv
    from prune.jobs import settings_from_argv as conceptprune_settings

    (tmp_path / "cat.txt").write_text("a cat on a sofa\n")
    settings_from_argv(["--model_config", str(TINY), "-rc", str(pipe_dir), "--root", str(tmp_path / "data"),
                        "--logdir", str(tmp_path / "logs"), "--concept_type", "object", "--caption_target",
                        "cat+grumpy cat", "--prompts", str(tmp_path / "cat.txt"), "--n_samples", "2", "data.size=16"])
    out = tmp_path / "samples"
    run_sample(SampleSettings(ckpt=str(pipe_dir), config=str(TINY), H=16, W=16, ddim_steps=2, n_samples=1,
                              prompt="a cat", outdir=str(out), skip_grid=True))
    assert len(list((out / "samples").glob("*.png"))) == 1
    conceptprune_settings(["discover", "--concept", "Van Gogh", "--ckpt", str(pipe_dir), "--config", str(TINY),
                           "--outdir", str(tmp_path / "prune"), "--H", "16", "--W", "16"])


def test_schedule_mismatch_and_broken_folders_are_refused_early(pipe_dir, tmp_path):
    from runtime.loading import check_checkpoints

    pipe = tmp_path / "pipe"
    shutil.copytree(pipe_dir, pipe)
    check_checkpoints(_config(), pipe)
    sched = pipe / "scheduler" / "scheduler_config.json"
    cfg = json.loads(sched.read_text())
    sched.write_text(json.dumps({**cfg, "beta_end": 0.02}))
    with pytest.raises(CheckpointError, match="not the model config's schedule"):
        check_checkpoints(_config(), pipe)
    sched.write_text(json.dumps(cfg))
    shutil.rmtree(pipe / "vae")
    with pytest.raises(CheckpointError, match="no vae/ folder"):
        check_checkpoints(_config(), pipe)
    with pytest.raises(FileNotFoundError, match="diffusers pipeline folder"):
        check_checkpoints(_config(), tmp_path / "nothing")


def test_unknown_unet_keys_are_named():
    with pytest.raises(dfmt.DiffusersFormatError, match="add_embedding"):
        dfmt.unet_key_map(["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight", "add_embedding.linear_1.weight"])
