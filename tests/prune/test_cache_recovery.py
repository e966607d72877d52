"""A damaged ConceptPrune norms cache never blocks a rerun (issue 30, item 8): a truncated, foreign or hostile
``norms-{key}.safetensors`` is one ``warning:`` line naming the file, the norms are recorded again (equal to a fresh
recording), and the file is replaced atomically by a readable one."""
import os
import pickle

import pytest
import torch
from conftest import TINY_CONFIG, Evil

from ldm.checkpoint import load_state_dict, save_state_dict
from prune import jobs
from prune.wanda import load_masks

TINY = dict(config=str(TINY_CONFIG), H=16, W=16, steps=2, precision="full", device="cpu")



@pytest.fixture(scope="module")
def fresh(tmp_path_factory, tiny_ckpt):
    """One discover run from scratch: its settings maker, summary, norms and masks (the reference)."""
    d = tmp_path_factory.mktemp("norms")
    base, target = d / "base.txt", d / "target.txt"
    base.write_text("a photo of a dog\na photo of a car\n")
    target.write_text("a dog in the style of cat\na car in the style of cat\n")

    def settings(outdir):
        return jobs.DiscoverSettings(concept="mystyle", base_file=str(base), target_file=str(target),
                                     skill_ratio=0.25, batch_size=2, save_images=0, ckpt=str(tiny_ckpt),
                                     outdir=str(outdir), **TINY)

    summary = jobs.run_discover(settings(d / "fresh"))
    assert not summary["norms_reused"]
    return settings, summary, load_state_dict(summary["norms"]), load_masks(summary["masks"])[0]


def _same(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _damage_and_rerun(fresh, tmp_path, capsys, damage):
    settings, ref, ref_norms, ref_masks = fresh
    out = tmp_path / "run"
    first = jobs.run_discover(settings(out))  # the cache under test
    norms = out / os.path.basename(first["norms"])
    assert norms.is_file() and _same(load_state_dict(norms), ref_norms)
    damage(norms)
    capsys.readouterr()
    again = jobs.run_discover(settings(out))
    err = capsys.readouterr().err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and str(norms) in warnings[0] and "recomputing" in warnings[0], err
    assert "weights_only" not in err and "Traceback" not in err
    assert not again["norms_reused"]
    # recorded again: equal to the fresh recording, the masks too; the file was replaced by a readable one
    assert _same(load_state_dict(norms), ref_norms)
    assert _same(load_masks(again["masks"])[0], ref_masks)
    assert not list(out.glob(".*tmp"))
    # and the next run reuses it, silently
    capsys.readouterr()
    third = jobs.run_discover(settings(out))
    assert third["norms_reused"] and "warning" not in capsys.readouterr().err
    return norms


def test_truncated_norms_cache_is_recorded_again(fresh, tmp_path, capsys):
    def truncate(path):
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])

    _damage_and_rerun(fresh, tmp_path, capsys, truncate)


def test_garbage_and_hostile_norms_cache_is_recorded_again_without_running_code(fresh, tmp_path, capsys):
    marker = tmp_path / "pwned"
    _damage_and_rerun(fresh, tmp_path, capsys, lambda p: p.write_bytes(pickle.dumps(Evil(marker))))
    assert not marker.exists()
    _damage_and_rerun(fresh, tmp_path / "b", capsys, lambda p: p.write_bytes(b"\x00" * 7))


def test_norms_cache_of_other_layers_or_without_metadata_is_recorded_again(fresh, tmp_path, capsys):
    def foreign(path):  # a valid safetensors file, but not these norms: wrong metadata, one layer
        save_state_dict({"base.0": torch.ones(2, 3), "target.0": torch.ones(2, 3)}, path,
                        metadata={"conceptprune_norms": '{"key": "other", "layers": []}'})

    _damage_and_rerun(fresh, tmp_path, capsys, foreign)
    _damage_and_rerun(fresh, tmp_path / "b", capsys, lambda p: save_state_dict({"x": torch.ones(1)}, p))
