"""The models a benchmark compares: named on the command line, vetted before any generation, loaded one by one.

Every model is a CompVis ``LatentDiffusion`` of the run's model config, built from one of these sources
(``KINDS``):

* ``base``: the base checkpoint itself (a CompVis ``.ckpt`` / ``.safetensors``, a diffusers pipeline folder, or
  a diffusers UNet file inside one: whatever the rest of the project accepts as a base);
* ``delta``: the base with a Concept Ablation delta written in (:func:`runtime.delta.apply_delta`);
* ``compvis``: a full CompVis checkpoint on its own (e.g. ``tools/export.py --out``, or ``conceptprune.py``'s
  pruned copy of ``sd-v1-4``);
* ``diffusers``: a diffusers ``StableDiffusionPipeline`` folder (or a UNet file inside one), read by the
  project's loader (:mod:`ldm.diffusers_format`), VAE, text encoder and schedule included;
* ``unet``: the base with its UNet (``model.diffusion_model``) replaced by a bare UNet state dict, the way UCE,
  ESD (diffusers trainer) and ConceptPrune save their models (``torch.save(unet.state_dict())`` to a ``.pt``,
  diffusers key names; ConceptPrune's in fp16), a diffusers ``diffusion_pytorch_model.safetensors`` / ``.bin``
  (FMN saves a pipeline with ``save_pretrained``), or CompVis keys (``model.diffusion_model.*``, or the same
  without that prefix), or Concept Ablation's diffusers ``delta.bin`` of a "full-weight" run (``{'unet': {...}}``).
  Every UNet tensor must be in the file: a file holding only the edited tensors (a "cross-attn" ``delta.bin``)
  is refused with a pointer to ``--delta``, which takes any Concept Ablation ``delta.bin``.

:func:`parse_models` turns the CLI strings (``NAME=PATH`` or ``PATH``) into :class:`ModelSpec` rows,
:func:`check_models` vets them all from file headers and a meta-device model (no weights read; a delta, a
few MB, is read whole to look for NaN/inf), :func:`load_model` / :func:`model_factory` build one, and
:func:`model_identity` keys caches on the files a model is read from.
"""
from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch

from ldm.diffusers_format import UNET_PREFIX

__all__ = ["KINDS", "FLAGS", "ModelSpec", "ModelSpecError", "parse_models", "check_models", "load_model",
           "model_factory", "model_identity"]

KINDS = ("base", "delta", "compvis", "diffusers", "unet")
# the command-line flag of each kind, as error messages name it
FLAGS = {"base": "--base", "delta": "--delta", "compvis": "--compvis", "diffusers": "--diffusers", "unet": "--unet"}
_NAME_RE = re.compile(r"[A-Za-z0-9._+-]+")
_MAX_NAME = 100
_SHOW = 3  # example keys per kind of problem in a message


class ModelSpecError(ValueError):
    """A model of the comparison that cannot be used: which flag, which file, what is wrong."""


@dataclass(frozen=True)
class ModelSpec:
    """One model of a comparison. ``name`` labels its table rows and files; ``path`` is None for ``base``."""
    name: str
    kind: str
    path: str | None

    def __post_init__(self):
        if not isinstance(self.name, str) or not _usable_name(self.name):
            raise ModelSpecError(f"model name {self.name!r}: letters, digits and . _ + - only (at most {_MAX_NAME}, "
                                 f"not only dots)")
        if self.kind not in KINDS:
            raise ModelSpecError(f"model {self.name!r}: unknown kind {self.kind!r} (one of {', '.join(KINDS)})")
        if (self.path is None) != (self.kind == "base"):
            raise ModelSpecError(f"model {self.name!r}: kind {self.kind!r} "
                                 + ("takes no path (it is the base checkpoint)" if self.kind == "base"
                                    else "needs a path"))

    @property
    def label(self) -> str:
        """``--flag NAME=PATH``, for messages."""
        return f"{FLAGS[self.kind]} {self.name}" + (f"={self.path}" if self.path is not None else "")


# ------------------------------------------------------------------------------------------ parsing
def _usable_name(name: str) -> bool:
    return bool(_NAME_RE.fullmatch(name)) and set(name) != {"."} and len(name) <= _MAX_NAME


