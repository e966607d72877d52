"""Where this process stands in a multi-process job, read from its launcher's environment.

Lightning's own DDP launcher (``train.py --gpus 0,1``) starts ranks > 0 with ``LOCAL_RANK`` / ``NODE_RANK``;
torchrun, ``torch.distributed.run`` and most cluster launchers start every process themselves and set
``RANK`` / ``WORLD_SIZE``. Nothing here initialises a process group.
"""
from __future__ import annotations

import os

__all__ = ["is_rank_zero", "external_shard"]


def is_rank_zero() -> bool:
    """True for the process that owns the job's folders: global rank 0, or a process outside any launcher."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def external_shard() -> tuple[int, int] | None:
    """``(rank, world size)`` when an external launcher (torchrun, SLURM, ...) started several copies of this
    script, each of which must do its share of the generation; None otherwise (also for Lightning's
    launcher, whose ranks > 0 start only after rank 0 has generated everything)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None
