"""The ablation objectives (model-based and noise-based), as small functions over ``LatentDiffusion``."""
from __future__ import annotations

import torch

LOSS_TYPES = ("model-based", "noise-based")


def masked_error(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample ``sum(M (pred - target)^2) / sum(M)``.

    The mask has one channel and the error four, so a full mask gives 4x the element-wise MSE:
    the reference's reduction, kept so that learning rates transfer.
    """
    return (mask * (pred - target) ** 2).sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3))


def ablation_loss(model, x0: torch.Tensor, c_target: torch.Tensor, c_anchor: torch.Tensor | None,
                  mask: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, loss_type: str = "model-based"):
    """Make eps(x_t, target prompt) match the anchor.

    model-based: target = stop-grad eps(x_t, anchor prompt) of the *current* network (as the
    reference; equal to the frozen model at step 0). noise-based: target = the true noise.
    Returns the batch-mean loss.
    """
    x_t = model.q_sample(x0, t, noise)
    pred = model.apply_model(x_t, t, c_target)
    if loss_type == "model-based":
        with torch.no_grad():
            target = model.apply_model(x_t, t, c_anchor)
    elif loss_type == "noise-based":
        target = noise
    else:
        raise ValueError(f"unknown loss type {loss_type!r}; choose from {', '.join(LOSS_TYPES)}")
    return masked_error(pred, target, mask).mean()


def anchor_noise_loss(model, x0: torch.Tensor, c_anchor: torch.Tensor, mask: torch.Tensor, t: torch.Tensor,
                      noise: torch.Tensor) -> torch.Tensor:
    """The regularization term: the standard denoising loss with the anchor prompt."""
    x_t = model.q_sample(x0, t, noise)
    return masked_error(model.apply_model(x_t, t, c_anchor), noise, mask).mean()


def preservation_loss(model, x0: torch.Tensor, c_keep: torch.Tensor, mask: torch.Tensor, t: torch.Tensor,
                      noise: torch.Tensor, base_weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """Keep eps(x_t, prompt to preserve) equal to the base model's (not part of the paper; see train.py).

    ``base_weights``: the trained parameters' values before training, keyed relative to
    ``model.model`` (``diffusion_model.…``); the base prediction runs the same network with them
    swapped in, so only the trained parameters are held twice.
    """
    x_t = model.q_sample(x0, t, noise)
    pred = model.apply_model(x_t, t, c_keep)
    with torch.no_grad():
        target = torch.func.functional_call(model.model, base_weights, (x_t, t), {"c_crossattn": [c_keep]},
                                            strict=False)
    return masked_error(pred, target, mask).mean()
