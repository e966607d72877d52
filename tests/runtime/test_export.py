"""tools/export.py (runtime.export): base + delta -> one CompVis checkpoint, and a diffusers pipeline folder."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from ldm.checkpoint import CheckpointError, load_model_from_config, load_state_dict, save_state_dict
from ldm.util import instantiate_from_config
from runtime import export
from runtime.delta import save_delta
from runtime.export import ExportSettings
from runtime.loading import load_model

ROOT = Path(__file__).resolve().parents[2]

TINY = ROOT / "configs/tiny/v1-tiny.yaml"
PROMPTS = ["a painting in the style of van gogh", "A photo of a Grumpy cat!", "r2d2, 3 robots & a   dog's toy"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config() -> dict:
    return OmegaConf.to_container(OmegaConf.load(TINY).model, resolve=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A perturbed tiny base checkpoint and a delta that changes some attn2.to_k / to_v weights."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("export_inputs")
    torch.manual_seed(0)
    model = instantiate_from_config(tiny_config())
    with torch.no_grad():
        for t in model.model.parameters():
            t.add_(0.05 * torch.randn_like(t))
    sd = model.state_dict()
    save_state_dict(sd, d / "base.ckpt")
    keys = [k for k in sd if ".attn2.to_k." in k or ".attn2.to_v." in k][:4]
    assert len(keys) == 4
    save_delta(d / "delta.safetensors", {k: sd[k] + 0.2 * torch.randn_like(sd[k]) for k in keys})
    return d / "base.ckpt", d / "delta.safetensors", keys


@pytest.fixture(scope="module")
def exported(files, tmp_path_factory):
    torch.set_num_threads(1)
    base, delta, _ = files
    out = tmp_path_factory.mktemp("export_out")
    assert export.run(ExportSettings(ckpt=str(base), delta_ckpt=str(delta), config=str(TINY),
                                     out=str(out / "merged.safetensors"), diffusers=str(out / "pipe"))) \
        == out / "merged.safetensors"
    return out


@pytest.fixture(scope="module")
def reference(files):
    base, delta, _ = files
    return load_model(tiny_config(), base, delta)


def _unet_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    return x, torch.tensor([3, 871]), ctx


# ----------------------------------------------------------------------------- single file
def test_merged_checkpoint_equals_base_plus_delta(exported, reference, files):
    merged_path = exported / "merged.safetensors"
    merged = load_model_from_config(tiny_config(), merged_path, verbose=False)
    raw = load_state_dict(merged_path)
    own = reference.state_dict()
    assert set(raw) == set(own)
    assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in raw
    assert "betas" in raw and "alphas_cumprod" in raw
    assert any(k.startswith("first_stage_model.") for k in raw)
    for k, v in own.items():
        assert raw[k].dtype == v.dtype and torch.equal(raw[k], v), k
    # the delta really is in there (not just the base)
    base = load_state_dict(files[0])
    for k in files[2]:
        assert not torch.equal(raw[k], base[k])

    x, t, ctx = _unet_inputs()
    with torch.no_grad():
        assert torch.equal(merged.apply_model(x, t, ctx), reference.apply_model(x, t, ctx))
        assert torch.equal(merged.get_learned_conditioning(PROMPTS), reference.get_learned_conditioning(PROMPTS))

    with safe_open(str(merged_path), "pt") as f:
        meta = f.metadata()
    assert meta["base_ckpt"] == "base.ckpt" and meta["delta_ckpt"] == "delta.safetensors"
    assert meta["config"] == "v1-tiny.yaml"
    assert [p.name for p in exported.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_half_and_ckpt_output(files, tmp_path, reference, capsys):
    base, delta, _ = files
    out = tmp_path / "merged_fp16.ckpt"
    export.run(ExportSettings(ckpt=str(base), delta_ckpt=str(delta), config=str(TINY), out=str(out), half=True))
    assert "merged_fp16.ckpt" in capsys.readouterr().out
    sd = load_state_dict(out)
    own = reference.state_dict()
    assert set(sd) == set(own)
    for k, v in sd.items():
        if own[k].is_floating_point():
            assert v.dtype == torch.float16, k
            assert torch.equal(v, own[k].half()), k
        else:
            assert v.dtype == own[k].dtype and torch.equal(v, own[k]), k
    assert sd["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.long


def test_half_diffusers_folder(reference, tmp_path):
    from safetensors.torch import load_file

    export.save_pipeline(export.build_pipeline(reference, tiny_config()), tmp_path / "pipe", half=True)
    for part in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"):
        tensors = load_file(str(tmp_path / "pipe" / f"{part}.safetensors"))
        assert {v.dtype for v in tensors.values() if v.is_floating_point()} == {torch.float16}, part
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]


def test_config_found_from_delta_run(files, tmp_path):
    """Without --config, the delta's run config ({run}/configs/*.yaml) is used."""
    base, delta, _ = files
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "configs").mkdir()
    (run / "configs" / "project.yaml").write_text(TINY.read_text())
    run_delta = run / "checkpoints" / "delta.safetensors"
    run_delta.write_bytes(delta.read_bytes())
    settings = export.check(ExportSettings(ckpt=str(base), delta_ckpt=str(run_delta),
                                           out=str(tmp_path / "m.safetensors")))
    assert Path(settings.config).name == "project.yaml"


