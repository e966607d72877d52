"""Hooks on the second FFN linear (``ff.net.2``) of every transformer block.

Layer index ``l`` is the position of the block in the UNet's *forward execution order*, found by
one hooked dry forward (:func:`ff2_layers`), never by sorting module names (CompVis names sort
``output_blocks.10`` before ``output_blocks.3``). Call index ``t`` counts UNet forward calls within
one generation: PLMS with S steps makes S + 1 calls (its first step calls the model twice), so the
reference 50 steps give t = 0..50, t = 0 being the noisiest call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.attention import FeedForward


@dataclass(frozen=True)
class FF2Layer:
    """One hooked layer: ``name`` is relative to the model passed to :func:`ff2_layers` (for a
    ``LatentDiffusion`` the CompVis key prefix, e.g. ``model.diffusion_model.input_blocks.1.1.
    transformer_blocks.0.ff.net.2``); the pruned tensor is ``name + '.weight'``."""

    name: str
    module: nn.Linear

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.module.weight.shape)  # (out_features, in_features)


def _unet(model: nn.Module) -> nn.Module:
    """The UNet inside a LatentDiffusion (``model.model.diffusion_model``) or the UNet itself."""
    inner = getattr(model, "model", None)
    return getattr(inner, "diffusion_model", model)


def _dry_forward(model: nn.Module) -> None:
    """One UNet forward on a small zero input (batch 1), enough to fire every transformer block."""
    unet = _unet(model)
    param = next(unet.parameters())
    levels = len(getattr(unet, "channel_mult", (1, 2, 4, 4)))
    side = 2 ** levels  # small, divisible at every level, and > 1 pixel at the lowest (GroupNorm)
    ctx_dim = next(m.attn2.to_k.in_features for m in unet.modules() if hasattr(m, "attn2"))
    x = torch.zeros(1, unet.in_channels, side, side, device=param.device, dtype=param.dtype)
    t = torch.zeros(1, device=param.device, dtype=torch.long)
    ctx = torch.zeros(1, 1, ctx_dim, device=param.device, dtype=param.dtype)
    with torch.no_grad():
        unet(x, t, context=ctx)


def ff2_layers(model: nn.Module) -> list[FF2Layer]:
    """The ``ff.net.2`` Linear of every ``FeedForward``, in forward execution order.

    The order is observed with forward pre-hooks during a dry forward of the UNet; every candidate
    must fire exactly once (a layer that does not run, or runs twice, raises ``RuntimeError``).
    """
    names = {id(m.net[2]): f"{n}.net.2" for n, m in model.named_modules() if isinstance(m, FeedForward)}
    if not names:
        raise ValueError("the model has no FeedForward (ff.net.2) layers")
    modules = {id(m.net[2]): m.net[2] for m in model.modules() if isinstance(m, FeedForward)}
    order: list[int] = []
    handles = [mod.register_forward_pre_hook(lambda m, args, _k=k: order.append(_k)) for k, mod in modules.items()]
    try:
        _dry_forward(model)
    finally:
        for h in handles:
            h.remove()
    if sorted(order) != sorted(modules):
        raise RuntimeError(f"dry forward fired {len(order)} ff.net.2 hooks for {len(modules)} layers; "
                           "every layer must run exactly once per UNet call")
    return [FF2Layer(names[k], modules[k]) for k in order]


class _CallCounter:
    """(t, l) of each hook call: l from the layer's position, t advances when layer 0 fires."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.reset()

    def reset(self):
        self.t, self.next_l = -1, 0

    def step(self, l: int) -> int:
        if l == 0 and self.next_l in (0, self.n_layers):
            self.t, self.next_l = self.t + 1, 0
        if l != self.next_l:
            raise RuntimeError(f"ff.net.2 layer {l} ran when layer {self.next_l} was expected: "
                               "the execution order differs from the one recorded")
        self.next_l += 1
        return self.t


