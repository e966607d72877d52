"""evaluation/models.py: the models benchmark.py compares, named on the command line (NAME=PATH), vetted from file
headers before any generation, and loaded: the base, base + delta, a full CompVis checkpoint, a diffusers pipeline
folder, and a bare UNet state dict (UCE / ESD / ConceptPrune ``torch.save(unet.state_dict())`` with diffusers keys,
FMN's / diffusers' ``diffusion_pytorch_model.safetensors``, or CompVis keys) on the base."""
from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG, tiny_model
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from evaluation import models as M
from evaluation.models import ModelSpec, ModelSpecError
from ldm.checkpoint import save_state_dict
from ldm.diffusers_format import UNET_PREFIX, convert_unet
from runtime.delta import save_delta

ROOT = Path(__file__).resolve().parents[2]
HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None


def _config() -> dict:
    return OmegaConf.to_container(OmegaConf.load(TINY_CONFIG).model, resolve=True)


def _unet(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}


def _rest(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith(UNET_PREFIX)}


def _assert_same(got: dict, want: dict):
    assert set(got) == set(want), (sorted(set(want) - set(got))[:3], sorted(set(got) - set(want))[:3])
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 871]), torch.randn(2, 77, 32, generator=g)


def _eps(model):
    with torch.no_grad():
        return model.apply_model(*_inputs())


@pytest.fixture(scope="module")
def cfg():
    return _config()


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """The base (seed 0), an 'original' model that differs everywhere (seed 3), and files made from them."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("bench_models")
    base, orig = tiny_model(seed=0).eval(), tiny_model(seed=3).eval()
    bsd, osd = base.state_dict(), orig.state_dict()
    save_state_dict(bsd, d / "base.ckpt")
    save_state_dict(osd, d / "orig.safetensors")  # a full CompVis checkpoint
    keys = [k for k in bsd if ".attn2.to_k." in k][:2]
    delta = {k: bsd[k] + 0.2 * torch.randn_like(bsd[k]) for k in keys}
    save_delta(d / "delta.ckpt", delta)
    unet = _unet(osd)
    save_file(unet, d / "compvis_unet.safetensors")  # CompVis keys, prefixed
    torch.save({k[len(UNET_PREFIX):]: v for k, v in unet.items()}, d / "bare_unet.pt")  # ... without the prefix
    return {"dir": d, "base": d / "base.ckpt", "orig": d / "orig.safetensors", "delta": d / "delta.ckpt",
            "delta_sd": delta, "base_model": base, "orig_model": orig, "base_sd": bsd, "orig_sd": osd}


@pytest.fixture(scope="module")
def exported(src, cfg):
    """The original model exported by tools/export.py to a diffusers folder; its UNet file, a copy of it outside
    the folder, and the same tensors torch.save'd as a .pt (UCE / ESD style) and in fp16 (ConceptPrune style)."""
    pytest.importorskip("diffusers")
    from runtime import export

    d = src["dir"]
    pipe = export.build_pipeline(src["orig_model"], cfg)
    export.save_pipeline(pipe, d / "pipe")
    unet_file = d / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"
    shutil.copy(unet_file, d / "fmn_unet.safetensors")
    torch.save(pipe.unet.state_dict(), d / "uce_unet.pt")  # as UCE / ESD save theirs
    torch.save(pipe.unet.to(torch.float16).state_dict(), d / "prune_unet_fp16.pt")  # as ConceptPrune does
    return {"pipe": d / "pipe", "unet_file": unet_file, "unet": convert_unet(load_file(unet_file))}