# ----------------------------------------------------------------------------- diffusers
@pytest.fixture(scope="module")
def pipe(exported):
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(str(exported / "pipe"), local_files_only=True)
    return p


def test_diffusers_folder_loads_offline(pipe, exported):
    from diffusers import DDIMScheduler

    names = {p.name for p in (exported / "pipe").iterdir()}
    assert {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= names
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    s = pipe.scheduler
    assert isinstance(s, DDIMScheduler)
    c = s.config
    assert (c.beta_start, c.beta_end, c.beta_schedule, c.num_train_timesteps) == (0.00085, 0.012, "scaled_linear",
                                                                                  1000)
    assert (c.steps_offset, c.clip_sample, c.set_alpha_to_one, c.prediction_type) == (1, False, False, "epsilon")
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)


def test_from_single_file_offline_with_the_exported_folder_as_config(exported, reference):
    """diffusers' from_single_file reads our merged file offline when config= names the exported folder
    (without it, it would fetch the SD v1 config from the hub)."""
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_single_file(str(exported / "merged.safetensors"), config=str(exported / "pipe"),
                                                 local_files_only=True, safety_checker=None)
    x, t, ctx = _unet_inputs(seed=7)
    with torch.no_grad():
        torch.testing.assert_close(p.unet(x, t, encoder_hidden_states=ctx).sample,
                                   reference.model.diffusion_model(x, timesteps=t, context=ctx), rtol=1e-4, atol=1e-4)


