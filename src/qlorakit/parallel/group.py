"""The process group of a multi-process run: who this rank is, the backend, the timeout, and clear failures.

A run is distributed when ``WORLD_SIZE`` is set (``torchrun``, ``accelerate launch`` and SLURM wrappers set
it, with ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``); without it nothing changes and every
function here is a no-op on the one process. The backend is NCCL when CUDA is available and gloo otherwise;
the code above it is the same for both.

Every collective the trainer issues goes through ``collective(what)``: a rank that died (its sockets close)
or hangs (the group's ``timeout`` passes) turns into one ``DistributedError`` naming the operation, this rank
and the timeout, instead of a backend traceback or a hang.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from qlorakit.constants import DIST_TIMEOUT_S
from qlorakit.errors import ConfigError, DistributedError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (``world_size`` 1 and ``backend`` "" for a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""
    timeout_s: int = DIST_TIMEOUT_S

    @property
    def enabled(self) -> bool:
        """True when a process group is up (even of one rank: collectives then run, over one process)."""
        return self.backend != ""

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory (metrics, progress, plot, summary, checkpoints, adapter)."""
        return self.rank == 0

    def describe(self) -> str:
        if not self.enabled:
            return "one process"
        return f"rank {self.rank} of {self.world_size} (local rank {self.local_rank}, {self.backend})"


SINGLE = Dist()


def launched() -> bool:
    """True when a launcher (torchrun, accelerate, SLURM wrapper) started this process as one rank of a job."""
    return "WORLD_SIZE" in os.environ


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_from_env(strategy: str, timeout_s: int = DIST_TIMEOUT_S) -> Dist:
    """Join the job's process group (once) when launched; ``SINGLE`` otherwise.

    ``strategy`` "fsdp" without a launcher is an error: sharding needs several processes.
    """
    if not launched():
        if strategy == "fsdp":
            raise ConfigError("--distributed fsdp needs a process group: start the run with torchrun "
                              "(torchrun --nproc-per-node N -m qlorakit train ...), which sets WORLD_SIZE; "
                              "one process trains without --distributed fsdp")
        return SINGLE
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ConfigError(f"WORLD_SIZE is set but {name} is not: start the ranks with torchrun (or set RANK, "
                              "MASTER_ADDR and MASTER_PORT as torchrun does); see docs/distributed.md")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = default_backend()
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        with collective("joining the process group (rendezvous)", timeout_s):
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return current(timeout_s)


def current(timeout_s: int = DIST_TIMEOUT_S) -> Dist:
    """The ``Dist`` of the process group this process has joined, or ``SINGLE``."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                backend=dist.get_backend(), timeout_s=timeout_s)


@contextlib.contextmanager
def collective(what: str, timeout_s: int) -> Iterator[None]:
    """Turn a failed collective into ``DistributedError`` (a peer died: connection closed; or hung: timeout)."""
    try:
        yield
    except DistributedError:
        raise
    except (RuntimeError, ValueError) as exc:  # DistBackendError / DistNetworkError / gloo's errors subclass these
        rank = dist.get_rank() if dist.is_initialized() else os.environ.get("RANK", "?")
        raise DistributedError(
            f"rank {rank}: {what} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. Another "
            f"rank has most likely died or hung (the group waits at most {timeout_s} s, --dist-timeout-s). Look at "
            "that rank's output, then continue from the last checkpoint with `torchrun ... -m qlorakit train "
            "--resume RUN_DIR` (any world size)."
        ) from exc


def shutdown() -> None:
    """Leave the process group (at the end of a run; safe to call when none is up)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(strategy: str, timeout_s: int = DIST_TIMEOUT_S) -> Iterator[Dist]:
    """``init_from_env`` for the duration of a command; the group is left at the end only if this joined it
    (a caller that had already joined one, a test or a notebook, keeps it)."""
    joined_here = launched() and not (dist.is_available() and dist.is_initialized())
    info = init_from_env(strategy, timeout_s)
    try:
        yield info
    finally:
        if joined_here:
            shutdown()
