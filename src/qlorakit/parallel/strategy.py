"""Which distributed strategy a run uses, and why (the reason is printed in the plan, as every automatic choice).

- ``ddp``: every rank holds the whole 4-bit base and the adapters; the adapter gradients are summed
  (``parallel.replicas``). Per-rank memory: the one-process plan at ``batch_size / N`` plus one flat copy of
  the adapter gradients (``qlorakit plan --world-size N --distributed ddp``).
- ``fsdp``: the base sharded per decoder block. Not available in the trainer yet (docs/distributed.md says
  what blocks it): asking for it under torchrun is an error naming the alternative; ``auto`` picks ``ddp``.
"""

from __future__ import annotations

from qlorakit.errors import ConfigError
from qlorakit.parallel.group import Dist


def choose_strategy(requested: str, dist: Dist) -> tuple[str, str] | None:
    """``(strategy, reason)`` for a process group, ``None`` for one process (nothing to choose)."""
    if not dist.enabled:
        return None
    if requested == "fsdp":
        raise ConfigError(
            "--distributed fsdp: sharding the 4-bit base across ranks is not available in the trainer yet "
            "(docs/distributed.md, 'What is not supported'); use --distributed ddp (each rank holds the whole 4-bit "
            "model; `qlorakit plan --world-size N --distributed ddp` gives the memory per rank)"
        )
    if requested == "ddp":
        return "ddp", "asked for (--distributed ddp)"
    return "ddp", "auto: DDP is the only strategy the trainer runs (FSDP sharding of the 4-bit base is not available)"
