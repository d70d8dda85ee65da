"""Pick the fastest memory settings of a training run that fit a memory budget (``qlorakit train --memory-budget``).

A pure function of the model's shape, the run's settings, the budget and which settings the user gave
explicitly: ``choose(shape, settings, budget_bytes, explicit)``. Four knobs, each listed fastest value first:

- ``gradient_checkpointing``: off (each block's activations kept), then the first ``k`` of the model's ``L``
  decoder blocks recomputed in backward for ``k = 1 .. L - 1`` (``memory.checkpoint_blocks``; each costs about a
  block's forward, ~1/L of the checkpointed step's recompute, and saves what a block keeps less its input),
  then every block;
- ``allocator``: ``arena`` (qlorakit's caching arena for the CPU tensors, ``train.arena``: freed blocks reused
  best fit, few page faults, nothing left to creep; offered only where it can be built), then ``dynamic``
  (glibc's own mmap threshold: freed buffers reused from the heap, which keeps
  more resident), then ``dynamic-trim-blocks`` (the same with ``malloc_trim`` before each decoder block's
  forward: the forward's holes go back to the OS, ~0.6 M page faults a step), then ``fixed`` (a fixed 1 MiB
  threshold: every large buffer is fresh pages, ~1.5 M faults) — ``ALLOCATORS``; measured in docs/memory.md;
- ``optim``: ``adamw`` (all state resident) before ``paged_adamw`` (state beyond a small budget paged to a
  file) — only when the optimizer is one of these two; an 8-bit optimizer is left as given;
- ``loss_chunk``: the trainer's default chunk (``LOSS_CHUNK_TOKENS``) before a quarter of it (``loss_chunk``
  rows of fp32 logits live at once).

Candidates are the product of the knobs not given explicitly, ranked lexicographically in that order
(checkpointing first: its recompute costs about a third of a step (issue 14: 165 vs 120 tokens/s), more than
the leaner allocators' page faults (docs/memory.md: 1.3-1.7 s of system time in a ~12 s step with
``dynamic-trim-blocks``, ~3 s with ``fixed``); the optimizer and loss-chunk orders are the direction of less
work, not measured). The first candidate whose
predicted peak (``planner.estimate.plan``: peak RSS on the CPU, device memory on a GPU) is at most the
budget wins; every knob is reported with its value and why. When even the leanest candidate exceeds the
budget, ``choose`` raises ``PlanDoesNotFitError`` naming the explicit settings and the predicted peak.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from qlorakit.constants import LOSS_CHUNK_TOKENS
from qlorakit.errors import ConfigError
from qlorakit.planner.estimate import MemoryPlan, PlanSettings, plan
from qlorakit.planner.shapes import ModelShape

#: allocator policy -> (``mmap_threshold_kib``, ``malloc_trim``, ``malloc_trim_blocks``, ``arena``): the planner's
#: and the trainer's settings. ``arena``: the caching arena for tensors of 64 KiB or more, glibc's dynamic threshold
#: for the rest; ``dynamic-trim-blocks``: the dynamic threshold with ``malloc_trim`` at each decoder block's
#: forward (docs/memory.md: about 0.6 M page faults a step against 1.5 M for ``fixed``, 20 K for ``dynamic`` and
#: under 10 K for ``arena``).
ALLOCATORS: dict[str, tuple[int, bool, bool, bool]] = {
    "arena": (0, False, False, True), "dynamic": (0, False, False, False),
    "dynamic-trim-blocks": (0, False, True, False), "fixed": (1024, False, False, False)}

#: The knobs, each with its values fastest first, in the order of their rank.
KNOBS: dict[str, tuple[Any, ...]] = {
    "gradient_checkpointing": (False, True),
    "allocator": tuple(ALLOCATORS),
    "optim": ("adamw", "paged_adamw"),
    "loss_chunk": (LOSS_CHUNK_TOKENS, LOSS_CHUNK_TOKENS // 4),
}

#: Why a value was picked, per knob and value (the fastest value is picked when it fits).
FASTER = {
    "allocator": "caching arena: freed tensor blocks reused best fit, few page faults, no heap creep",
    "gradient_checkpointing": "no recomputation in backward",
    "optim": "optimizer state resident, no paging",
    "loss_chunk": "fewer head + cross-entropy chunks",
}


#: Why the second value was picked when the fastest is unavailable here.
SECOND = {"allocator": "glibc's dynamic mmap threshold: freed activation buffers reused, few page faults"}


class PlanDoesNotFitError(ConfigError):
    """The settings the user gave (or the leanest choice) need more memory than the budget."""


@dataclass(frozen=True)
class Choice:
    knob: str
    value: Any
    reason: str


@dataclass(frozen=True)
class Choices:
    """The chosen settings, their plan, the budget, and one ``Choice`` per knob."""

    settings: PlanSettings
    plan: MemoryPlan
    budget_bytes: int
    choices: tuple[Choice, ...]

    def lines(self) -> list[str]:
        """One line per knob for the run's plan: ``memory    <knob> = <value>  (<reason>)``."""
        peak, budget = self.plan.total_bytes / 2**20, self.budget_bytes / 2**20
        head = f"memory     predicted peak {peak:,.0f} MiB of a {budget:,.0f} MiB budget"
        return [head] + [f"           {c.knob} = {c.value}  ({c.reason})" for c in self.choices]


