"""The memory-budget chooser: the fastest settings that fit, explicit settings kept, a clear error when they cannot fit.

Budgets are built from ``plan`` itself (the chooser's own predictor), so each test pins the choice at a
boundary: one byte more or less flips it.
"""

from __future__ import annotations

import dataclasses

import pytest

from qlorakit.config import MemoryConfig, OptimConfig, RunConfig
from qlorakit.planner import PlanSettings, model_shape, plan
from qlorakit.planner.budget import apply_choices, default_budget, explicit_knobs, settings_for
from qlorakit.planner.choose import (
    KNOBS,
    PlanDoesNotFitError,
    choose,
    knob_cost,
    knob_values,
    reference_choose,
    with_knob,
)
from qlorakit.planner.constants import ALLOCATOR_STEP_COST

SHAPE = model_shape("7b")
BASE = PlanSettings(seq_len=512, batch_size=2, lora_r=16, device="cpu", compute_dtype="float32")


def _with(settings: PlanSettings, **knobs) -> PlanSettings:
    for knob, value in knobs.items():
        settings = with_knob(settings, knob, value)
    return settings


def _peak(**knobs) -> int:
    return plan(SHAPE, _with(BASE, **knobs)).total_bytes


FASTEST = {knob: values[0] for knob, values in KNOBS.items()}


def _values(choices) -> dict:
    return {c.knob: c.value for c in choices.choices}


def test_a_generous_budget_gets_every_fastest_setting():
    got = choose(SHAPE, BASE, _peak(**FASTEST))
    assert _values(got) == FASTEST
    assert got.plan.total_bytes == _peak(**FASTEST) and got.plan.fits
    assert all(c.reason.startswith("fastest") for c in got.choices)


def test_one_byte_less_gives_up_the_cheapest_speedup_first():
    """Paging the optimizer (0.01 of a step) is the cheapest concession: it is taken before 32-row loss chunks
    (0.13) or a recomputed block (0.375 / L), when it alone makes room."""
    budget = _peak(**FASTEST) - 1
    assert _peak(**{**FASTEST, "optim": "paged_adamw"}) <= budget
    got = choose(SHAPE, BASE, budget)
    assert _values(got) == {**FASTEST, "optim": "paged_adamw"}
    assert got.settings == reference_choose(SHAPE, BASE, budget) and got.cost == pytest.approx(0.01)
    assert "+1% step time" in got.lines()[0]


def _fits_somehow(budget: int, checkpointing) -> bool:
    """Some allocator / optimizer / loss chunk fits ``budget`` with this checkpointing value."""
    return any(_peak(gradient_checkpointing=checkpointing, allocator=a, optim=o, loss_chunk=c) <= budget
               for a in KNOBS["allocator"] for o in KNOBS["optim"] for c in KNOBS["loss_chunk"])  # fmt: skip


