"""Give chosen modules another forward for the length of a ``with`` block, then their class's again.

The trainer swaps in memory-saving forwards (``train.recompute``, ``train.rmsnorm``) that compute the same
values as the modules' own; the swap is an instance attribute, which shadows the class's ``forward`` and
is deleted on the way out, so the model is left as it was even if the block raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def patched_forwards(modules: list[nn.Module], make_forward: Callable[[nn.Module], Callable]) -> Iterator[int]:
    """``with patched_forwards(mods, make) as n:``: each module's forward is ``make(module)`` inside."""
    for module in modules:
        module.forward = make_forward(module)  # an instance attribute: shadows the class's forward
    try:
        yield len(modules)
    finally:
        for module in modules:
            del module.forward
