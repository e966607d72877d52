"""Where this process stands in a multi-process job, read from its launcher's environment.

Lightning's own DDP launcher (``train.py --gpus 0,1``) starts ranks > 0 with ``LOCAL_RANK`` / ``NODE_RANK``;
torchrun, ``torch.distributed.run`` and most cluster launchers start every process themselves and set
``RANK`` / ``WORLD_SIZE``; :func:`init_from_launcher` joins their process group, so that the generation
stages can share their work by global rank (``generate_images(shard=...)``) and wait for each other.

Every value is read through :func:`launcher_env`, which refuses a bad one in one line naming the variable
(``WORLD_SIZE=abc``, ``RANK=3`` with ``WORLD_SIZE=2``); the commands call :func:`check_launcher_env` in their
up-front checks, so such an environment ends with exit status 2 before any work, never with a hang.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from runtime.cli import RunError, UsageError

__all__ = ["is_rank_zero", "external_shard", "init_from_launcher", "barrier", "broadcast_from_zero", "local_devices",
           "LauncherEnv", "launcher_env", "check_launcher_env", "LauncherError", "SETUP_TIMEOUT_ENV"]


class LauncherError(RunError):
    """The processes of an external launcher did not form their group in time (a rank missing, a wrong address)."""


@dataclass(frozen=True)
class LauncherEnv:
    """The launcher variables of this process, checked (None: not set)."""

    rank: int | None
    world_size: int | None
    local_rank: int | None
    local_world_size: int | None
    node_rank: int | None


def _env_int(name: str, low: int) -> int | None:
    text = os.environ.get(name)
    if text is None:
        return None
    try:
        value = int(text.strip())
    except ValueError:
        value = None
    if value is None or value < low:
        raise UsageError(f"environment variable {name}={text!r}: expected an integer >= {low} (set by the "
                         f"launcher: torchrun, SLURM, ...; unset it to run a single process)")
    return value


def launcher_env() -> LauncherEnv:
    """The launcher's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and ``NODE_RANK``, checked:
    integers, ranks >= 0, sizes >= 1, ``RANK < WORLD_SIZE`` and ``LOCAL_RANK < LOCAL_WORLD_SIZE``. Raises
    :class:`runtime.cli.UsageError` naming the variable (a wrong rank would wait hours for peers that never come)."""
    env = LauncherEnv(rank=_env_int("RANK", 0), world_size=_env_int("WORLD_SIZE", 1),
                      local_rank=_env_int("LOCAL_RANK", 0), local_world_size=_env_int("LOCAL_WORLD_SIZE", 1),
                      node_rank=_env_int("NODE_RANK", 0))
    for rank, size in (("RANK", "WORLD_SIZE"), ("LOCAL_RANK", "LOCAL_WORLD_SIZE"), ("LOCAL_RANK", "WORLD_SIZE")):
        r, n = getattr(env, rank.lower()), getattr(env, size.lower())
        if r is not None and n is not None and r >= n:
            raise UsageError(f"environment variable {rank}={r} is not below {size}={n} (ranks run 0..{n - 1}): "
                             f"check the launcher's settings")
    return env


def check_launcher_env() -> None:
    """The commands' up-front check of the launcher environment (:func:`launcher_env`); under an external
    launcher also ``MASTER_ADDR`` / ``MASTER_PORT``, which the group is set up through. Raises UsageError."""
    env = launcher_env()
    if env.rank is not None and (env.world_size or 1) > 1:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name, "").strip():
                raise UsageError(f"environment variable {name} is not set, but RANK and WORLD_SIZE are: an external "
                                 f"launcher (torchrun) sets all of them; set {name} to rank 0's address/port")
        port = os.environ["MASTER_PORT"].strip()
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"environment variable MASTER_PORT={port!r}: expected a port number 1..65535")
        _setup_timeout_s()


def is_rank_zero() -> bool:
    """True for the process that owns the job's folders: global rank 0, or a process outside any launcher."""
    env = launcher_env()
    if env.rank is not None:
        return env.rank == 0
    return (env.local_rank or 0) == 0 and (env.node_rank or 0) == 0


