import argparse
import os
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

import ldm.checkpoint as ckpt
from ldm.checkpoint import (
    CheckpointError,
    LoadReport,
    UnsafeCheckpointError,
    load_checkpoint,
    load_into,
    load_state_dict,
    save_state_dict,
)


def _safe_globals_now():
    return {g if not isinstance(g, tuple) else (id(g[0]), g[1])
            for g in torch.serialization.get_safe_globals()}


def _sd():
    return {"a.weight": torch.randn(3, 4), "a.bias": torch.arange(3, dtype=torch.float16),
            "steps": torch.tensor([1, 2], dtype=torch.int64)}


@pytest.mark.parametrize("name", ["m.ckpt", "m.safetensors"])
def test_round_trip(tmp_path, name):
    sd = _sd()
    save_state_dict(sd, tmp_path / name, metadata={"who": "test"})
    back = load_state_dict(tmp_path / name)
    assert back.keys() == sd.keys()
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k])
    assert sorted(os.listdir(tmp_path)) == [name]  # no temp files left behind


def test_safetensors_shape_matches_ckpt_form(tmp_path):
    save_state_dict(_sd(), tmp_path / "m.safetensors")
    assert set(load_checkpoint(tmp_path / "m.safetensors")) == {"state_dict"}


def test_safetensors_shared_storage_saved(tmp_path):
    w = torch.randn(4, 4)
    save_state_dict({"emb.weight": w, "head.weight": w}, tmp_path / "tied.safetensors")
    back = load_state_dict(tmp_path / "tied.safetensors")
    assert torch.equal(back["emb.weight"], w) and torch.equal(back["head.weight"], w)


def test_format_sniffed_not_guessed_from_name(tmp_path):
    save_state_dict(_sd(), tmp_path / "m.safetensors")
    os.rename(tmp_path / "m.safetensors", tmp_path / "weights.bin")
    save_state_dict(_sd(), tmp_path / "m.ckpt")
    os.rename(tmp_path / "m.ckpt", tmp_path / "weights.data")
    assert load_state_dict(tmp_path / "weights.bin").keys() == _sd().keys()
    assert load_state_dict(tmp_path / "weights.data").keys() == _sd().keys()


def test_legacy_torch_format(tmp_path):
    torch.save({"state_dict": _sd()}, tmp_path / "old.ckpt", _use_new_zipfile_serialization=False)
    assert load_state_dict(tmp_path / "old.ckpt").keys() == _sd().keys()


