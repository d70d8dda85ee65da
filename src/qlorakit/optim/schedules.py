"""Learning-rate schedules, as functions of the optimizer step (0-based: updates already applied).

With ``W = ceil(warmup_ratio * T)`` warmup steps out of ``T``:

- warmup (all schedules): ``lr(s) = base * s / W`` for ``s < W`` (so the first update uses lr 0, as in the
  Hugging Face schedules the paper's script used);
- ``constant`` (the paper's): ``base`` afterwards;
- ``cosine``: ``base * 0.5 * (1 + cos(pi * (s - W) / (T - W)))``;
- ``linear``: ``base * (T - s) / (T - W)``, floored at 0.
"""

from __future__ import annotations

import math


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(warmup_ratio * total_steps)


def lr_at(step: int, total_steps: int, base_lr: float, scheduler: str, warmup_ratio: float) -> float:
    """The learning rate for the update that follows ``step`` completed updates."""
    warm = warmup_steps(total_steps, warmup_ratio)
    if step < warm:
        return base_lr * step / max(1, warm)
    if scheduler == "constant":
        return base_lr
    span = max(1, total_steps - warm)
    progress = min(1.0, (step - warm) / span)
    if scheduler == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if scheduler == "linear":
        return base_lr * max(0.0, 1.0 - progress)
    raise ValueError(f"unknown scheduler {scheduler!r}")
