"""ldm.util.load_model_config: the one model-config loader, and its one-line errors on bad files."""
import pickle

import pytest
import torch
from conftest import ROOT
from omegaconf import OmegaConf

from ldm.util import ModelConfigError, load_model_config

MODEL_CONFIGS = ["configs/stable-diffusion/v1-inference.yaml", "configs/tiny/v1-tiny.yaml",
                 "configs/toyworld/ldm.yaml", "assets/toyworld/ldm/ldm.yaml"]


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_same_dict_as_the_ad_hoc_loaders(name):
    path = ROOT / name
    want = OmegaConf.to_container(OmegaConf.load(path).model, resolve=True)
    got = load_model_config(path)
    assert got == want and type(got) is dict
    assert load_model_config(str(path)) == want


def test_interpolations_are_resolved_inside_and_outside_model(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("lr: 3.0e-5\nbase:\n  channels: 4\nmodel:\n  target: a.B\n  params:\n    lr: ${lr}\n"
                    "    channels: ${base.channels}\n    same: ${.channels}\n    side: ${..side}\n  side: 8\n")
    assert load_model_config(path) == {"target": "a.B", "params": {"lr": 3e-5, "channels": 4, "same": 4, "side": 8},
                                       "side": 8}
    whole = tmp_path / "whole.yaml"
    whole.write_text("base:\n  target: a.B\nmodel: ${base}\n")
    assert load_model_config(whole) == {"target": "a.B"}


def _write(tmp_path, name, data):
    path = tmp_path / name
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


BAD = [
    ("missing.yaml", None, "no such file"),
    ("model.ckpt", "torch", "not a text file"),
    ("model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}", "not valid YAML"),
    ("pickle.bin", pickle.dumps({"model": 1}, protocol=4), "not"),
    ("broken.yaml", "model: {target: [1\n", "not valid YAML"),
    ("dup.yaml", "model: {}\nmodel: {}\n", "not valid YAML"),
    ("list.yaml", "- 1\n- 2\n", "the top level is a list"),
    ("empty.yaml", "", "no 'model:' section"),
    ("nomodel.yaml", "training: {lr: 1}\n", "no 'model:' section"),
    ("scalar.yaml", "model: 3\n", "'model:' is int 3, not a mapping"),
    ("null.yaml", "model:\n", "'model:' is empty, not a mapping"),
    ("mlist.yaml", "model: [1, 2]\n", "'model:' is a list, not a mapping"),
    ("interp.yaml", "model:\n  params:\n    lr: ${nowhere}\n", "nowhere"),
]


@pytest.mark.parametrize("name,data,what", BAD, ids=[b[0] for b in BAD])
def test_bad_files_raise_one_line_naming_file_and_problem(tmp_path, name, data, what):
    if data == "torch":
        path = tmp_path / name
        torch.save({"state_dict": {"w": torch.zeros(4)}}, path)
    elif data is None:
        path = tmp_path / name
    else:
        path = _write(tmp_path, name, data)
    with pytest.raises(ModelConfigError) as info:
        load_model_config(path)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert str(path) in msg and what in msg
    assert "\n" not in msg and "Traceback" not in msg and "TypeError" not in msg
    # no chained library error under it: a caller that prints the exception prints this one line
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)


def test_a_folder_is_not_a_config(tmp_path):
    with pytest.raises(ModelConfigError, match="not a file"):
        load_model_config(tmp_path)
