"""A ConceptPrune mask file whose metadata record is damaged (not JSON, not an object) is a MaskError naming the
file (one line from conceptprune.py's check), not a raw JSONDecodeError or AttributeError."""
import pytest
import torch
from safetensors.torch import save_file

from prune.wanda import META_KEY, MaskError, load_masks


@pytest.mark.parametrize("raw,match", [('{"format": "conceptprune-masks/1", "n_ca', "metadata is damaged"),
                                       ('["conceptprune-masks/1"]', "unknown mask format None")])
def test_damaged_mask_metadata_is_a_mask_error(tmp_path, raw, match):
    path = tmp_path / "masks_sr0.01.safetensors"
    save_file({"mask.0.0": torch.zeros(1, dtype=torch.int32)}, str(path), metadata={META_KEY: raw})
    with pytest.raises(MaskError, match=match) as info:
        load_masks(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
