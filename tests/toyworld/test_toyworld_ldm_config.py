"""toyworld.ldm reads its model config through ldm.util.load_model_config and writes back exactly the model
section it built from (build_ldm -> save_ldm -> load_model_config round trip)."""
import torch

from ldm.util import load_model_config
from toyworld import ldm as tl


def test_saved_yaml_is_the_model_section_it_was_built_from(tmp_path):
    ldm, model_config = tl.build_ldm()
    assert type(model_config) is dict and model_config == load_model_config(tl.DEFAULT_CONFIG)
    tl.save_ldm(ldm, model_config, tmp_path)
    assert load_model_config(tmp_path / "ldm.yaml") == load_model_config(tl.DEFAULT_CONFIG)


def test_overrides_reach_the_model_and_the_saved_yaml(tmp_path):
    torch.manual_seed(0)
    ldm, model_config = tl.build_ldm(scale_factor=0.25, transformer_depth=2)
    assert ldm.scale_factor == 0.25
    depths = {len(m.transformer_blocks) for m in ldm.modules() if hasattr(m, "transformer_blocks")}
    assert depths == {2}
    tl.save_ldm(ldm, model_config, tmp_path)
    saved = load_model_config(tmp_path / "ldm.yaml")
    assert saved["params"]["scale_factor"] == 0.25
    assert saved["params"]["unet_config"]["params"]["transformer_depth"] == 2
    assert tl._shipped_vae(tmp_path)[1] == 0.25  # --vae_from reads the scale back through the loader