class _Hooks:
    def __init__(self, layers: list[FF2Layer]):
        self.layers = list(layers)
        self.counter = _CallCounter(len(self.layers))
        self._handles: list = []

    def start_generation(self):
        """Call before every sampling run: the next UNet call is t = 0."""
        self.counter.reset()

    @property
    def calls(self) -> int:
        """UNet calls seen in the current generation."""
        return self.counter.t + 1

    def __enter__(self):
        self.start_generation()
        self._register()
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []


class ActivationRecorder(_Hooks):
    """Accumulates, per (call t, layer l), the sum over rows of squared row-normalised ``ff.net.2``
    inputs: rows are every token of both CFG halves (the whole UNet batch);
    ``x̂ = x / max(||x||, 1e-12)``; fp32 on the activations' device whatever the autocast dtype.

    ``norms()`` returns ``A[l]`` of shape ``[T, in_features]`` = ``sqrt(sum of squares)``. Several
    generations (call :meth:`start_generation` before each) add into the same slots; all of them
    must make the same number of calls.
    """

    def __init__(self, layers: list[FF2Layer]):
        super().__init__(layers)
        self.sumsq: list[list[torch.Tensor]] = [[] for _ in self.layers]  # [l][t] -> [in] fp32
        self.n_calls: int | None = None
        self.generations = 0

    def start_generation(self):
        if self.calls > 0:
            self._finish()
        super().start_generation()

    def _finish(self):
        if self.n_calls is None:
            self.n_calls = self.calls
        elif self.calls != self.n_calls:
            raise RuntimeError(f"a generation made {self.calls} UNet calls, earlier ones {self.n_calls}")
        self.generations += 1

    def __exit__(self, *exc):
        super().__exit__(*exc)
        if exc[0] is None and self.calls > 0:
            self._finish()
            self.counter.reset()

    def _register(self):
        for l, layer in enumerate(self.layers):
            self._handles.append(layer.module.register_forward_pre_hook(self._make_hook(l)))

    def _make_hook(self, l: int):
        def hook(module, args):
            t = self.counter.step(l)
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            s = F.normalize(x, p=2.0, dim=1, eps=1e-12).square().sum(0)
            acc = self.sumsq[l]
            if t < len(acc):
                acc[t] += s
            elif t == len(acc):
                acc.append(s)
            else:
                raise RuntimeError("call index skipped a slot")
        return hook

    def norms(self) -> list[torch.Tensor]:
        """Per layer: ``[T, in_features]`` fp32 CPU column norms."""
        if not self.sumsq[0]:
            raise RuntimeError("nothing recorded")
        return [torch.stack(acc).sqrt().cpu() for acc in self.sumsq]


class MaskApplier(_Hooks):
    """During sampling, replaces each ``ff.net.2`` output with ``F.linear(x, W ⊙ (1 − M[t][l]), b)``.
    ``masks(t, l)`` returns a bool mask ``[out, in]`` (True = prune) or None (no change).
    ``n_calls`` (optional) bounds t: a generation with more UNet calls raises ``RuntimeError``.
    """

    def __init__(self, layers: list[FF2Layer], masks, n_calls: int | None = None):
        super().__init__(layers)
        self.masks = masks
        self.n_calls = n_calls

    def _register(self):
        for l, layer in enumerate(self.layers):
            self._handles.append(layer.module.register_forward_hook(self._make_hook(l)))

    def _make_hook(self, l: int):
        def hook(module, args, output):
            t = self.counter.step(l)
            if self.n_calls is not None and t >= self.n_calls:
                raise RuntimeError(f"UNet call {t} has no mask: the masks were recorded for {self.n_calls} calls "
                                   f"(sample with {self.n_calls - 1} PLMS steps)")
            mask = self.masks(t, l)
            if mask is None:
                return output
            w = module.weight.masked_fill(mask.to(module.weight.device), 0)
            return F.linear(args[0], w, module.bias)
        return hook