def test_exported_files_have_normal_permissions(exported):
    umask = os.umask(0)
    os.umask(umask)
    assert (exported / "pipe").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (exported / "merged.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    unet_file = exported / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"
    assert unet_file.stat().st_mode & 0o777 == 0o666 & ~umask


def test_diffusers_scheduler_matches_our_schedule(pipe, reference):
    torch.testing.assert_close(pipe.scheduler.alphas_cumprod, reference.alphas_cumprod, rtol=1e-6, atol=1e-7)


def test_diffusers_unet_matches(pipe, reference):
    x, t, ctx = _unet_inputs(seed=5)
    with torch.no_grad():
        ours = reference.model.diffusion_model(x, timesteps=t, context=ctx)
        theirs = pipe.unet(x, t, encoder_hidden_states=ctx).sample
    assert theirs.abs().max() > 1e-2
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_diffusers_vae_matches(pipe, reference):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(pipe.vae.decode(z).sample, reference.first_stage_model.decode(z),
                                   rtol=1e-4, atol=1e-4)


def test_diffusers_tokenizer_and_text_encoder_match(pipe, reference):
    ours_ids = reference.cond_stage_model.tokenizer(PROMPTS)
    tok = pipe.tokenizer
    assert tok.model_max_length == 77 and tok.pad_token == "<|endoftext|>"
    ids = tok(PROMPTS, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    assert torch.equal(ids, ours_ids)
    with torch.no_grad():
        theirs = pipe.text_encoder(ids).last_hidden_state
        ours = reference.get_learned_conditioning(PROMPTS)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_pndm_scheduler_option(reference):
    from diffusers import PNDMScheduler

    p = export.build_pipeline(reference, tiny_config(), scheduler="pndm")
    assert isinstance(p.scheduler, PNDMScheduler)
    c = p.scheduler.config
    assert (c.skip_prk_steps, c.steps_offset, c.set_alpha_to_one, c.beta_schedule) == (True, 1, False, "scaled_linear")


def test_sd_v1_configs_match_diffusers_sd_v1_layout():
    """The full v1-inference.yaml maps onto the well-known SD v1.x diffusers component configs."""
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/stable-diffusion/v1-inference.yaml").model)
    c = export.diffusers_configs(cfg)
    u, v = c["unet"], c["vae"]
    assert u["sample_size"] == 64 and u["block_out_channels"] == [320, 640, 1280, 1280]
    assert u["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert u["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert u["attention_head_dim"] == [8] * 4 and u["cross_attention_dim"] == 768 and u["layers_per_block"] == 2
    assert v["sample_size"] == 512 and v["block_out_channels"] == [128, 256, 512, 512]
    assert v["latent_channels"] == 4 and v["layers_per_block"] == 2 and v["scaling_factor"] == 0.18215
    assert c["scheduler"]["beta_start"] == 0.00085 and c["scheduler"]["beta_end"] == 0.012


# ----------------------------------------------------------------------------- errors
def _args(files, tmp_path, **kw):
    base, delta, _ = files
    a = {"--ckpt": str(base), "--delta_ckpt": str(delta), "--config": str(TINY),
         "--out": str(tmp_path / "merged.safetensors"), **kw}
    return [x for k, v in a.items() for x in (k, v)]


def _settings(files, tmp_path, **kw) -> ExportSettings:
    base, delta, _ = files
    return ExportSettings(**{"ckpt": str(base), "delta_ckpt": str(delta), "config": str(TINY),
                             "out": str(tmp_path / "merged.safetensors"), **kw})


def test_missing_base(files, tmp_path):
    with pytest.raises(FileNotFoundError, match="--ckpt not found"):
        export.run(_settings(files, tmp_path, ckpt=str(tmp_path / "nope.ckpt")))
    assert list(tmp_path.iterdir()) == []


def test_delta_that_does_not_fit(files, tmp_path):
    bad = tmp_path / "bad_delta.safetensors"
    key = files[2][0]
    save_delta(bad, {key: torch.zeros(3, 5), "model.diffusion_model.no_such.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="does not fit"):
        export.run(_settings(files, tmp_path, delta_ckpt=str(bad)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad_delta.safetensors"]


@pytest.mark.parametrize("name", ["merged.bin", "merged", "merged.pt"])
def test_bad_output_suffix(files, tmp_path, name):
    with pytest.raises(export.ExportError, match="suffix"):
        export.run(_settings(files, tmp_path, out=str(tmp_path / name)))
    assert list(tmp_path.iterdir()) == []


def test_non_empty_diffusers_dir_refused_up_front(files, tmp_path):
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "keep.txt").write_text("x")
    with pytest.raises(export.ExportError, match="not an empty directory"):
        export.run(_settings(files, tmp_path, diffusers=str(tmp_path / "pipe")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_diffusers_missing_is_a_clear_error(files, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    with pytest.raises(export.ExportError, match="needs the 'diffusers' package"):
        export.run(_settings(files, tmp_path, diffusers=str(tmp_path / "pipe")))
    assert list(tmp_path.iterdir()) == []


def test_unsupported_config_for_diffusers():
    cfg = tiny_config()
    cfg["params"]["first_stage_config"]["params"]["ddconfig"]["attn_resolutions"] = [16]
    with pytest.raises(export.ExportError, match="attn_resolutions"):
        export.diffusers_configs(cfg)


def test_cli_reports_errors_without_traceback(files, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = _args(files, tmp_path, **{"--out": str(tmp_path / "x.txt")})
    r = subprocess.run([sys.executable, str(ROOT / "tools/export.py"), *argv],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0
    assert r.stderr.strip().startswith("error:") and "suffix" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_command_line_defaults_are_the_settings_defaults(files, tmp_path):
    argv = _args(files, tmp_path)
    assert ExportSettings(**vars(export.build_parser().parse_args(argv))) == _settings(files, tmp_path)