# ----------------------------------------------------------------------------- parsing
def test_parse_models_names_order_and_errors(src, tmp_path):
    base, delta, orig = str(src["base"]), str(src["delta"]), str(src["orig"])
    odd = tmp_path / "lr=1e-5" / "run.ckpt"  # a path that itself holds '='
    odd.parent.mkdir()
    shutil.copy(delta, odd)
    specs = M.parse_models(base, deltas=[delta, str(odd)], compvis=[f"full+fp32={orig}"],
                           unets=[f"u.1={src['dir'] / 'bare_unet.pt'}"])
    assert specs == [ModelSpec("base", "base", None), ModelSpec("delta", "delta", delta),
                     ModelSpec("run", "delta", str(odd)), ModelSpec("full+fp32", "compvis", orig),
                     ModelSpec("u.1", "unet", str(src["dir"] / "bare_unet.pt"))]
    assert M.parse_models(base) == [ModelSpec("base", "base", None)]

    def refused(match, **kw):
        with pytest.raises(ModelSpecError, match=match) as e:
            M.parse_models(kw.pop("base", base), **kw)
        assert "\n" not in str(e.value)
        return str(e.value)

    msg = refused("already taken", deltas=[f"a={delta}"], compvis=[f"a={orig}"])
    assert msg.startswith("--compvis") and "NAME=PATH" in msg
    refused("already taken by --base", deltas=[f"Base={delta}"])  # the base's row (names are files: any case)
    shutil.copy(src["dir"] / "bare_unet.pt", tmp_path / "delta.pt")
    refused("'delta' is already taken", deltas=[delta], unets=[str(tmp_path / "delta.pt")])  # same default name
    msg = refused("file not found", deltas=[f"x={tmp_path / 'nope.ckpt'}"])
    assert "--delta x=" in msg and "nope.ckpt" in msg
    refused("not usable", deltas=[f"my model={delta}"])
    refused("not usable", deltas=[f"..={delta}"])
    refused("empty name", deltas=[f"={delta}"])
    refused("no path after '='", deltas=["name="])
    refused("base checkpoint not found", base=str(tmp_path / "nope.ckpt"))
    refused("not a diffusers pipeline folder", diffusers=[f"d={tmp_path}"])
    refused("a folder, not a checkpoint file", compvis=[f"c={tmp_path}"])
    with pytest.raises(ModelSpecError, match="unknown kind"):
        ModelSpec("x", "lora", "x.pt")
    with pytest.raises(ModelSpecError, match="letters, digits"):
        ModelSpec("a/b", "unet", "x.pt")
    with pytest.raises(ModelSpecError, match="needs a path"):
        ModelSpec("x", "unet", None)


# ----------------------------------------------------------------------------- the round trip
@pytest.mark.parametrize("which", ["pipeline_unet_file", "outside_copy", "uce_pt", "prune_fp16_pt"])
def test_unet_from_an_exported_pipeline_replaces_the_base_unet(which, src, exported, cfg):
    d = src["dir"]
    path = {"pipeline_unet_file": exported["unet_file"], "outside_copy": d / "fmn_unet.safetensors",
            "uce_pt": d / "uce_unet.pt", "prune_fp16_pt": d / "prune_unet_fp16.pt"}[which]
    spec = M.parse_models(str(src["base"]), unets=[f"{which}={path}"])[1]
    M.check_models([spec], cfg, str(src["base"]))
    model = M.load_model(spec, cfg, str(src["base"]))
    assert not model.training
    got = model.state_dict()
    want = exported["unet"]
    if which == "prune_fp16_pt":  # stored in fp16, loaded into the fp32 model
        want = {k: v.half().float() for k, v in want.items()}
    _assert_same(_unet(got), want)  # exactly the file's UNet
    _assert_same(_rest(got), _rest(src["base_sd"]))  # VAE, text encoder, schedule: the base's, not the pipeline's
    assert not torch.equal(_rest(got)["first_stage_model.encoder.conv_in.weight"],
                           src["orig_sd"]["first_stage_model.encoder.conv_in.weight"])
    eps, want_eps, base_eps = _eps(model), _eps(src["orig_model"]), _eps(src["base_model"])
    assert not torch.allclose(want_eps, base_eps, atol=1e-3)  # the base's UNet really differs
    if which == "prune_fp16_pt":
        torch.testing.assert_close(eps, want_eps, rtol=0, atol=5e-3)
    else:
        _assert_same(_unet(src["orig_sd"]), want)  # the export round trip is exact
        assert torch.equal(eps, want_eps)


@pytest.mark.parametrize("name", ["compvis_unet.safetensors", "bare_unet.pt"])
def test_unet_with_compvis_keys(name, src, cfg):
    spec = ModelSpec("u", "unet", str(src["dir"] / name))
    M.check_models([spec], cfg, str(src["base"]))
    got = M.load_model(spec, cfg, str(src["base"])).state_dict()
    _assert_same(_unet(got), _unet(src["orig_sd"]))
    _assert_same(_rest(got), _rest(src["base_sd"]))


def test_base_delta_and_compvis_kinds(src, cfg):
    base = str(src["base"])
    specs = M.parse_models(base, deltas=[str(src["delta"])], compvis=[str(src["orig"])])
    M.check_models(specs, cfg, base)
    loaded = [M.load_model(s, cfg, base) for s in specs]
    assert not any(m.training for m in loaded)
    b, dl, full = (m.state_dict() for m in loaded)
    _assert_same(b, src["base_sd"])
    _assert_same(full, src["orig_sd"])
    changed = src["delta_sd"]
    _assert_same({k: v for k, v in dl.items() if k not in changed}, {k: v for k, v in b.items() if k not in changed})
    for k, v in changed.items():
        assert torch.equal(dl[k], v) and not torch.equal(dl[k], b[k]), k
    # the factory the runner hands to generation workers: picklable, builds the same model
    factory = pickle.loads(pickle.dumps(M.model_factory(specs[1], cfg, base)))
    _assert_same(factory("cpu").state_dict(), dl)


