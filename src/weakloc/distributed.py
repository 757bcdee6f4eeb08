"""The process's place in a ``torchrun`` launch, and the process group its ranks meet in.

weakloc does not start processes itself: ``torchrun`` (or a scheduler running it) does, and sets
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. Commands that split work over ranks read them here and
meet through :mod:`torch.distributed` (gloo on the CPU, NCCL between GPUs).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch

from weakloc.errors import OptionError

#: how long a rank waits at a barrier for the others: a shard of a large localization can take
#: hours longer than another when the files are uneven, and a barrier that times out loses nothing
#: but the merge, which ``weakloc assemble`` redoes
BARRIER_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class Rank:
    """This process's ``rank`` among ``world`` processes, and its ``local`` rank on its machine."""

    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def zero(self) -> bool:
        return self.rank == 0

    def owns(self, position: int) -> bool:
        """Whether item ``position`` of a list shared round-robin over the ranks is this rank's."""
        return position % self.world == self.rank


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise OptionError(f"environment variable {name}: {value!r} is not a whole number (torchrun sets it)") from None


def current_rank() -> Rank:
    """The rank ``torchrun`` gave this process (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), or the
    single process ``Rank()`` when it was started otherwise."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise OptionError(f"environment variables RANK={rank} and WORLD_SIZE={world} do not describe a process of a launch")
    return Rank(rank, world, _env_int("LOCAL_RANK", 0))


@contextmanager
def process_group(rank: Rank, device: torch.device) -> Iterator[None]:
    """The default process group for ``rank`` (none for a single process): NCCL when ``device`` is
    a GPU, else gloo; joined from ``torchrun``'s environment, left on exit."""
    import torch.distributed as dist

    if rank.world == 1 or dist.is_initialized():
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=BARRIER_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier(rank: Rank) -> None:
    """Wait until every rank is here (nothing for a single process)."""
    import torch.distributed as dist

    if rank.world > 1 and dist.is_initialized():
        dist.barrier()
