"""An SD v1.5 checkpoint in its distribution form (v1-5-pruned-emaonly: a flat safetensors file, here in fp16,
with the EMA bookkeeping scalars) has the v1.4 layout and works everywhere; conceptprune.py --paper_base picks it
(ConceptPrune's paper used SD v1.5)."""
import pytest
import torch
from conftest import TINY_CONFIG, tiny_model
from safetensors.torch import save_file

from ldm.checkpoint import load_model_from_config, load_state_dict
from prune import jobs as conceptprune
from runtime.loading import check_checkpoints

TINY = ["--config", str(TINY_CONFIG), "--H", "16", "--W", "16", "--steps", "2", "--precision", "full",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """The tiny model written like v1-5-pruned-emaonly(-fp16).safetensors: no 'state_dict' wrapper, float
    tensors in fp16, plus model_ema.decay / model_ema.num_updates."""
    model = tiny_model()
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous().clone() for k, v in model.state_dict().items()}
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    path = tmp_path_factory.mktemp("sd15") / "v1-5-pruned-emaonly.safetensors"
    save_file(sd, str(path))
    return path, model


def test_sd15_file_loads_like_v14(sd15):
    from omegaconf import OmegaConf

    path, model = sd15
    config = OmegaConf.load(TINY_CONFIG).model
    check_checkpoints(OmegaConf.to_container(config, resolve=True), path)  # what every script vets first
    loaded = load_model_from_config(config, path, verbose=False)
    own = model.state_dict()
    for k, v in loaded.state_dict().items():
        want = own[k].half().to(v.dtype) if own[k].is_floating_point() else own[k]
        assert torch.equal(v, want), k


def test_paper_base_flag(sd15, tmp_path, monkeypatch):
    import shutil

    path, _ = sd15
    v14 = tmp_path / "sd-v1-4.safetensors"
    shutil.copy(path, v14)
    monkeypatch.setattr(conceptprune, "PAPER_CKPT", path)
    monkeypatch.setattr(conceptprune, "DEFAULT_CKPT", v14)
    settings = conceptprune.settings_from_argv(["discover", "--concept", "Monet", "--paper_base", "--outdir",
                                                str(tmp_path), *TINY])
    assert settings.ckpt == str(path)
    assert conceptprune.settings_from_argv(["discover", "--concept", "Monet", "--outdir", str(tmp_path),
                                            *TINY]).ckpt == str(v14)
    with pytest.raises(ValueError, match="not both"):
        conceptprune.settings_from_argv(["discover", "--concept", "Monet", "--paper_base", "--ckpt", str(path),
                                         *TINY])
    monkeypatch.setattr(conceptprune, "PAPER_CKPT", tmp_path / "v1-5-pruned-emaonly.safetensors")
    with pytest.raises(FileNotFoundError, match="v1-5-pruned-emaonly.safetensors"):
        conceptprune.settings_from_argv(["discover", "--concept", "Monet", "--paper_base", *TINY])


def test_sd15_through_conceptprune_sample_and_export(sd15, tmp_path, monkeypatch):
    path, _ = sd15
    monkeypatch.setattr(conceptprune, "PAPER_CKPT", path)
    base, target = tmp_path / "base.txt", tmp_path / "target.txt"
    base.write_text("a photo of a cat\na photo of a dog\n")
    target.write_text("a cat in the style of monet\na dog in the style of monet\n")
    s = conceptprune.run_discover(conceptprune.DiscoverSettings(
        concept="mystyle", base_file=str(base), target_file=str(target), skill_ratio=0.3, save_images=0,
        paper_base=True, outdir=str(tmp_path / "d"), config=str(TINY_CONFIG), H=16, W=16, steps=2,
        precision="full", device="cpu"))
    delta = tmp_path / "pruned.safetensors"
    conceptprune.run_prune(conceptprune.PruneSettings(masks=(s["masks"],), tau=2, out=str(delta), paper_base=True,
                                                      config=str(TINY_CONFIG)))
    assert load_state_dict(delta)

    from runtime.sample import SampleSettings, run
    imgs = run(SampleSettings(ckpt=str(path), delta_ckpt=str(delta), config=str(TINY_CONFIG), prompt="a dog",
                              n_samples=1, H=16, W=16, ddim_steps=2, outdir=str(tmp_path / "samples"),
                              precision="full"))
    assert len(imgs) == 1 and imgs[0].is_file()

    from runtime import export
    out = tmp_path / "merged.safetensors"
    export.run(export.ExportSettings(ckpt=str(path), delta_ckpt=str(delta), config=str(TINY_CONFIG), out=str(out)))
    merged = load_state_dict(out)
    for k, v in load_state_dict(delta).items():
        assert torch.equal(merged[k].to(v.dtype), v), k


def test_sd15_as_the_base_of_an_ablation(sd15, tmp_path):
    from ablation.train import TrainSettings, run

    path, _ = sd15
    (tmp_path / "painting.txt").write_text("a painting of a harbour at dusk\na portrait of an old fisherman\n")
    fast = ["training.max_steps=2", "training.save_freq=2", "data.size=16", "generation.steps=2",
            "logging.image_every=2", "logging.image_steps=2", "training.num_workers=0", "training.batch_size=2"]
    run_dir = run(TrainSettings(train=True, concept_type="style", caption_target="van gogh",
                                prompts=str(tmp_path / "painting.txt"), train_size=2, model_config=str(TINY_CONFIG),
                                base_ckpt=str(path), root=str(tmp_path / "data"), logdir=str(tmp_path / "logs"),
                                n_samples=2, overrides=tuple(fast)))
    assert load_state_dict(next((run_dir / "checkpoints").glob("delta_step_2*")))
