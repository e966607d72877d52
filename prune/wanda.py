"""WANDA scores, skilled-weight masks, the union over calls, the mask file and the pruned delta.

Rule, for layer weight ``W`` [out, in] and the column norms ``A_tar``/``A_base``
[in] of one (call t, layer l)::

    S_tar = |W| * A_tar[None, :]        S_base = |W| * A_base[None, :]
    k     = int(skill_ratio * in)
    M     = TopK_per_row(S_tar, k)  AND  (S_tar > S_base)

(the base top-k of the reference is computed but unused, so it is not computed here). Ties in the
top-k are broken towards the lower column index (stable descending sort). Scores are fp32.

``arithmetic="original"`` computes the same rule with the reference's arithmetic (``wanda/wanda.py``): |W| and
the norms in fp16 on the CPU (its pipeline is fp16), their fp16 product (one rounding of the exact product),
``torch.sort(S, dim=1, descending=True)`` with torch's default unstable sort for the top-k, and the fp16
comparison ``S_tar > S_base``. Rounding to fp16 makes near-equal scores equal: ties in the top-k then fall
wherever the unstable sort puts them (an implementation detail of torch's CPU sort), and ``S_tar > S_base``
fails where the two round to the same value, so fewer weights are kept. Our norms are accumulated in fp32 in
either case (the reference accumulates fp16); "original" casts them to fp16 before the product.

Union: ``U_l = OR_{t < tau} M[t][l]`` (the reference's ``select_ratio = 0``); several
concepts: the OR of their unions, each with its own tau.

Mask file (``.safetensors``, written by :func:`save_masks`)::

    mask.{t}.{l}   int32 [n]  sorted flat indices ``row * in_features + col`` of the True entries
                              of M[t][l] (a sparse index list: at most k per row, far smaller than a
                              dense or bit-packed [out, in] mask)
    header metadata ``conceptprune`` = JSON {format: "conceptprune-masks/1", n_calls, skill_ratio,
        layers: [{name, out_features, in_features}] in execution order, concept, family, tau,
        prompts_sha256, norms_key, settings...}

Every (t, l) with t < n_calls and l < len(layers) has an entry (possibly empty).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

MASK_FORMAT = "conceptprune-masks/1"
META_KEY = "conceptprune"


class MaskError(ValueError):
    """A mask file is malformed or does not fit the model/checkpoint."""


# ----------------------------------------------------------------------------- score and selection
ARITHMETICS = ("ours", "original")


def wanda_scores(weight: torch.Tensor, norm: torch.Tensor, arithmetic: str = "ours") -> torch.Tensor:
    """``|W[i, j]| * ||X_j||`` (weight [out, in], norm [in]): fp32 on the weight's device (``"ours"``), or the
    reference's fp16 product on the CPU (``"original"``)."""
    if norm.shape != weight.shape[1:]:
        raise ValueError(f"norm {list(norm.shape)} does not match the weight's in_features {weight.shape[1]}")
    if arithmetic == "original":
        return weight.detach().half().abs().cpu() * norm.detach().half().cpu()[None, :]
    if arithmetic != "ours":
        raise ValueError(f"arithmetic must be one of {ARITHMETICS}, got {arithmetic!r}")
    return weight.detach().float().abs() * norm.to(weight.device).float()[None, :]


def n_skilled(skill_ratio: float, in_features: int) -> int:
    """k = int(skill_ratio * in_features) (per output row)."""
    if not 0.0 <= skill_ratio <= 1.0:
        raise ValueError(f"skill_ratio must be in [0, 1], got {skill_ratio}")
    return int(skill_ratio * in_features)


def skilled_mask(weight: torch.Tensor, norm_target: torch.Tensor, norm_base: torch.Tensor,
                 skill_ratio: float, arithmetic: str = "ours") -> torch.Tensor:
    """Bool mask [out, in]: per output row the top-k target scores, kept where target > base (``arithmetic``: see
    the module docstring; the mask is on the CPU with ``"original"``)."""
    s_tar = wanda_scores(weight, norm_target, arithmetic)
    s_base = wanda_scores(weight, norm_base, arithmetic)
    k = n_skilled(skill_ratio, weight.shape[1])
    mask = torch.zeros_like(s_tar, dtype=torch.bool)
    if k > 0:
        # ours: ties go to the lower column on every platform; original: the reference's call, unstable
        stable = {"stable": True} if arithmetic == "ours" else {}
        idx = torch.sort(s_tar, dim=1, descending=True, **stable).indices[:, :k]
        mask.scatter_(1, idx, True)
    return mask & (s_tar > s_base)


def compute_masks(weights: Sequence[torch.Tensor], norms_base: Sequence[torch.Tensor],
                  norms_target: Sequence[torch.Tensor], skill_ratio: float,
                  arithmetic: str = "ours") -> dict[tuple[int, int], torch.Tensor]:
    """Sparse masks ``{(t, l): int32 flat indices}`` for every recorded call t and layer l (``arithmetic``: see
    :func:`skilled_mask`).

    ``norms_*[l]`` are [T, in_l] (from :meth:`prune.hooks.ActivationRecorder.norms`).
    """
    if not (len(weights) == len(norms_base) == len(norms_target)):
        raise ValueError("weights and norms cover different numbers of layers")
    n_calls = norms_target[0].shape[0]
    masks = {}
    for l, w in enumerate(weights):
        if norms_base[l].shape != norms_target[l].shape or norms_target[l].shape != (n_calls, w.shape[1]):
            raise ValueError(f"layer {l}: norms {list(norms_target[l].shape)} / {list(norms_base[l].shape)} "
                             f"do not fit weight {list(w.shape)} and {n_calls} calls")
        for t in range(n_calls):
            m = skilled_mask(w, norms_target[l][t], norms_base[l][t], skill_ratio, arithmetic)
            masks[(t, l)] = to_indices(m)
    return masks


