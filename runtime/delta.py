"""Delta checkpoints: only the trained tensors, with CompVis key names.

Format (``.ckpt`` or ``.safetensors``): ``{'state_dict': {key: tensor}}`` where keys are full
``LatentDiffusion`` names (``model.diffusion_model....attn2.to_k.weight``). Embedding deltas add
``embed`` (rows [K, D]) and ``embed_ids`` (their token ids [K]); a reference delta with ``embed``
but no ids is written into the *last* K rows, as the reference did.

Concept Ablation's own diffusers checkpoints load too: its ``delta.bin`` (``torch.save({'unet': {diffusers UNet
parameter name: tensor}, ['text_encoder': CLIPTextModel state dict]})``) is read by :mod:`ldm.checkpoint` with its
keys mapped to CompVis names (:func:`ldm.diffusers_format.convert_concept_ablation_delta`), so every delta path
(``sample.py --delta_ckpt``, ``evaluate.py``'s checkpoints, ``benchmark.py --delta``) takes it; the text encoder,
when present, is written whole.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from ldm.checkpoint import CheckpointError, load_state_dict, save_state_dict

TOKEN_EMBEDDING = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"


def delta_state_dict(trainable: Mapping[str, torch.Tensor], embedding_ids: torch.Tensor | None = None) -> dict:
    """What a delta file stores for these trained parameters (CPU copies)."""
    sd = {}
    for name, p in trainable.items():
        if name == TOKEN_EMBEDDING:
            ids = embedding_ids.detach().cpu().long()
            sd["embed_ids"] = ids
            sd["embed"] = p.detach()[ids.to(p.device)].float().cpu().clone()
        else:
            sd[name] = p.detach().cpu().clone()
    return sd


def save_delta(path: str | Path, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None):
    """Atomic write of a delta (``.ckpt`` -> ``{'state_dict': sd}``, or ``.safetensors``); a failed write (disk
    full) leaves no temporary file and raises ``runtime.files.WriteError``, one line naming the folder."""
    try:
        save_state_dict(state_dict, path, metadata=metadata)
    except OSError as e:
        from runtime.files import write_error

        raise write_error(e, Path(path), "the delta") from None


def delta_misfits(own: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> list[str]:
    """Why ``delta`` cannot be written into a model with state dict ``own`` (empty if it fits)."""
    problems = [f"{k}: not in the model" for k in delta if k not in own and k not in ("embed", "embed_ids")]
    problems += [f"{k}: delta {list(v.shape)} vs model {list(own[k].shape)}"
                 for k, v in delta.items() if k in own and v.shape != own[k].shape]
    embed, embed_ids, weight = delta.get("embed"), delta.get("embed_ids"), own.get(TOKEN_EMBEDDING)
    if embed is not None:
        if weight is None or embed.numel() % weight.shape[1] or embed.numel() // weight.shape[1] > weight.shape[0]:
            problems.append(f"embed: {list(embed.shape)} does not fit the token embedding "
                            f"{list(weight.shape) if weight is not None else '(absent)'}")
        elif embed_ids is not None and (embed_ids.numel() != embed.numel() // weight.shape[1]
                                        or int(embed_ids.max()) >= weight.shape[0]):
            problems.append("embed_ids do not match the embed rows or exceed the vocabulary")
    return problems


def raise_delta_misfits(path, problems: list[str]) -> None:
    """Raise :class:`CheckpointError` naming the delta and up to ten of its ``problems`` (none: return)."""
    if problems:
        raise CheckpointError(f"delta {path} does not fit the base model:\n  " + "\n  ".join(problems[:10]))


def apply_delta(model: nn.Module, path: str | Path) -> list[str]:
    """Overwrite ``model``'s tensors with those of a delta; every key must exist with the same shape.

    Returns the keys written. Raises :class:`CheckpointError` (before changing anything) if the
    delta does not fit the model.
    """
    delta = dict(load_state_dict(path))
    own = model.state_dict()
    raise_delta_misfits(path, delta_misfits(own, delta))
    embed, embed_ids = delta.pop("embed", None), delta.pop("embed_ids", None)
    with torch.no_grad():
        for k, v in delta.items():
            own[k].copy_(v)
        if embed is not None:
            weight = own[TOKEN_EMBEDDING]
            embed = embed.reshape(-1, weight.shape[1])
            ids = (embed_ids.long() if embed_ids is not None
                   else torch.arange(weight.shape[0] - embed.shape[0], weight.shape[0]))
            weight[ids.to(weight.device)] = embed.to(weight)
    return list(delta) + (["embed"] if embed is not None else [])