def test_diffusers_kind(src, exported, cfg):
    spec = M.parse_models(str(src["base"]), diffusers=[str(exported["pipe"])])[1]
    assert spec == ModelSpec("pipe", "diffusers", str(exported["pipe"]))
    M.check_models([spec], cfg, str(src["base"]))
    _assert_same(M.load_model(spec, cfg, str(src["base"])).state_dict(), src["orig_sd"])
    # a diffusers-keyed UNet file with a key SD v1 has no place for: named, with the layout it came closest to
    tensors = load_file(exported["unet_file"])
    save_file({**tensors, "add_embedding.linear_1.weight": torch.zeros(4, 4)}, src["dir"] / "sdxl_like.safetensors")
    with pytest.raises(ModelSpecError, match=r"Closest, diffusers UNet keys .*1 unexpected, e\.g\. "
                                             r"'add_embedding\.linear_1\.weight'"):
        M.check_models([ModelSpec("x", "unet", str(src["dir"] / "sdxl_like.safetensors"))], cfg, str(src["base"]))
    # a diffusers-keyed UNet file given as a full CompVis checkpoint is refused with the right flag to use
    with pytest.raises(ModelSpecError, match="--unet"):
        M.check_models([ModelSpec("c", "compvis", str(exported["unet_file"]))], cfg, str(src["base"]))


