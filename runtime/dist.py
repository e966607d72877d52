"""Where this process stands in a multi-process job, read from its launcher's environment.

Lightning's own DDP launcher (``train.py --gpus 0,1``) starts ranks > 0 with ``LOCAL_RANK`` / ``NODE_RANK``;
torchrun, ``torch.distributed.run`` and most cluster launchers start every process themselves and set
``RANK`` / ``WORLD_SIZE``; :func:`init_from_launcher` joins their process group, so that the generation
stages can share their work by global rank (``generate_images(shard=...)``) and wait for each other.
"""
from __future__ import annotations

import os

__all__ = ["is_rank_zero", "external_shard", "init_from_launcher", "barrier", "broadcast_from_zero", "local_devices"]


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


# ---------------------------------------------------------------------------------------- external launchers
GROUP_TIMEOUT_S = 4 * 3600  # a rank may wait this long for the others' share of a generation


def init_from_launcher() -> tuple[int, int] | None:
    """Under an external launcher: join (or reuse) its process group and return ``(rank, world size)``.

    The group has gloo for CPU tensors (our own barriers and broadcasts) and, where CUDA is present, NCCL
    for CUDA tensors, so Lightning, which reuses an initialised group, still all-reduces gradients on
    NCCL. Returns None outside a launcher (nothing is initialised)."""
    shard = external_shard()
    if shard is None:
        return None
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    """Wait for every rank (a CPU all-reduce: works on the gloo part of any group)."""
    import torch
    import torch.distributed as dist

    dist.all_reduce(torch.zeros(1))


def broadcast_from_zero(obj):
    """Rank 0's ``obj`` on every rank."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def local_devices(devices: tuple[str, ...]) -> tuple[str, ...]:
    """The devices this process generates on: all of ``devices`` alone (one worker process each), or, under
    an external launcher that starts one process per device, ``devices[LOCAL_RANK]``."""
    if external_shard() is None:
        return tuple(devices)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = devices[local % len(devices)]
    return (f"cuda:{local}" if device == "cuda" else device,)  # the default device: this rank's own GPU