def knob_value(settings: PlanSettings, knob: str) -> Any:
    """The value of ``knob`` in ``settings``; ``gradient_checkpointing`` is False, True (every block) or the
    number of blocks that recompute."""
    if knob == "gradient_checkpointing" and settings.gradient_checkpointing and settings.checkpoint_blocks > 0:
        return settings.checkpoint_blocks
    if knob == "allocator":
        pair = (settings.mmap_threshold_kib, settings.malloc_trim, settings.malloc_trim_blocks, settings.arena)
        return next((name for name, value in ALLOCATORS.items() if value == pair), f"custom {pair}")
    return getattr(settings, knob)


def with_knob(settings: PlanSettings, knob: str, value: Any) -> PlanSettings:
    """``settings`` with ``knob`` set to ``value``."""
    if knob == "allocator":
        kib, trim, blocks, arena = ALLOCATORS[value]
        return dataclasses.replace(settings, mmap_threshold_kib=kib, malloc_trim=trim, malloc_trim_blocks=blocks,
                                   arena=arena)
    if knob == "optim":
        budget = settings.optim_budget_mib if value.startswith("paged_") else 0
        return dataclasses.replace(settings, optim=value, optim_budget_mib=budget)
    if knob == "gradient_checkpointing":  # False, True, or a number of blocks
        blocks = 0 if isinstance(value, bool) else value
        return dataclasses.replace(settings, gradient_checkpointing=value is not False, checkpoint_blocks=blocks)
    return dataclasses.replace(settings, **{knob: value})


def knob_values(shape: ModelShape, knob: str) -> tuple[Any, ...]:
    """``KNOBS[knob]``, with the partial checkpointing counts ``1 .. L - 1`` between off and on."""
    if knob == "gradient_checkpointing":
        return (False, *range(1, shape.num_layers), True)
    return KNOBS[knob]


def free_knobs(settings: PlanSettings, explicit: Collection[str]) -> list[str]:
    """The knobs ``choose`` may set: not explicit, and (``optim``) only between the two 32-bit AdamWs."""
    out = [k for k in KNOBS if k not in explicit]
    return [k for k in out if k != "optim" or settings.optim in KNOBS["optim"]]


def choose(shape: ModelShape, settings: PlanSettings, budget_bytes: int, explicit: Collection[str] = (),
           unavailable: Mapping[tuple[str, Any], str] | None = None) -> Choices:  # fmt: skip
    """The fastest settings that fit ``budget_bytes`` (see the module docstring); ``explicit`` knobs stay as given,
    and no ``(knob, value)`` of ``unavailable`` (mapped to why: the arena where it cannot be built) is tried."""
    unavailable = unavailable or {}
    free = free_knobs(settings, explicit)
    leanest: MemoryPlan | None = None
    values_of = [tuple(v for v in knob_values(shape, k) if (k, v) not in unavailable) for k in free]
    for values in itertools.product(*values_of):
        candidate = settings
        for knob, value in zip(free, values, strict=True):
            candidate = with_knob(candidate, knob, value)
        result = plan(shape, candidate, budget_bytes)
        if result.fits:
            return Choices(candidate, result, budget_bytes, _explain(candidate, free, explicit, unavailable,
                                                                      shape.num_layers))
        leanest = result if leanest is None or result.total_bytes < leanest.total_bytes else leanest
    raise _does_not_fit(shape.name, leanest, free, explicit)


def _explain(chosen: PlanSettings, free: list[str], explicit: Collection[str],
             unavailable: Mapping[tuple[str, Any], str], num_layers: int) -> tuple[Choice, ...]:  # fmt: skip
    out = []
    for knob in KNOBS:
        value = knob_value(chosen, knob)
        if knob in explicit:
            reason = "given explicitly"
        elif knob == "gradient_checkpointing" and not isinstance(value, bool):
            reason = (f"the first {value} of {num_layers} blocks recompute: the fewest that fit the budget with the "
                      "faster choices above")
        elif knob not in free:
            reason = f"left as given ({value} is not one of {KNOBS[knob]})"
        elif value == KNOBS[knob][0]:
            reason = f"fastest; fits: {FASTER[knob]}"
        elif (knob, KNOBS[knob][0]) in unavailable and value == KNOBS[knob][1]:
            reason = f"{KNOBS[knob][0]} is unavailable ({unavailable[knob, KNOBS[knob][0]]}); fits: {SECOND[knob]}"
        else:
            reason = f"{KNOBS[knob][0]} does not fit the budget with the faster choices above"
        out.append(Choice(knob, value, reason))
    return tuple(out)


def _does_not_fit(name: str, leanest: MemoryPlan, free: list[str], explicit: Collection[str]) -> PlanDoesNotFitError:
    chosen = leanest.settings
    given = ", ".join(f"{k} = {knob_value(chosen, k)}" for k in KNOBS if k in explicit) or "none"
    leanest_free = ", ".join(f"{k} = {knob_value(chosen, k)}" for k in free) or "nothing left to choose"
    return PlanDoesNotFitError(
        f"{name}: training needs a predicted peak of {leanest.total_bytes / 2**20:,.1f} MiB, over the memory budget "
        f"of {leanest.budget_bytes / 2**20:,.1f} MiB, even with the leanest choices ({leanest_free}); settings "
        f"given explicitly: {given}. Lower --batch-size or the sequence length, drop an explicit setting that "
        "costs memory (e.g. --no-gradient-checkpointing), or pass a larger --memory-budget"
    )