def test_bare_state_dict(tmp_path):
    torch.save(_sd(), tmp_path / "bare.pth")
    assert load_state_dict(tmp_path / "bare.pth").keys() == _sd().keys()


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_checkpoint(tmp_path / "nope.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(CheckpointError, match="unrecognised"):
        load_checkpoint(tmp_path / "junk.ckpt")
    torch.save({"epoch": 3, "global_step": 7}, tmp_path / "empty.ckpt")
    with pytest.raises(CheckpointError, match="no tensors"):
        load_state_dict(tmp_path / "empty.ckpt")
    save_state_dict(_sd(), tmp_path / "m.ckpt")
    data = (tmp_path / "m.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "cut.ckpt")


def _save_with_fake_lightning(obj, path, modname="pytorch_lightning.callbacks.model_checkpoint"):
    """torch.save ``obj(ModelCheckpoint)`` while a fake Lightning module exists, then remove it,
    so the pickle references the real Lightning class name but nothing can import it."""
    parts = modname.split(".")
    added = []
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
            added.append(name)
    mod = sys.modules[modname]
    cls = type("ModelCheckpoint", (), {"__module__": modname})
    mod.ModelCheckpoint = cls
    try:
        torch.save(obj(cls), path)
    finally:
        for name in added:
            del sys.modules[name]


def test_sd_v1_4_like_lightning_checkpoint(tmp_path):
    sd = _sd()
    _save_with_fake_lightning(lambda cls: {
        "epoch": 6, "global_step": 470000, "pytorch-lightning_version": "1.4.2",
        "callbacks": {cls: {"monitor": None, "best_model_score": None,
                            "kth_value": np.float64(np.inf), "count": np.int64(3),
                            "current_score": np.float32(0.5)}},
        "hyper_parameters": argparse.Namespace(lr=1e-4),
        "state_dict": sd,
    }, tmp_path / "sd.ckpt")
    assert "pytorch_lightning" not in sys.modules or not hasattr(
        sys.modules["pytorch_lightning"], "callbacks")

    before = _safe_globals_now()
    obj = load_checkpoint(tmp_path / "sd.ckpt")
    assert obj["epoch"] == 6 and obj["global_step"] == 470000
    (key, state), = obj["callbacks"].items()
    assert key is ckpt.ModelCheckpointStandIn
    assert state["kth_value"] == np.inf and state["count"] == 3
    assert obj["hyper_parameters"].lr == 1e-4
    assert load_state_dict(tmp_path / "sd.ckpt").keys() == sd.keys()
    # our allow-list must not leak into the process-wide torch setting
    assert _safe_globals_now() == before


def test_lightning2_name_also_allowed(tmp_path):
    _save_with_fake_lightning(lambda cls: {"callbacks": {cls: {}}, "state_dict": _sd()},
                              tmp_path / "l2.ckpt",
                              modname="lightning.pytorch.callbacks.model_checkpoint")
    assert load_state_dict(tmp_path / "l2.ckpt").keys() == _sd().keys()


def test_numpy_scalar_under_numpy1_name(tmp_path):
    # numpy 1.x writes numpy.core.multiarray.scalar; numpy 2 writes numpy._core...; both load.
    path = tmp_path / "np1.ckpt"
    torch.save({"v": np.float64(2.5), "state_dict": _sd()}, path)
    import zipfile
    with zipfile.ZipFile(path) as z:
        items = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in items if n.endswith("data.pkl"))
    assert b"numpy._core.multiarray" in items[pkl] or b"numpy.core.multiarray" in items[pkl]
    items[pkl] = items[pkl].replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for n, b in items.items():
            z.writestr(n, b)
    assert load_checkpoint(path)["v"] == 2.5


class _Evil:
    def __init__(self, reduce):
        self._reduce = reduce

    def __reduce__(self):
        return self._reduce


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "pathlib"])
def test_malicious_checkpoint_refused(tmp_path, kind):
    marker = tmp_path / "pwned"
    if kind == "os.system":
        payload, expect = (os.system, (f"touch {marker}",)), os.system.__module__ + ".system"
    elif kind == "builtins.exec":
        payload, expect = (exec, (f"open({str(marker)!r}, 'w').close()",)), "builtins.exec"
    else:
        import pathlib
        payload, expect = (pathlib.Path.touch, (pathlib.Path(marker),)), "builtins.getattr"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _sd(), "x": _Evil(payload)}, path)

    before = _safe_globals_now()
    with pytest.raises(UnsafeCheckpointError) as ei:
        load_checkpoint(path)
    assert ei.value.global_name == expect
    assert expect in str(ei.value) and "execute code" in str(ei.value)
    assert ".safetensors" in str(ei.value)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_state_dict(path)
    assert not marker.exists()
    assert _safe_globals_now() == before


def test_user_registered_globals_survive(tmp_path):
    # A global the caller allow-listed themselves (and that we also allow) stays allowed.
    torch.save({"state_dict": _sd()}, tmp_path / "m.ckpt")
    with torch.serialization.safe_globals([argparse.Namespace]):
        load_checkpoint(tmp_path / "m.ckpt")
        assert argparse.Namespace in torch.serialization.get_safe_globals()


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("ids", torch.zeros(5, dtype=torch.long))
        # Like the CLIP text encoder: fills a buffer the checkpoint may lack.
        self._register_load_state_dict_pre_hook(self._fill_ids)

    @staticmethod
    def _fill_ids(state_dict, prefix, *args):
        state_dict.setdefault(prefix + "ids", torch.arange(5))


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _Net()
        self.extra = nn.Linear(2, 2)


def _ckpt_for_outer():
    m = _Outer()
    sd = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in m.state_dict().items()}
    del sd["net.ids"]  # the pre-hook supplies it
    del sd["extra.bias"]  # genuinely missing
    sd["extra.weight"] = torch.randn(5, 5)  # wrong shape
    sd["stray.weight"] = torch.randn(1)  # unexpected
    sd["model_ema.net.lin.weight"] = torch.randn(3, 4)  # EMA copy
    sd["model_ema.decay"] = torch.tensor(0.9999)
    return sd


