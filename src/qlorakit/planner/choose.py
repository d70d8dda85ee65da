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

Candidates are the product of the knobs not given explicitly, ranked by the step time they add: each value
has a measured cost as a fraction of the fastest step (``planner.constants``: every block recomputed 0.375, so
``k`` of ``L`` blocks ``0.375 k / L``; the allocators 0 / 0.03 / 0.16 / 0.29; paged AdamW 0.01; 32-row loss
chunks 0.13), a candidate costs the sum, and ties keep the order above (the lexicographic order of the
knobs, checkpointing first). So a tight budget first pages the optimizer, then recomputes a few blocks, and
only takes the slower allocators or the small loss chunks when they buy more than their cost in recomputed
blocks would. The cheapest candidate whose predicted peak (``planner.estimate.plan``: peak RSS on the CPU,
device memory on a GPU) is at most the budget wins (``reference_choose`` is the same rule by brute force);
every knob is reported with its value and why. When even the leanest candidate exceeds the budget, ``choose``
raises ``PlanDoesNotFitError`` naming the explicit settings and the predicted peak.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from qlorakit.constants import LOSS_CHUNK_TOKENS
from qlorakit.errors import ConfigError
from qlorakit.planner.constants import (
    ALLOCATOR_STEP_COST,
    CHECKPOINT_ALL_STEP_COST,
    PAGED_OPTIM_STEP_COST,
    QUARTER_LOSS_CHUNK_STEP_COST,
)
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
    cost: float = 0.0  # the step time the choices add, a fraction of the fastest step (``step_cost``)

    def lines(self) -> list[str]:
        """One line per knob for the run's plan: ``memory    <knob> = <value>  (<reason>)``."""
        peak, budget = self.plan.total_bytes / 2**20, self.budget_bytes / 2**20
        head = f"memory     predicted peak {peak:,.0f} MiB of a {budget:,.0f} MiB budget"
        if self.cost > 0:
            head += f"; about +{self.cost:.0%} step time against the fastest settings (planner.constants)"
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


def knob_cost(knob: str, value: Any, num_layers: int) -> float:
    """The step time ``value`` of ``knob`` adds, as a fraction of the step with the fastest settings (measured
    constants: ``planner.constants``); 0 for a fastest value and for values the chooser does not rank."""
    if knob == "gradient_checkpointing":
        blocks = 0 if value is False else num_layers if value is True else value
        return CHECKPOINT_ALL_STEP_COST * blocks / num_layers
    if knob == "allocator":
        return ALLOCATOR_STEP_COST.get(value, 0.0)
    if knob == "optim":
        return PAGED_OPTIM_STEP_COST if value == KNOBS["optim"][1] else 0.0
    return QUARTER_LOSS_CHUNK_STEP_COST if value == KNOBS["loss_chunk"][1] else 0.0


def step_cost(knobs: Collection[str], values: tuple[Any, ...], num_layers: int) -> float:
    """A candidate's cost: the sum of its values' ``knob_cost``."""
    return sum(knob_cost(knob, value, num_layers) for knob, value in zip(knobs, values, strict=True))


def free_knobs(settings: PlanSettings, explicit: Collection[str]) -> list[str]:
    """The knobs ``choose`` may set: not explicit, and (``optim``) only between the two 32-bit AdamWs."""
    out = [k for k in KNOBS if k not in explicit]
    return [k for k in out if k != "optim" or settings.optim in KNOBS["optim"]]


def _candidates(shape: ModelShape, settings: PlanSettings, free: list[str],
                unavailable: Mapping[tuple[str, Any], str]) -> list[tuple[tuple[Any, ...], PlanSettings]]:  # fmt: skip
    """Every combination of the ``free`` knobs' values (none of ``unavailable``), in product order: the values
    and ``settings`` with them set."""
    values_of = [tuple(v for v in knob_values(shape, k) if (k, v) not in unavailable) for k in free]
    out = []
    for values in itertools.product(*values_of):
        candidate = settings
        for knob, value in zip(free, values, strict=True):
            candidate = with_knob(candidate, knob, value)
        out.append((values, candidate))
    return out


def choose(shape: ModelShape, settings: PlanSettings, budget_bytes: int, explicit: Collection[str] = (),
           unavailable: Mapping[tuple[str, Any], str] | None = None) -> Choices:  # fmt: skip
    """The fastest settings that fit ``budget_bytes`` (see the module docstring); ``explicit`` knobs stay as given,
    and no ``(knob, value)`` of ``unavailable`` (mapped to why: the arena where it cannot be built) is tried."""
    unavailable = unavailable or {}
    free = free_knobs(settings, explicit)
    leanest: MemoryPlan | None = None
    # cheapest first; sorted() is stable, so equal costs keep the product's (lexicographic) order
    ranked = sorted(_candidates(shape, settings, free, unavailable),
                    key=lambda pair: step_cost(free, pair[0], shape.num_layers))  # fmt: skip
    for values, candidate in ranked:
        result = plan(shape, candidate, budget_bytes)
        if result.fits:
            return Choices(candidate, result, budget_bytes, _explain(candidate, free, explicit, unavailable,
                                                                      shape.num_layers),
                           step_cost(free, values, shape.num_layers))  # fmt: skip
        leanest = result if leanest is None or result.total_bytes < leanest.total_bytes else leanest
    raise _does_not_fit(shape.name, leanest, free, explicit)


def reference_choose(shape: ModelShape, settings: PlanSettings, budget_bytes: int, explicit: Collection[str] = (),
                     unavailable: Mapping[tuple[str, Any], str] | None = None) -> PlanSettings | None:  # fmt: skip
    """``choose``'s rule by brute force, for the tests: plan every candidate, keep those that fit, return the one of
    least ``step_cost`` (the first in product order among equals); None when none fits."""
    free = free_knobs(settings, explicit)
    best: tuple[float, PlanSettings] | None = None
    for values, candidate in _candidates(shape, settings, free, unavailable or {}):
        cost = step_cost(free, values, shape.num_layers)
        if plan(shape, candidate, budget_bytes).fits and (best is None or cost < best[0]):
            best = (cost, candidate)
    return None if best is None else best[1]


def _explain(chosen: PlanSettings, free: list[str], explicit: Collection[str],
             unavailable: Mapping[tuple[str, Any], str], num_layers: int) -> tuple[Choice, ...]:  # fmt: skip
    out = []
    for knob in KNOBS:
        value = knob_value(chosen, knob)
        if knob in explicit:
            reason = "given explicitly"
        elif knob == "gradient_checkpointing" and not isinstance(value, bool):
            reason = (f"the first {value} of {num_layers} blocks recompute: with the choices beside it, the "
                      "cheapest in step time that fits the budget")
        elif knob not in free:
            reason = f"left as given ({value} is not one of {KNOBS[knob]})"
        elif value == KNOBS[knob][0]:
            reason = f"fastest; fits: {FASTER[knob]}"
        elif (knob, KNOBS[knob][0]) in unavailable and value == KNOBS[knob][1]:
            reason = f"{KNOBS[knob][0]} is unavailable ({unavailable[knob, KNOBS[knob][0]]}); fits: {SECOND[knob]}"
        else:
            reason = f"{KNOBS[knob][0]} does not fit the budget in any combination cheaper in step time"
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
