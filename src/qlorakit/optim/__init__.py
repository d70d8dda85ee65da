"""Optimizers and learning-rate schedules (needs only torch).

- ``AdamW``: 32-bit or 8-bit (bitsandbytes-compatible blockwise) state, optionally paged within a byte budget;
- ``make_optimizer``: ``adamw`` | ``adamw8bit`` | ``paged_adamw`` | ``paged_adamw8bit`` by name;
- ``PagedStateStore``: the paged state itself (memory-mapped file on CPU, pinned host memory on CUDA);
- ``lr_at`` / ``warmup_steps``: the learning-rate schedules.
"""

from qlorakit.optim.adamw import OPTIMIZER_NAMES, AdamW, make_optimizer
from qlorakit.optim.paged import PagedStateStore
from qlorakit.optim.schedules import lr_at, warmup_steps

__all__ = ["OPTIMIZER_NAMES", "AdamW", "PagedStateStore", "lr_at", "make_optimizer", "warmup_steps"]
