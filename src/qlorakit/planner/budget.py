"""A training run's memory budget: its ``RunConfig`` as planner settings, the choices applied back to it.

``qlorakit train`` calls ``choose_for_run(cfg, given, device)`` before anything large is allocated:

- the budget is ``memory.memory_budget`` (``8GB``, ``6GiB``, ...) or, when empty, ``default_budget(device)``:
  the available memory (``hardware.available_memory``: ``MemAvailable`` on the CPU, the device's free memory
  on CUDA) minus ``MEMORY_BUDGET_MARGIN_FRACTION`` of it, at least ``MEMORY_BUDGET_MARGIN_MIN_BYTES``;
- ``given`` holds the ``section.field`` names the user set (flags, ``--config`` file); each knob of
  ``planner.choose`` that one of ``KNOB_FIELDS`` names is explicit and stays as given;
- the chosen values are written into the config (``apply_choices``), so ``config.yaml`` records them, and so is
  the budget (``<MiB>MiB`` when it was the default), which the trainer's heap guard reads (``train.allocator``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

from qlorakit.config import RunConfig
from qlorakit.constants import MEMORY_BUDGET_MARGIN_FRACTION, MEMORY_BUDGET_MARGIN_MIN_BYTES
from qlorakit.planner.choose import ALLOCATORS, Choices, choose
from qlorakit.planner.estimate import PlanSettings
from qlorakit.planner.format import parse_size
from qlorakit.planner.shapes import ModelShape, model_shape

#: knob of ``planner.choose`` -> the config fields that set it (any of them given makes the knob explicit).
KNOB_FIELDS: dict[str, tuple[str, ...]] = {
    "allocator": ("memory.malloc_mmap_threshold_kib", "memory.malloc_trim", "memory.malloc_trim_blocks",
                  "memory.arena"),
    "gradient_checkpointing": ("memory.gradient_checkpointing", "memory.checkpoint_blocks"),
    "optim": ("optim.optim", "optim.optim_budget"),
    "loss_chunk": ("memory.loss_chunk_tokens",),
}


def default_budget(device: str = "cpu") -> int:
    """Available memory minus the margin (see the module docstring); bytes."""
    from qlorakit.hardware import available_memory

    free = available_memory(device)
    return max(0, free - max(int(free * MEMORY_BUDGET_MARGIN_FRACTION), MEMORY_BUDGET_MARGIN_MIN_BYTES))


def settings_for(cfg: RunConfig, device: str = "cpu") -> PlanSettings:
    """The planner's view of ``cfg``: the longest example, the micro-batch, the adapters and the memory settings."""
    m = cfg.memory
    return PlanSettings(
        seq_len=cfg.data.seq_limit, batch_size=cfg.train.batch_size, lora_r=cfg.lora.r,
        lora_dropout=cfg.lora.dropout, optim=cfg.optim.optim, optim_budget_mib=cfg.optim.optim_budget,
        gradient_checkpointing=m.gradient_checkpointing, checkpoint_blocks=m.checkpoint_blocks,
        device="gpu" if device.startswith("cuda") else "cpu",
        compute_dtype=cfg.train.compute_dtype if cfg.train.compute_dtype != "auto" else _auto_dtype(device),
        loss_chunk=m.loss_chunk_tokens, mmap_threshold_kib=m.malloc_mmap_threshold_kib, malloc_trim=m.malloc_trim,
        recompute_swiglu=m.recompute_swiglu, fuse_lora=m.fuse_lora, quant=cfg.quant, grad_accum=cfg.train.grad_accum,
        full_finetune=cfg.full_finetune, rebuild_adapter_inputs=m.rebuild_adapter_inputs,
        fuse_rmsnorm=m.fuse_rmsnorm, malloc_trim_blocks=m.malloc_trim_blocks, arena=m.arena,
    )  # fmt: skip


def _auto_dtype(device: str) -> str:
    from qlorakit.hardware import auto_compute_dtype

    return str(auto_compute_dtype(device)).removeprefix("torch.")


def explicit_knobs(given: Collection[str]) -> set[str]:
    """The knobs the user set: those with a field in ``given`` (``section.field`` names)."""
    return {knob for knob, fields in KNOB_FIELDS.items() if any(f in given for f in fields)}


def apply_choices(cfg: RunConfig, settings: PlanSettings) -> RunConfig:
    """``cfg`` with the planner's knob values of ``settings`` written into its memory and optim sections."""
    memory = dataclasses.replace(cfg.memory, gradient_checkpointing=settings.gradient_checkpointing,
                                 checkpoint_blocks=settings.checkpoint_blocks, loss_chunk_tokens=settings.loss_chunk,
                                 malloc_trim=settings.malloc_trim,
                                 malloc_mmap_threshold_kib=settings.mmap_threshold_kib,
                                 malloc_trim_blocks=settings.malloc_trim_blocks, arena=settings.arena)  # fmt: skip
    optim = dataclasses.replace(cfg.optim, optim=settings.optim, optim_budget=settings.optim_budget_mib)
    return dataclasses.replace(cfg, memory=memory, optim=optim)


def choose_for_run(cfg: RunConfig, given: Collection[str], device: str = "cpu",
                   shape: ModelShape | None = None, arena_unavailable: str | None = None,
                   ) -> tuple[RunConfig, Choices]:  # fmt: skip
    """The run's config with the fastest memory settings that fit its budget, and the choices (raises
    ``planner.choose.PlanDoesNotFitError`` when the explicit settings cannot fit). ``shape`` defaults to the
    model's, read from its config alone; ``arena_unavailable`` says why the caching arena cannot be used here
    (``train.arena.unavailable_reason()``, which the caller asks: the planner does not import the trainer).
    Where it can be used it is the only allocator tried (glibc's heap of small blocks is there under every
    policy, so the fixed threshold saves only the arena's slack, measured 3%, for ~1.5 M page faults a step;
    a budget it cannot meet turns checkpointing on instead); an explicit allocator flag still wins."""
    budget = parse_size(cfg.memory.memory_budget) if cfg.memory.memory_budget else default_budget(device)
    shape = shape or model_shape(cfg.model, cfg.lora.targets)
    if arena_unavailable:
        unavailable = {("allocator", "arena"): arena_unavailable}
    else:  # the arena is as lean as the fixed threshold up to its slack and faster than every glibc policy
        unavailable = {("allocator", name): "the arena is available" for name in ALLOCATORS if name != "arena"}
    choices = choose(shape, settings_for(cfg, device), budget, explicit_knobs(given), unavailable)
    chosen = apply_choices(cfg, choices.settings)
    if not cfg.memory.memory_budget:  # the default budget, recorded for the heap guard and config.yaml
        chosen = dataclasses.replace(chosen, memory=dataclasses.replace(chosen.memory,
                                                                        memory_budget=f"{budget // 2**20}MiB"))
    return chosen, choices