def test_a_budget_just_under_no_checkpointing_recomputes_the_cheapest_number_of_blocks():
    """Where nothing fits without checkpointing, the first ``k`` blocks recompute (memory.checkpoint_blocks), with
    ``k`` and the other knobs the cheapest fitting combination in step time (the brute-force reference)."""
    layers = SHAPE.num_layers
    lean_rest = {"optim": "paged_adamw", "loss_chunk": KNOBS["loss_chunk"][1]}
    leanest_off = min(_peak(gradient_checkpointing=False, allocator=a, **lean_rest) for a in KNOBS["allocator"])
    picked = []
    for budget in (leanest_off - 1, (leanest_off + _peak(gradient_checkpointing=True, **lean_rest)) // 2):
        got = choose(SHAPE, BASE, budget)
        blocks = got.settings.checkpoint_blocks
        assert got.settings.gradient_checkpointing is True and 1 <= blocks < layers and got.plan.fits
        assert not _fits_somehow(budget, False)
        assert got.settings == reference_choose(SHAPE, BASE, budget)
        assert _values(got)["gradient_checkpointing"] == blocks
        reason = next(c.reason for c in got.choices if c.knob == "gradient_checkpointing")
        assert f"the first {blocks} of {layers} blocks" in reason
        picked.append(blocks)
    assert picked[0] < picked[1]  # a smaller budget: more blocks


@pytest.mark.parametrize(("unavailable", "fraction"), [(None, 0.35), ({("allocator", "arena"): "no compiler"}, 0.8)])
def test_the_choice_is_the_cheapest_candidate_that_fits_by_brute_force(unavailable, fraction):
    """Budgets spread between the fastest settings' peak and the leanest's: ``choose`` (ranked, first fit) picks
    what planning every candidate and keeping the cheapest fitting one picks (``reference_choose``)."""
    lean = {"gradient_checkpointing": SHAPE.num_layers - 1, "allocator": "fixed", "optim": "paged_adamw",
            "loss_chunk": KNOBS["loss_chunk"][1]}  # fmt: skip
    top, bottom = _peak(**FASTEST), _peak(**lean)
    budget = int(bottom + fraction * (top - bottom))
    got = choose(SHAPE, BASE, budget, unavailable=unavailable)
    assert got.plan.fits and got.settings == reference_choose(SHAPE, BASE, budget, unavailable=unavailable)
    assert got.cost > 0  # the budget is below the fastest settings' peak


def test_step_costs_rank_the_values_of_each_knob_fastest_first():
    layers = SHAPE.num_layers
    for knob in KNOBS:
        costs = [knob_cost(knob, v, layers) for v in knob_values(SHAPE, knob)]
        assert costs[0] == 0 and all(a <= b for a, b in zip(costs, costs[1:], strict=False)), knob
    assert set(ALLOCATOR_STEP_COST) == set(KNOBS["allocator"])
    assert knob_cost("gradient_checkpointing", layers, layers) == knob_cost("gradient_checkpointing", True, layers)


def test_the_tightest_budget_recomputes_all_blocks_but_the_last_which_is_as_lean_as_all():
    """The last block's recompute would run first in backward, with every other block's input still kept: its own
    saved tensors cost no more, so recomputing every block is never leaner than all but the last."""
    layers = SHAPE.num_layers
    lean = {"allocator": "fixed", "optim": "paged_adamw", "loss_chunk": KNOBS["loss_chunk"][1]}
    assert _peak(gradient_checkpointing=layers - 1, **lean) <= _peak(gradient_checkpointing=True, **lean)
    budget = _peak(gradient_checkpointing=layers - 1, **lean)
    got = choose(SHAPE, BASE, budget, unavailable=NO_ARENA)
    assert got.settings.checkpoint_blocks == layers - 1 and got.plan.fits
    with pytest.raises(PlanDoesNotFitError, match=f"gradient_checkpointing = {layers - 1}"):
        choose(SHAPE, BASE, budget - 1, unavailable=NO_ARENA)


def test_partial_checkpointing_plans_lie_between_none_and_all_and_fall_with_each_block():
    peaks = [_peak(gradient_checkpointing=k) for k in (False, *range(1, SHAPE.num_layers), True)]
    assert all(later < earlier for earlier, later in zip(peaks[:-2], peaks[1:-1], strict=True))
    assert peaks[-1] <= peaks[-2] + 2 * SHAPE.hidden_size * 512 * 4  # all blocks ~ all but one (one block input)
    settings = with_knob(BASE, "gradient_checkpointing", 7)
    assert (settings.gradient_checkpointing, settings.checkpoint_blocks) == (True, 7)
    assert explicit_knobs({"memory.checkpoint_blocks"}) == {"gradient_checkpointing"}
    memory = apply_choices(RunConfig(model="7b"), settings).memory
    assert (memory.gradient_checkpointing, memory.checkpoint_blocks) == (True, 7)


NO_ARENA = {("allocator", "arena"): "no C++ compiler"}  # a machine where the arena cannot be built


def test_explicit_settings_are_kept_and_the_free_knobs_make_room():
    settings = _with(BASE, gradient_checkpointing=False)
    budget = _peak(**{**FASTEST, "allocator": "fixed"})  # checkpointing off fits only with the lean allocator
    assert _peak(**{**FASTEST, "allocator": "dynamic"}) > budget
    got = choose(SHAPE, settings, budget, explicit={"gradient_checkpointing"}, unavailable=NO_ARENA)
    assert _values(got) == {**FASTEST, "allocator": "fixed"}
    assert next(c.reason for c in got.choices if c.knob == "gradient_checkpointing") == "given explicitly"


def test_the_arena_is_the_fastest_and_the_leanest_allocator_and_its_absence_is_explained():
    peaks = {a: _peak(**{**FASTEST, "allocator": a}) for a in KNOBS["allocator"]}
    assert KNOBS["allocator"][0] == "arena" and peaks["arena"] < min(peaks["dynamic"], peaks["dynamic-trim-blocks"])
    arena = plan(SHAPE, _with(BASE, **FASTEST))  # blocks of 1 MiB or more: the fixed threshold keeps no heap
    assert peaks["arena"] - peaks["fixed"] == arena.part("arena_slack") + arena.part("glibc_heap") > 0
    got = choose(SHAPE, BASE, peaks["arena"])
    assert _values(got) == FASTEST and got.settings.arena and got.settings.mmap_threshold_kib == 0
    without = choose(SHAPE, BASE, 10**15, unavailable=NO_ARENA)
    assert _values(without)["allocator"] == "dynamic" and not without.settings.arena
    reason = next(c.reason for c in without.choices if c.knob == "allocator")
    assert "arena is unavailable (no C++ compiler)" in reason
    fast = _with(BASE, **{k: v for k, v in FASTEST.items() if k != "allocator"})
    lean = choose(SHAPE, fast, peaks["arena"], explicit={"gradient_checkpointing", "optim", "loss_chunk"},
                  unavailable=NO_ARENA)  # the arena's budget, without it: a glibc policy that fits, not dynamic
    assert _values(lean)["allocator"] in ("dynamic-trim-blocks", "fixed") and lean.plan.fits


def test_explicit_settings_that_cannot_fit_fail_naming_them():
    settings = _with(BASE, gradient_checkpointing=False)
    leanest_off = _peak(allocator="fixed", gradient_checkpointing=False, optim="paged_adamw",
                        loss_chunk=KNOBS["loss_chunk"][1])  # fmt: skip
    assert _peak(allocator="fixed", gradient_checkpointing=True) < leanest_off  # it would fit without the flag
    with pytest.raises(PlanDoesNotFitError, match="gradient_checkpointing = False") as err:
        choose(SHAPE, settings, leanest_off - 1, explicit={"gradient_checkpointing"})
    assert "--memory-budget" in str(err.value) and SHAPE.name in str(err.value)


def test_an_8bit_optimizer_is_left_as_given():
    settings = dataclasses.replace(BASE, optim="paged_adamw8bit")
    got = choose(SHAPE, settings, 10**15)
    assert _values(got)["optim"] == "paged_adamw8bit"
    assert "left as given" in next(c.reason for c in got.choices if c.knob == "optim")


def test_config_fields_map_to_knobs_and_choices_are_written_back():
    assert explicit_knobs({"memory.malloc_trim", "optim.lr"}) == explicit_knobs({"memory.arena"}) == {"allocator"}
    assert explicit_knobs({"optim.optim_budget", "memory.loss_chunk_tokens"}) == {"optim", "loss_chunk"}
    cfg = RunConfig(memory=MemoryConfig(gradient_checkpointing=True), optim=OptimConfig(optim="paged_adamw"))
    chosen = apply_choices(cfg, _with(settings_for(cfg), **FASTEST))
    assert (chosen.memory.gradient_checkpointing, chosen.memory.malloc_trim, chosen.memory.malloc_mmap_threshold_kib,
            chosen.optim.optim, chosen.memory.arena) == (False, False, 0, "adamw", True)  # fmt: skip
    assert settings_for(chosen).gradient_checkpointing is False and chosen.lora == cfg.lora


def test_default_budget_leaves_a_margin_of_the_available_memory():
    from qlorakit.hardware import available_memory

    free = available_memory()
    assert free > 0 and 0 < default_budget() < free


def test_where_the_arena_can_be_built_it_is_the_only_allocator_tried():
    """A budget that misses the arena without checkpointing turns checkpointing on; it never falls back to the
    fixed threshold (as lean up to the arena's slack, ~1.5 M page faults a step). Without the arena it does."""
    from qlorakit.config import DataConfig, LoraConfig, TrainConfig
    from qlorakit.planner.budget import choose_for_run

    cfg = RunConfig(data=DataConfig(max_seq_len=512), lora=LoraConfig(r=16), train=TrainConfig(batch_size=2))
    settings = settings_for(cfg)
    arena_ckpt = plan(SHAPE, _with(settings, allocator="arena", gradient_checkpointing=True, optim="adamw")).total_bytes
    fixed_off = plan(SHAPE, _with(settings, allocator="fixed", gradient_checkpointing=False, optim="adamw"))
    assert arena_ckpt < fixed_off.total_bytes
    budget = dataclasses.replace(cfg.memory, memory_budget=f"{fixed_off.total_bytes // 2**20 + 1}MiB")
    cfg = dataclasses.replace(cfg, memory=budget)
    chosen, choices = choose_for_run(cfg, (), shape=SHAPE)
    assert _values(choices)["allocator"] == "arena" and chosen.memory.gradient_checkpointing
    _, without = choose_for_run(cfg, (), shape=SHAPE, arena_unavailable="no C++ compiler")
    assert _values(without)["allocator"] != "arena" and not without.settings.gradient_checkpointing