def _check_name(name: str, flag: str, text: str) -> None:
    if not _usable_name(name):
        raise ModelSpecError(f"{flag} {text!r}: the name {name!r} is not usable; a name labels table rows and "
                             f"file names: letters, digits and . _ + - only (at most {_MAX_NAME}, not only dots); "
                             f"write NAME=PATH")


def _split(text: str, flag: str) -> tuple[str, str]:
    """(name, path) of ``NAME=PATH`` or ``PATH``; a path that itself holds '=' is taken whole when it exists."""
    text = str(text)
    name = None
    path = text
    if "=" in text:
        head, tail = text.split("=", 1)
        if not (Path(text).exists() and not Path(tail).exists()):
            name, path = head, tail
            if not name:
                raise ModelSpecError(f"{flag} {text!r}: empty name before '=' (write NAME=PATH, or just PATH)")
    if not path:
        raise ModelSpecError(f"{flag} {text!r}: no path" + (" after '='" if name is not None else ""))
    if name is None:
        p = Path(path)
        name = p.stem if p.is_file() else p.name or p.resolve().name
        if not _NAME_RE.fullmatch(name or ""):
            raise ModelSpecError(f"{flag} {text!r}: the file name {name!r} does not make a usable model name "
                                 f"(letters, digits and . _ + - only); write NAME=PATH")
    _check_name(name, flag, text)
    return name, path


def _check_exists(spec: ModelSpec) -> None:
    from ldm.checkpoint import path_problem
    from ldm.diffusers_format import is_pipeline_dir, pipeline_of_unet_file

    p = Path(spec.path)
    if spec.kind == "diffusers":
        if p.is_file() and pipeline_of_unet_file(p) is None:
            raise ModelSpecError(f"{spec.label}: a file outside a diffusers pipeline folder; pass the pipeline "
                                 f"folder, or a bare UNet file as {FLAGS['unet']}")
        problem = path_problem(p, pipelines=True)
        if problem is not None:
            raise ModelSpecError(f"{spec.label}: {problem}")
        return
    if p.is_dir():
        hint = (f"; a diffusers pipeline folder goes to {FLAGS['diffusers']}" if is_pipeline_dir(p) else
                "; pass the weights file in it" if spec.kind == "unet" else "")
        raise ModelSpecError(f"{spec.label}: a folder, not a checkpoint file{hint}")
    problem = path_problem(p)  # missing, or a device, a pipe, ... (which it is, not "not found")
    if problem is not None:
        raise ModelSpecError(f"{spec.label}: " + ("file not found" if problem == "not found" else problem))


def _check_base_exists(base: str | None) -> None:
    from ldm.checkpoint import path_problem

    problem = path_problem(base or None, pipelines=True)
    if problem is not None:
        raise ModelSpecError(f"{FLAGS['base']} {base}: " + (
            "base checkpoint not found (a checkpoint file or a diffusers pipeline folder)"
            if problem.startswith("not") else f"the base checkpoint {problem}"))


def parse_models(base: str, deltas: Iterable[str] = (), compvis: Iterable[str] = (),
                 diffusers: Iterable[str] = (), unets: Iterable[str] = ()) -> list[ModelSpec]:
    """``[ModelSpec("base", "base", None)]`` followed by the models of each flag, in the order given.

    ``base`` is the base checkpoint path (checked to exist here; passed separately to the functions below).
    The others are CLI strings ``NAME=PATH`` or ``PATH`` (name: the file's stem, or the folder's name).
    Raises :class:`ModelSpecError` on a bad or duplicate name, or a missing file.
    """
    _check_base_exists(base)
    specs = [ModelSpec("base", "base", None)]
    seen = {"base": f"{FLAGS['base']} (the base model is named 'base')"}  # by lower case: files on any disk
    for kind, items in (("delta", deltas), ("compvis", compvis), ("diffusers", diffusers), ("unet", unets)):
        flag = FLAGS[kind]
        if isinstance(items, (str, Path)):
            items = [items]
        for text in items or ():
            name, path = _split(text, flag)
            if name.lower() in seen:
                raise ModelSpecError(f"{flag} {text!r}: the name {name!r} is already taken by {seen[name.lower()]}; "
                                     f"give each model its own name with NAME=PATH")
            spec = ModelSpec(name, kind, path)
            _check_exists(spec)
            seen[name.lower()] = f"{flag} {text!r}"
            specs.append(spec)
    return specs


# ------------------------------------------------------------------------------------------ fitting
def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return " ".join(lines[:1] + ["; ".join(lines[1:])]).strip() if lines else ""


