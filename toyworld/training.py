"""Small pieces shared by the toy world's trainers (``toyworld.ldm``, ``toyworld.judge``)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence


def lr_at(step: int, steps: int, lr: float, warmup: int, final_frac: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``lr`` to ``final_frac * lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def adamw(model, lr: float, weight_decay: float):
    """AdamW with weight decay on matrices and kernels only (not on biases and norm scales)."""
    import torch

    params = list(model.parameters())
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=lr)


def save_curve(path: Path, history: list[dict], keys: Sequence[str], title: str, write_json: bool = False) -> None:
    """Plot ``history[i][k]`` against ``history[i]["step"]`` for each ``k`` (log scale) into ``path``;
    with ``write_json`` the history also goes to ``path`` with a ``.json`` suffix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if write_json:
        path.with_suffix(".json").write_text(json.dumps(history, indent=1) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [h["step"] for h in history]
    for k in keys:
        ax.plot(steps, [h[k] for h in history], label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