# ----------------------------------------------------------------------------- vetting
def test_check_models_names_the_file_and_offending_keys(src, cfg, tmp_path):
    unet = {k[len(UNET_PREFIX):]: v for k, v in _unet(src["orig_sd"]).items()}
    save_file({"foo.weight": torch.zeros(3), "bar.bias": torch.zeros(2)}, tmp_path / "junk.safetensors")
    save_file({k: v for k, v in unet.items() if ".attn2." in k}, tmp_path / "partial.safetensors")
    torch.save({**unet, "input_blocks.0.0.bias": torch.zeros(7)}, tmp_path / "wrong_shape.pt")
    torch.save({**unet, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    torch.save({"model.diffusion_model.nope": torch.zeros(1)}, tmp_path / "delta_bad.ckpt")
    good = ModelSpec("good", "unet", str(src["dir"] / "bare_unet.pt"))
    specs = [ModelSpec("base", "base", None), good,
             *(ModelSpec(p.split(".")[0], "unet", str(tmp_path / p))
               for p in ("junk.safetensors", "partial.safetensors", "wrong_shape.pt", "extra.pt")),
             ModelSpec("full", "unet", str(src["orig"])),  # a full checkpoint is not a bare UNet
             ModelSpec("unet_only", "compvis", str(src["dir"] / "bare_unet.pt")),  # ... nor the other way round
             ModelSpec("bad_delta", "delta", str(tmp_path / "delta_bad.ckpt"))]
    with pytest.raises(ModelSpecError) as e:
        M.check_models(specs, cfg, str(src["base"]))
    lines = str(e.value).splitlines()
    assert len(lines) == 7, lines  # one line per bad model, all of them; the base and the good UNet pass
    junk, partial, wrong, extra, full, unet_only, bad_delta = lines
    for line, name in zip(lines, ("junk.safetensors", "partial.safetensors", "wrong_shape.pt", "extra.pt")):
        assert name in line and "fits no known UNet state-dict layout" in line and "Tried:" in line, line
        assert "diffusers UNet keys" in line and "CompVis keys" in line, line
    assert "'foo.weight'" in junk and "'bar.bias'" in junk
    assert "missing, e.g. 'time_embed.0.weight'" in partial and "only part of the UNet" in partial
    assert "1 wrong shape, e.g. 'input_blocks.0.0.bias' [7] vs model [32]" in wrong
    assert "1 unexpected, e.g. 'extra.weight'" in extra
    assert full.startswith("--unet full=") and "--compvis" in full
    assert unet_only.startswith("--compvis unet_only=") and "It holds a UNet only: pass it as --unet" in unet_only
    assert bad_delta.startswith("--delta bad_delta=") and "model.diffusion_model.nope: not in the model" in bad_delta
    # a missing file found at check time (deleted since parsing) and a broken base
    gone = tmp_path / "gone.pt"
    shutil.copy(tmp_path / "extra.pt", gone)
    spec = ModelSpec("gone", "unet", str(gone))
    gone.unlink()
    with pytest.raises(ModelSpecError, match="--unet gone=.*file not found"):
        M.check_models([spec], cfg, str(src["base"]))
    with pytest.raises(ModelSpecError, match="--base .*partial.safetensors.*does not fit"):
        M.check_models([ModelSpec("base", "base", None)], cfg, str(tmp_path / "partial.safetensors"))


def test_check_models_reads_no_weights(src, cfg, monkeypatch, request):
    """Vetting reads headers only: safetensors files are never loaded, torch files only memory-mapped (the tensor
    data is never touched), so a 4 GB model costs nothing to vet."""
    paths = {"compvis": [src["orig"]], "unet": [src["dir"] / "compvis_unet.safetensors", src["dir"] / "bare_unet.pt"],
             "delta": [src["delta"]], "diffusers": []}
    if HAS_DIFFUSERS:
        ex = request.getfixturevalue("exported")
        paths["unet"] += [ex["unet_file"], src["dir"] / "fmn_unet.safetensors", src["dir"] / "uce_unet.pt"]
        paths["diffusers"].append(ex["pipe"])
    specs = [ModelSpec("base", "base", None)] + [ModelSpec(f"{kind}{i}", kind, str(p))
                                                 for kind, ps in paths.items() for i, p in enumerate(ps)]
    import safetensors.torch

    def no_load_file(*args, **kwargs):
        raise AssertionError(f"check_models read the weights of {args[0]}")

    real_load, loads = torch.load, []

    def mmap_only(f, *args, **kwargs):
        assert kwargs.get("mmap") and kwargs.get("weights_only"), (f, kwargs)
        loads.append(Path(f).name)
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "load_file", no_load_file)
    monkeypatch.setattr(torch, "load", mmap_only)
    M.check_models(specs, cfg, str(src["base"]))
    assert {"base.ckpt", "bare_unet.pt", "delta.ckpt"} <= set(loads)  # the torch files did go through torch.load


# ----------------------------------------------------------------------------- identity
def test_model_identity_changes_when_a_file_is_replaced(src, tmp_path):
    base, delta, unet = tmp_path / "base.ckpt", tmp_path / "delta.ckpt", tmp_path / "unet.pt"
    for a, b in ((src["base"], base), (src["delta"], delta), (src["dir"] / "bare_unet.pt", unet)):
        shutil.copy(a, b)
    specs = {s.kind: s for s in M.parse_models(str(base), deltas=[str(delta)], compvis=[str(src["orig"])],
                                               unets=[str(unet)])}
    ids = {k: M.model_identity(s, str(base)) for k, s in specs.items()}
    json.dumps(ids)
    assert ids["base"]["base"] == ids["delta"]["base"] == ids["unet"]["base"]
    assert ids["base"]["base"]["path"] == str(base.resolve()) and ids["unet"]["unet"]["path"] == str(unet.resolve())
    assert "base" not in ids["compvis"] and ids["compvis"]["checkpoint"]["size"] == src["orig"].stat().st_size
    assert len({json.dumps(v, sort_keys=True) for v in ids.values()}) == 4

    # rewritten with other content: new size
    sd = torch.load(unet, weights_only=True)
    torch.save({**sd, "x": torch.zeros(10)}, unet)
    new = M.model_identity(specs["unet"], str(base))
    assert new != ids["unet"] and new["base"] == ids["unet"]["base"]
    # replaced by a file of the same size, later: new mtime
    st = delta.stat()
    os.utime(delta, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert M.model_identity(specs["delta"], str(base)) != ids["delta"]
    # a new base changes every model built on it, not the full checkpoint
    os.utime(base, ns=(base.stat().st_atime_ns, base.stat().st_mtime_ns + 10**9))
    for kind in ("base", "delta", "unet"):
        assert M.model_identity(specs[kind], str(base))["base"] != ids[kind]["base"]
    assert M.model_identity(specs["compvis"], str(base)) == ids["compvis"]


def test_diffusers_identity_covers_the_pipeline_files(src, exported, tmp_path):
    pipe = tmp_path / "pipe"
    shutil.copytree(exported["pipe"], pipe)
    spec = ModelSpec("p", "diffusers", str(pipe))
    unet_in_pipe = ModelSpec("p_unet", "diffusers", str(pipe / "unet" / "diffusion_pytorch_model.safetensors"))
    before = [M.model_identity(s, str(src["base"])) for s in (spec, unet_in_pipe)]
    names = {Path(f["name"] if "name" in f else f["path"]).name for f in before[1]["pipeline"]["files"]}
    assert {"diffusion_pytorch_model.safetensors", "model.safetensors", "scheduler_config.json"} <= names
    vae = pipe / "vae" / "diffusion_pytorch_model.safetensors"
    os.utime(vae, ns=(vae.stat().st_atime_ns, vae.stat().st_mtime_ns + 10**9))
    after = [M.model_identity(s, str(src["base"])) for s in (spec, unet_in_pipe)]
    assert after[0] != before[0] and after[1] != before[1]
    # the bare UNet kind reads only its file, not the pipeline's VAE around it
    as_unet = ModelSpec("u", "unet", str(pipe / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(M.model_identity(as_unet, str(src["base"]))) == {"kind", "base", "unet"}