def external_shard() -> tuple[int, int] | None:
    """``(rank, world size)`` when an external launcher (torchrun, SLURM, ...) started several copies of this
    script, each of which must do its share of the generation; None otherwise (also for Lightning's
    launcher, whose ranks > 0 start only after rank 0 has generated everything)."""
    env = launcher_env()
    if env.rank is not None and env.world_size is not None and env.world_size > 1:
        return env.rank, env.world_size
    return None


# ---------------------------------------------------------------------------------------- external launchers
GROUP_TIMEOUT_S = 4 * 3600  # a rank may wait this long for the others' share of a generation
SETUP_TIMEOUT_S = 300  # ... but only this long for the others to show up at all
SETUP_TIMEOUT_ENV = "ABLATION_DIST_SETUP_TIMEOUT"  # seconds; for clusters whose nodes start further apart


def _setup_timeout_s() -> float:
    text = os.environ.get(SETUP_TIMEOUT_ENV)
    if text is None:
        return SETUP_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise UsageError(f"environment variable {SETUP_TIMEOUT_ENV}={text!r}: expected a number of seconds > 0")
    return value


def init_from_launcher() -> tuple[int, int] | None:
    """Under an external launcher: join (or reuse) its process group and return ``(rank, world size)``.

    The group has gloo for CPU tensors (our own barriers and broadcasts) and, where CUDA is present, NCCL
    for CUDA tensors, so Lightning, which reuses an initialised group, still all-reduces gradients on
    NCCL. Setting it up (every rank meeting at ``MASTER_ADDR:MASTER_PORT``) may take :data:`SETUP_TIMEOUT_S`
    (the ``ABLATION_DIST_SETUP_TIMEOUT`` variable: seconds) before :class:`LauncherError` says what to check;
    once set up, its operations may wait :data:`GROUP_TIMEOUT_S` for the other ranks' generation.
    Returns None outside a launcher (nothing is initialised)."""
    check_launcher_env()
    shard = external_shard()
    if shard is None:
        return None
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        from torch.distributed.rendezvous import rendezvous

        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        setup = timedelta(seconds=_setup_timeout_s())
        try:  # what init_process_group(init_method="env://") does, with a store we keep to lengthen its timeout
            store, rank, world = next(rendezvous("env://", timeout=setup))
            store.set_timeout(setup)
            dist.init_process_group(backend=backend, store=dist.PrefixStore("default_pg", store), rank=rank,
                                    world_size=world, timeout=setup)
        except (RuntimeError, ValueError, TimeoutError) as e:  # DistStoreError & co. are RuntimeErrors
            raise _setup_error(shard, setup.total_seconds(), e) from e
        # set up: from now on a rank may wait long for the others' work (NCCL's lazy set-up uses the store too)
        store.set_timeout(timedelta(seconds=GROUP_TIMEOUT_S))
        dist.set_timeout(timedelta(seconds=GROUP_TIMEOUT_S))
    return dist.get_rank(), dist.get_world_size()


def _setup_error(shard: tuple[int, int], seconds: float, e: Exception) -> LauncherError:
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)[:200]
    return LauncherError(f"rank {shard[0]} of {shard[1]}: the process group was not set up within {seconds:g} s "
                         f"({reason}); check that MASTER_ADDR:MASTER_PORT ({where}) is rank 0's reachable address "
                         f"and a free port there, and that every rank 0..{shard[1] - 1} was started (a slow cluster: "
                         f"raise {SETUP_TIMEOUT_ENV})")


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
    local = launcher_env().local_rank or 0
    device = devices[local % len(devices)]
    return (f"cuda:{local}" if device == "cuda" else device,)  # the default device: this rank's own GPU