def to_indices(mask: torch.Tensor) -> torch.Tensor:
    """Dense bool [out, in] -> sorted int32 flat indices (CPU)."""
    return mask.reshape(-1).nonzero().reshape(-1).to(torch.int32).cpu()


def to_dense(indices: torch.Tensor, shape: Sequence[int], device=None) -> torch.Tensor:
    """Sorted flat indices -> dense bool mask of ``shape``."""
    out = torch.zeros(int(shape[0]) * int(shape[1]), dtype=torch.bool, device=device)
    out[indices.to(device=out.device, dtype=torch.long)] = True
    return out.reshape(int(shape[0]), int(shape[1]))


# ----------------------------------------------------------------------------- union
def union_over_calls(masks: Mapping[tuple[int, int], torch.Tensor], shapes: Sequence[Sequence[int]],
                     tau: int, n_calls: int) -> list[torch.Tensor]:
    """Per layer the dense bool ``OR_{t < tau} M[t][l]``; ``tau`` must be in 1..n_calls."""
    if not isinstance(tau, int) or tau < 1:
        raise ValueError(f"tau must be an integer >= 1, got {tau!r}")
    if tau > n_calls:
        raise ValueError(f"tau={tau} is beyond the {n_calls} recorded UNet calls")
    out = []
    for l, shape in enumerate(shapes):
        u = torch.zeros(int(shape[0]) * int(shape[1]), dtype=torch.bool)
        for t in range(tau):
            u[masks[(t, l)].long()] = True
        out.append(u.reshape(int(shape[0]), int(shape[1])))
    return out


def union_of(unions: Iterable[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """Layer-wise OR of several concepts' unions (same layers and shapes)."""
    unions = list(unions)
    out = [u.clone() for u in unions[0]]
    for other in unions[1:]:
        if len(other) != len(out) or any(a.shape != b.shape for a, b in zip(out, other)):
            raise MaskError("the concepts' masks cover different layers or shapes")
        for a, b in zip(out, other):
            a |= b
    return out


# ----------------------------------------------------------------------------- mask file
def save_masks(path: str | Path, masks: Mapping[tuple[int, int], torch.Tensor], meta: Mapping) -> None:
    """Write the sparse masks and ``meta`` (needs ``n_calls`` and ``layers``) as safetensors."""
    from ldm.checkpoint import save_state_dict

    meta = {"format": MASK_FORMAT, **meta}
    n_calls, n_layers = int(meta["n_calls"]), len(meta["layers"])
    if set(masks) != {(t, l) for t in range(n_calls) for l in range(n_layers)}:
        raise MaskError("masks must have one entry per (call, layer)")
    tensors = {f"mask.{t}.{l}": m.to(torch.int32).contiguous() for (t, l), m in masks.items()}
    save_state_dict(tensors, path, metadata={META_KEY: json.dumps(meta)})


def load_masks(path: str | Path) -> tuple[dict[tuple[int, int], torch.Tensor], dict]:
    """(masks ``{(t, l): int32 indices}``, metadata) of a mask file; raises :class:`MaskError`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # not a safetensors file
        raise MaskError(f"{path} is not a ConceptPrune mask file: {e}") from e
    if raw is None:
        raise MaskError(f"{path} has no '{META_KEY}' metadata: not a ConceptPrune mask file")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise MaskError(f"{path}: its '{META_KEY}' metadata is damaged (not valid JSON: {e})") from None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != MASK_FORMAT:
        raise MaskError(f"{path}: unknown mask format {fmt!r} (expected {MASK_FORMAT})")
    n_calls, layers = int(meta["n_calls"]), meta["layers"]
    masks = {}
    for t in range(n_calls):
        for l, layer in enumerate(layers):
            key = f"mask.{t}.{l}"
            if key not in tensors:
                raise MaskError(f"{path}: missing {key}")
            idx = tensors[key]
            if idx.numel() and int(idx.max()) >= layer["out_features"] * layer["in_features"]:
                raise MaskError(f"{path}: {key} indexes beyond the layer's "
                                f"{layer['out_features']}x{layer['in_features']}")
            masks[(t, l)] = idx
    return masks, meta


def layer_meta(layers) -> list[dict]:
    """``[{name, out_features, in_features}]`` of :class:`prune.hooks.FF2Layer` objects."""
    return [{"name": x.name, "out_features": x.shape[0], "in_features": x.shape[1]} for x in layers]


def check_fit(meta: Mapping, shapes: Mapping[str, Sequence[int]], source: str = "the model") -> None:
    """Raise :class:`MaskError` unless every masked layer's ``{name}.weight`` exists in ``shapes``
    (key -> shape) with the recorded [out, in]."""
    problems = []
    for layer in meta["layers"]:
        key = layer["name"] + ".weight"
        want = [layer["out_features"], layer["in_features"]]
        if key not in shapes:
            problems.append(f"{key}: not in {source}")
        elif list(shapes[key]) != want:
            problems.append(f"{key}: masks {want} vs {source} {list(shapes[key])}")
    if problems:
        raise MaskError("the masks do not fit " + source + ":\n  " + "\n  ".join(problems[:10]))


# ----------------------------------------------------------------------------- pruned weights
def pruned_weights(state_dict: Mapping[str, torch.Tensor], layer_names: Sequence[str],
                   unions: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{name.weight: W with the union entries set to exactly 0}`` (CPU, the weight's dtype)."""
    out = {}
    for name, u in zip(layer_names, unions):
        w = state_dict[name + ".weight"].detach().cpu()
        out[name + ".weight"] = w.masked_fill(u, 0)
    return out


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
