"""Which distributed strategy a run uses, and why (the reason is printed in the plan, as every automatic choice).

- ``ddp``: every rank holds the whole 4-bit base and the adapters; the adapter gradients are summed
  (``parallel.replicas``). Per-rank memory: the one-process plan at ``batch_size / N`` plus one flat copy of
  the adapter gradients (``qlorakit plan --world-size N --distributed ddp``).
- ``fsdp``: the 4-bit base, the adapters, their gradients and optimizer state sharded per decoder block
  (``parallel.fsdp``; ``qlorakit plan --world-size N --distributed fsdp``).
- ``auto``: DDP when the planner says a whole replica fits the per-rank budget (it is the simpler and faster
  layout: no all-gathers), else FSDP; the reason names the planned bytes and the budget.
"""

from __future__ import annotations

from qlorakit.parallel.group import Dist


def choose_strategy(requested: str, dist: Dist, ddp_fit: tuple[bool, str] | None = None) -> tuple[str, str] | None:
    """``(strategy, reason)`` for a process group, ``None`` for one process (nothing to choose).

    ``ddp_fit``: the planner's verdict on a whole replica per rank, ``(fits, "x GiB of y GiB")``; without one,
    ``auto`` picks DDP (the planner could not tell).
    """
    if not dist.enabled:
        return None
    if requested in ("ddp", "fsdp"):
        return requested, f"asked for (--distributed {requested})"
    if ddp_fit is None:
        return "ddp", "auto: no per-rank plan to compare with the budget; DDP (a whole replica per rank)"
    fits, numbers = ddp_fit
    if fits:
        return "ddp", f"auto: a whole replica fits the per-rank budget ({numbers}), so DDP"
    return "fsdp", f"auto: a whole replica does not fit the per-rank budget ({numbers}), so FSDP (the base sharded)"