def test_load_into_reports(tmp_path):
    model, sd = _Outer(), _ckpt_for_outer()
    before_extra = model.extra.weight.clone()
    report = load_into(model, sd)
    assert isinstance(report, LoadReport)
    assert report.missing == ["extra.bias"]
    assert report.unexpected == ["stray.weight"]
    assert report.mismatched == [("extra.weight", (5, 5), (2, 2))]
    assert report.ignored == 2
    assert report.loaded == 3  # net.lin.weight, net.lin.bias, net.ids (via pre-hook)
    assert torch.equal(model.net.lin.weight, sd["net.lin.weight"])
    assert torch.equal(model.net.ids, torch.arange(5))
    assert torch.equal(model.extra.weight, before_extra)
    text = str(report)
    for s in ("extra.bias", "stray.weight", "extra.weight", "[5, 5]", "model_ema", "EMA"):
        assert s in text
    assert "model_ema.decay" in sd  # caller's dict untouched
    with pytest.raises(CheckpointError, match="extra.weight"):
        report.raise_if_incompatible()


def test_load_into_strict():
    with pytest.raises(CheckpointError, match="stray.weight"):
        load_into(_Outer(), _ckpt_for_outer(), strict=True)
    m = _Outer()
    good = {k: v for k, v in m.state_dict().items() if k != "net.ids"}
    good["model_ema.x"] = torch.zeros(1)
    report = load_into(_Outer(), good, strict=True)
    assert report.ok and report.ignored == 1 and report.loaded == 5


def test_load_into_passes_original_dict_when_clean():
    m = _Outer()
    sd = dict(m.state_dict())
    seen = {}
    orig = m.load_state_dict

    def spy(state_dict, strict=True, **kw):
        seen["sd"] = state_dict
        return orig(state_dict, strict=strict, **kw)

    m.load_state_dict = spy
    load_into(m, sd)
    assert seen["sd"] is sd  # no needless copy of a multi-GB dict


@pytest.mark.parametrize("name,target", [("x.safetensors", "safetensors.torch.save_file"),
                                         ("x.ckpt", "torch.save")])
def test_atomic_save(tmp_path, monkeypatch, name, target):
    def partial_then_fail(obj, path, *a, **kw):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04half a file")
        raise OSError("disk full")

    import safetensors.torch
    if target == "torch.save":
        monkeypatch.setattr(torch, "save", partial_then_fail)
    else:
        monkeypatch.setattr(safetensors.torch, "save_file", partial_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_state_dict(_sd(), tmp_path / name)
    assert os.listdir(tmp_path) == []


def test_atomic_save_keeps_previous_file(tmp_path, monkeypatch):
    dst = tmp_path / "x.ckpt"
    save_state_dict(_sd(), dst)
    old = dst.read_bytes()

    def boom(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_state_dict({"z": torch.zeros(1)}, dst)
    assert dst.read_bytes() == old and os.listdir(tmp_path) == ["x.ckpt"]


def test_load_model_from_config_full_and_incomplete(tmp_path):
    """A full tiny LatentDiffusion checkpoint round-trips; one missing a weight is refused."""
    from conftest import ROOT
    from omegaconf import OmegaConf

    from ldm.checkpoint import load_model_from_config
    from ldm.util import instantiate_from_config

    cfg = OmegaConf.load(ROOT / "configs/tiny/v1-tiny.yaml").model
    ref = instantiate_from_config(cfg)
    sd = ref.state_dict()
    save_state_dict({**sd, "model_ema.decay": torch.tensor(0.9999)}, tmp_path / "full.ckpt")
    model = load_model_from_config(cfg, tmp_path / "full.ckpt", verbose=False)
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert torch.equal(model.lvlb_weights, ref.lvlb_weights)

    partial = {k: v for k, v in sd.items() if not k.endswith("attn2.to_k.weight")}
    save_state_dict(partial, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match="attn2.to_k.weight"):
        load_model_from_config(cfg, tmp_path / "partial.safetensors", verbose=False)
    # the random init is restored after the skip_init context
    lin = torch.nn.Linear(4, 4)
    assert lin.weight.abs().sum() > 0


def test_load_into_assign_shares_tensors_and_keeps_model_dtypes():
    net = _Net()
    same = {"lin.weight": torch.randn(3, 4), "lin.bias": torch.randn(3), "ids": torch.arange(5)}
    load_into(net, same, assign=True)
    # the model holds the state dict's tensors themselves: no second copy of the weights
    assert net.lin.weight.data_ptr() == same["lin.weight"].data_ptr() and isinstance(net.lin.weight, nn.Parameter)
    assert net.lin.weight.requires_grad
    half = {k: v.half() if v.is_floating_point() else v for k, v in same.items()}
    net2 = _Net()
    load_into(net2, half, assign=True)
    assert net2.lin.weight.dtype == torch.float32 and torch.equal(net2.lin.weight, half["lin.weight"].float())
