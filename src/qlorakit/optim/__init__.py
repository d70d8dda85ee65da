"""Optimizers and learning-rate schedules (needs only torch)."""

from qlorakit.optim.schedules import lr_at, warmup_steps

__all__ = ["lr_at", "warmup_steps"]