def _examples(keys: list[str]) -> str:
    more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(map(repr, keys[:_SHOW])) + more


def _problems(missing, unexpected, mismatched) -> str:
    """'3 missing, e.g. ...; 1 wrong shape, e.g. ...' (keys, keys, (key, file shape, model shape) triples)."""
    missing, unexpected, mismatched = list(missing), list(unexpected), list(mismatched)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing, e.g. {_examples(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {_examples(unexpected)}")
    if mismatched:
        shown = ", ".join(f"{k!r} {list(a)} vs model {list(b)}" for k, a, b in mismatched[:_SHOW])
        more = f" (+{len(mismatched) - _SHOW} more)" if len(mismatched) > _SHOW else ""
        parts.append(f"{len(mismatched)} wrong shape, e.g. {shown}{more}")
    return "; ".join(parts)


@dataclass
class _UnetFit:
    layout: str
    tensors: dict | None = None  # CompVis-keyed (model.diffusion_model. prefix), only when the layout applies
    reason: str | None = None  # why the layout does not apply at all
    missing: tuple = ()
    unexpected: tuple = ()
    mismatched: tuple = ()
    matched: int = 0  # tensors that land on a model key with its shape

    @property
    def ok(self) -> bool:
        return self.reason is None and not (self.missing or self.unexpected or self.mismatched)


_UNET_ROOTS = ("time_embed.", "input_blocks.", "middle_block.", "output_blocks.", "out.", "label_emb.")
_LAYOUTS = ("diffusers UNet keys (conv_in.*, down_blocks.*)", f"CompVis keys ({UNET_PREFIX}*)",
            "CompVis UNet keys without the prefix (input_blocks.*, middle_block.*, ...)")


def _layout_candidates(raw: Mapping[str, torch.Tensor]) -> list[tuple[str, dict | None, dict, list[str], str | None]]:
    """Per known layout: (name, CompVis-keyed tensors, {CompVis key: file key}, file keys it leaves unplaced,
    reason it does not apply at all)."""
    from ldm.diffusers_format import DiffusersFormatError, unet_key_map

    out = []
    try:
        key_map = unet_key_map(raw, strict=False)
        names = {UNET_PREFIX + ours: k for k, ours in key_map.items()}
        out.append((_LAYOUTS[0], {c: raw[k] for c, k in names.items()}, names,
                    [k for k in raw if k not in key_map], None))
    except DiffusersFormatError as e:
        out.append((_LAYOUTS[0], None, {}, [], str(e)))
    prefixed = [k for k in raw if k.startswith(UNET_PREFIX)]
    out.append((_LAYOUTS[1], {k: raw[k] for k in prefixed}, {k: k for k in prefixed},
                [k for k in raw if not k.startswith(UNET_PREFIX)], None) if prefixed else
               (_LAYOUTS[1], None, {}, [], f"no {UNET_PREFIX}* keys"))
    bare = [k for k in raw if k.startswith(_UNET_ROOTS)]
    out.append((_LAYOUTS[2], {UNET_PREFIX + k: raw[k] for k in bare}, {UNET_PREFIX + k: k for k in bare},
                [k for k in raw if not k.startswith(_UNET_ROOTS)], None) if bare else
               (_LAYOUTS[2], None, {}, [], "no input_blocks.* / middle_block.* / output_blocks.* keys"))
    return out


def _fit_unet(raw: Mapping[str, torch.Tensor], want: Mapping[str, torch.Size]) -> list[_UnetFit]:
    """How ``raw`` (a UNet file's tensors, real or meta) fits the UNet keys/shapes ``want``, per layout. Problems
    name the file's own keys; missing keys are named as the model has them (without the prefix, except for
    the prefixed layout)."""
    fits = []
    for layout, tensors, names, unplaced, reason in _layout_candidates(raw):
        if tensors is None:
            fits.append(_UnetFit(layout, reason=reason))
            continue
        strip = 0 if layout == _LAYOUTS[1] else len(UNET_PREFIX)
        missing = [k[strip:] for k in want if k not in tensors]
        unexpected = list(unplaced) + [names[k] for k in tensors if k not in want]
        mismatched = [(names[k], tuple(v.shape), tuple(want[k])) for k, v in tensors.items()
                      if k in want and tuple(v.shape) != tuple(want[k])]
        matched = sum(k in want and tuple(v.shape) == tuple(want[k]) for k, v in tensors.items())
        fits.append(_UnetFit(layout, tensors, None, tuple(missing), tuple(unexpected), tuple(mismatched), matched))
    return fits


def _unet_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items() if k.startswith(UNET_PREFIX)}


def _resolve_unet(raw: Mapping[str, torch.Tensor], want: Mapping[str, torch.Size], spec: ModelSpec) -> dict:
    """The CompVis-keyed UNet tensors of a ``unet`` file, by the one layout that fits; else ModelSpecError."""
    fits = _fit_unet(raw, want)
    for fit in fits:
        if fit.ok:
            return fit.tensors
    tried = "; ".join(f"[{f.layout}: {f.reason}]" if f.reason else
                      f"[{f.layout}: {len(f.missing)} missing, {len(f.unexpected)} unexpected, "
                      f"{len(f.mismatched)} wrong shape]" for f in fits)
    best = max((f for f in fits if f.reason is None), key=lambda f: f.matched, default=None)
    if best is not None:
        detail = f" Closest, {best.layout}: {_problems(best.missing, best.unexpected, best.mismatched)}."
    else:
        detail = f" None of its keys has a place in the UNet, e.g. {_examples(list(raw))}."
    hint = ""
    if any(k.startswith(("first_stage_model.", "cond_stage_model.")) for k in raw):
        hint = (f" It holds VAE / text-encoder tensors too: a full CompVis checkpoint goes to {FLAGS['compvis']}, "
                f"a delta with a text encoder (e.g. Concept Ablation's delta.bin) to {FLAGS['delta']}.")
    elif best is not None and best.missing and not best.unexpected and not best.mismatched:
        hint = (f" The file holds only part of the UNet (e.g. only the edited cross-attention tensors): pass it as "
                f"{FLAGS['delta']} (a delta on the base, as Concept Ablation's delta.bin), or save the full UNet.")
    raise ModelSpecError(f"{spec.label}: fits no known UNet state-dict layout of the model. Tried: {tried}."
                         f"{detail}{hint}")


def _raw_shapes(path) -> dict[str, torch.Tensor]:
    """One file's own tensors as meta tensors (header / pickle only), no diffusers conversion."""
    from ldm.checkpoint import file_shapes

    return file_shapes(path)


def _raw_tensors(path) -> dict[str, torch.Tensor]:
    """One file's own tensors (memory-mapped where torch can), no diffusers conversion."""
    from ldm.checkpoint import file_state_dict

    return file_state_dict(path)


def _meta_fit(model: torch.nn.Module, shapes: Mapping[str, torch.Tensor]):
    from ldm.checkpoint import load_into

    with warnings.catch_warnings():  # pre-hooks may fill buffers with real tensors: a no-op on meta
        warnings.simplefilter("ignore", UserWarning)
        return load_into(model, shapes)  # meta into meta: key names and shapes only


def _check_compvis(spec: ModelSpec, model: torch.nn.Module) -> None:
    from ldm.diffusers_format import looks_like_diffusers_unet

    raw = _raw_shapes(spec.path)
    if looks_like_diffusers_unet(raw):
        raise ModelSpecError(f"{spec.label}: holds a UNet with diffusers keys, not a full CompVis checkpoint; pass "
                             f"it as {FLAGS['unet']} (or its pipeline folder as {FLAGS['diffusers']})")
    report = _meta_fit(model, raw)
    if report.missing or report.mismatched:
        unet_only = bool(raw) and all(k.startswith((UNET_PREFIX,) + _UNET_ROOTS) for k in raw)
        hint = f" It holds a UNet only: pass it as {FLAGS['unet']}." if unet_only else ""
        raise ModelSpecError(f"{spec.label}: does not fit the model config: "
                             f"{_problems(report.missing, [], report.mismatched)}.{hint}")


def _check_one(spec: ModelSpec, model: torch.nn.Module, model_config: Mapping, base: str) -> None:
    from runtime.loading import check_base, check_delta

    if spec.kind == "base":
        check_base(model_config, base, model)
    elif spec.kind == "delta":
        check_delta(model_config, spec.path, model)
    elif spec.kind == "compvis":
        _check_compvis(spec, model)
    elif spec.kind == "diffusers":
        check_base(model_config, spec.path, model)
    else:
        _resolve_unet(_raw_shapes(spec.path), _unet_shapes(model), spec)


def check_models(specs: Iterable[ModelSpec], model_config: Mapping, base: str) -> None:
    """Vet every model before any generation, from file headers and a meta-device model (no weights read, but
    a delta's few tensors, checked for NaN/inf). Raises one :class:`ModelSpecError` listing every model that
    cannot be loaded, one line each."""
    from ldm.checkpoint import CheckpointError
    from ldm.diffusers_format import DiffusersFormatError
    from runtime.loading import meta_model

    specs = list(specs)
    if any(s.kind in ("base", "delta", "unet") for s in specs):
        _check_base_exists(base)
    model = meta_model(model_config)
    errors = []
    for spec in specs:
        label = f"{FLAGS['base']} {base}" if spec.kind == "base" else spec.label
        try:
            if spec.kind != "base":
                _check_exists(spec)
            _check_one(spec, model, model_config, base)
        except ModelSpecError as e:
            errors.append(_one_line(e))
        except (CheckpointError, DiffusersFormatError, OSError) as e:
            errors.append(f"{label}: {_one_line(e)}")
    if errors:
        raise ModelSpecError("\n".join(errors))


# ------------------------------------------------------------------------------------------ loading
def _load_unet_model(spec: ModelSpec, model_config: Mapping, base: str) -> torch.nn.Module:
    from ldm.checkpoint import CheckpointError, load_into, load_state_dict, skip_init
    from ldm.util import instantiate_from_config

    # the base without its UNet (dropped before the new UNet is read: never two UNets in memory)
    state = {k: v for k, v in load_state_dict(base).items() if not k.startswith(UNET_PREFIX)}
    raw = _raw_tensors(spec.path)
    with skip_init():
        model = instantiate_from_config(model_config)
    state.update(_resolve_unet(raw, _unet_shapes(model), spec))
    del raw
    report = load_into(model, state, strict=False, assign=True)
    if report.missing or report.mismatched:
        raise CheckpointError(f"{spec.label} on base {base} does not fit the model config:\n{report}")
    return model.eval()


def load_model(spec: ModelSpec, model_config: Mapping, base: str, device: str | torch.device = "cpu"
               ) -> torch.nn.Module:
    """The ``LatentDiffusion`` of ``spec`` in eval mode on ``device`` (``base``: the base checkpoint path).

    Weights are loaded by assignment (memory-mapped where the format allows), so one copy is held."""
    from ldm.checkpoint import load_model_from_config
    from runtime import loading

    if spec.kind == "base":
        model = load_model_from_config(model_config, base, device="cpu", verbose=False)
    elif spec.kind == "delta":
        model = loading.load_model(model_config, base, spec.path, device="cpu")
    elif spec.kind in ("compvis", "diffusers"):
        model = load_model_from_config(model_config, spec.path, device="cpu", verbose=False)
    else:
        model = _load_unet_model(spec, model_config, base)
    return model.eval().to(device)


def model_factory(spec: ModelSpec, model_config: Mapping, base: str):
    """A picklable ``factory(device) -> model`` for generation workers."""
    return functools.partial(load_model, spec, model_config, base)


# ------------------------------------------------------------------------------------------ identity
def _file_entry(path) -> dict:
    p = Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _source(path) -> dict:
    """Identity of a source as the project's loader reads it: a file, a pipeline folder's files, or a diffusers
    UNet file with the rest of its pipeline folder."""
    from ldm.diffusers_format import pipeline_of_unet_file, source_identity, weight_files

    p = Path(path)
    if p.is_file() and pipeline_of_unet_file(p) is not None:
        return {"path": str(p.resolve()), "files": [_file_entry(f) for f in weight_files(p)]}
    return source_identity(p)


def model_identity(spec: ModelSpec, base: str) -> dict:
    """JSON-able identity of the model for cache keys: its kind and the path, size and mtime_ns of every file it
    is read from (the base's too where it is built on the base). The model config is not part of it."""
    if spec.kind == "base":
        return {"kind": "base", "base": _source(base)}
    if spec.kind == "delta":
        return {"kind": "delta", "base": _source(base), "delta": _file_entry(spec.path)}
    if spec.kind == "compvis":
        return {"kind": "compvis", "checkpoint": _file_entry(spec.path)}
    if spec.kind == "diffusers":
        return {"kind": "diffusers", "pipeline": _source(spec.path)}
    return {"kind": "unet", "base": _source(base), "unet": _file_entry(spec.path)}
