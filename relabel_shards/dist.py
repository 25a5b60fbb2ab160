"""The one rule for "which rank am I": used by the writer (build, convert) and the loader alike.

In order of precedence:

1. explicit ``rank`` and ``world_size`` arguments (``--rank/--world-size``: Slurm arrays, other schedulers);
2. an initialized ``torch.distributed`` process group;
3. torchrun's ``RANK`` and ``WORLD_SIZE`` environment variables, both or neither;
4. a single process, ``(0, 1)``.

:func:`meet_ranks` and :func:`report_failure` are the writer's end-of-job meeting under ``torch.distributed``:
a store-based barrier that a failed rank can call off, so the other ranks raise instead of hanging.

Slurm's ``SLURM_PROCID`` / ``SLURM_NTASKS`` are not read: they are also set in a batch script's single
process, which would then take itself for one of many ranks and write a fraction of the output. Under
``srun`` pass ``--rank $SLURM_PROCID --world-size $SLURM_NTASKS`` (or use torchrun).
"""

from __future__ import annotations

import logging
import os
import time

__all__ = ["RankFailedError", "distributed_world", "meet_ranks", "report_failure", "resolve_rank"]

log = logging.getLogger(__name__)


class RankFailedError(RuntimeError):
    """Another rank of the job failed (the message says which and why)."""


def _int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            if isinstance(value, np.integer):
                return int(value)
        except ImportError:  # pragma: no cover
            pass
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size) by the rule in the module docstring.

    Raises:
        ValueError: only one of ``rank`` / ``world_size`` given (or only one of ``RANK`` / ``WORLD_SIZE``
            set), a non-integer, ``world_size < 1``, or ``rank`` outside ``[0, world_size)``.
    """
    if (rank is None) != (world_size is None):
        raise ValueError(
            f"give both rank and world_size or neither, got rank={rank!r}, world_size={world_size!r}"
        )
    where = "rank/world_size"
    if rank is None:
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                rank, world_size = dist.get_rank(), dist.get_world_size()
                where = "torch.distributed"
        except ImportError:  # pragma: no cover - torch is optional for this module
            pass
    if rank is None:
        env_rank, env_world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
        if (env_rank is None) != (env_world is None):
            raise ValueError(
                f"RANK={env_rank!r} and WORLD_SIZE={env_world!r}: set both (as torchrun does) "
                "or neither, or pass rank and world_size"
            )
        if env_rank is None:
            return 0, 1
        where = "RANK/WORLD_SIZE"
        try:
            rank, world_size = int(env_rank), int(env_world)  # type: ignore[arg-type]
        except ValueError:
            raise ValueError(f"RANK/WORLD_SIZE must be integers, got {env_rank!r}/{env_world!r}") from None
    rank, world_size = _int(rank, "rank"), _int(world_size, "world_size")
    if world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r} (from {where})")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got rank={rank!r} (from {where})")
    return rank, world_size


def distributed_world() -> int | None:
    """The world size of an initialized ``torch.distributed`` process group, else None."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else None


def _store():
    from torch.distributed import distributed_c10d as c10d

    return c10d._get_default_store()  # the process group's own key-value store (TCPStore under torchrun)


def meet_ranks(key: str, world_size: int, timeout: float | None = None) -> None:
    """Wait until all ``world_size`` ranks have called this with ``key``; raise once one reports failure.

    Each rank adds itself to a counter in the process group's store and polls it, and the ``{key}/failed``
    key that :func:`report_failure` sets. Once all have arrived, a plain ``barrier`` (which can no longer
    hang on a failed rank) keeps rank 0, which hosts the store, from leaving while another rank still polls.

    Args:
        key: the same on every rank, unique to this meeting.
        timeout: seconds to wait; None: the process group's default (30 min).

    Raises:
        RankFailedError: a rank reported failure (the message is its report).
        TimeoutError: not every rank arrived within ``timeout``.
    """
    import torch.distributed as dist

    store = _store()
    if timeout is None:
        from torch.distributed.constants import default_pg_timeout

        timeout = default_pg_timeout.total_seconds()
    store.add(f"{key}/done", 1)
    end, delay = time.monotonic() + timeout, 0.05
    while True:
        if store.check([f"{key}/failed"]):
            raise RankFailedError(store.get(f"{key}/failed").decode(errors="replace"))
        done = store.add(f"{key}/done", 0)
        if done >= world_size:
            dist.barrier()
            return
        if time.monotonic() > end:
            raise TimeoutError(f"rank {dist.get_rank()}: only {done} of {world_size} ranks arrived within "
                               f"{timeout:g} s")
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)


def report_failure(key: str, message: str) -> None:
    """Tell the ranks waiting in :func:`meet_ranks` with ``key`` that this rank failed (best effort)."""
    text = " ".join(str(message).split())[:500]
    try:
        _store().set(f"{key}/failed", text)
    except Exception as e:  # noqa: BLE001 - the store may be gone with the process group
        log.debug("could not tell the other ranks: %s", e)
