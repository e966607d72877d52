"""Which weights an ablation run trains, and the start-token K/V detach of training."""
from __future__ import annotations

import torch
import torch.nn as nn

PARAMETER_GROUPS = ("cross-attn", "full-weight", "attn", "embedding")
TOKEN_EMBEDDING = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"


def _unet_names(model: nn.Module, group: str) -> list[str]:
    names = []
    for name, _ in model.model.diffusion_model.named_parameters():
        full = "model.diffusion_model." + name
        if group == "full-weight":
            names.append(full)
        elif "transformer_blocks" in name:
            if group == "cross-attn" and ("attn2.to_k" in name or "attn2.to_v" in name):
                names.append(full)
            elif group == "attn" and any(f"{a}.{p}" in name
                                         for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v")):
                names.append(full)
    return names


def select_trainable(model: nn.Module, group: str,
                     embedding_ids: torch.Tensor | None = None) -> dict[str, nn.Parameter]:
    """Freeze everything, then unfreeze ``group``; returns ``{CompVis key: parameter}`` of what trains.

    - ``cross-attn``: ``attn2.to_k`` / ``attn2.to_v`` of every transformer block (the paper's default).
    - ``attn``: ``to_q/to_k/to_v`` of self- and cross-attention (the reference's ``freeze_model: crossattn``).
    - ``full-weight``: the whole UNet.
    - ``embedding``: the CLIP token-embedding rows ``embedding_ids`` (the target's tokens); a gradient
      hook zeroes every other row, and the optimizer must not apply weight decay to it (see
      :func:`optimizer_groups`), so other rows stay bit-identical.
    """
    if group not in PARAMETER_GROUPS:
        raise ValueError(f"unknown parameter group {group!r}; choose from {', '.join(PARAMETER_GROUPS)}")
    for p in model.parameters():
        p.requires_grad_(False)
    params = dict(model.named_parameters())
    if group == "embedding":
        if embedding_ids is None or embedding_ids.numel() == 0:
            raise ValueError("the embedding group needs the token ids to train (the target concept's tokens)")
        weight = params[TOKEN_EMBEDDING]
        keep = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
        keep[embedding_ids.to(weight.device)] = 1
        weight.requires_grad_(True)
        weight.register_hook(lambda g: g * keep.to(g.device, g.dtype))
        chosen = {TOKEN_EMBEDDING: weight}
    else:
        chosen = {n: params[n] for n in _unet_names(model, group)}
    for p in chosen.values():
        p.requires_grad_(True)
    return chosen


def optimizer_groups(trainable: dict[str, nn.Parameter], weight_decay: float = 0.01) -> list[dict]:
    """AdamW parameter groups: the token embedding without weight decay (it would shrink all rows)."""
    emb = [p for n, p in trainable.items() if n == TOKEN_EMBEDDING]
    rest = [p for n, p in trainable.items() if n != TOKEN_EMBEDDING]
    groups = [{"params": rest, "weight_decay": weight_decay}] if rest else []
    if emb:
        groups.append({"params": emb, "weight_decay": 0.0})
    return groups


def _detach_first_token(module, inputs, output):
    # K/V rows of the start-of-text token get no gradient (reference attention patch)
    return torch.cat([output[:, :1].detach(), output[:, 1:]], dim=1)


def install_sot_detach(model: nn.Module) -> list:
    """Forward hooks on every ``attn2.to_k`` / ``attn2.to_v``; returns the handles (call ``.remove()``).

    Forward values are unchanged; only the gradient through token position 0 is cut.
    """
    handles = []
    for name, module in model.model.diffusion_model.named_modules():
        if name.endswith("attn2.to_k") or name.endswith("attn2.to_v"):
            handles.append(module.register_forward_hook(_detach_first_token))
    return handles
