"""Memory per rank of an N-rank job (``qlorakit plan --world-size N --distributed ddp|fsdp``).

``settings.batch_size`` is the micro-batch of the whole job (as ``train.batch_size``); each rank runs
``B / N`` of it, so the per-batch parts (``activations``, ``logits``, the CPU heap rows) are those of the
one-process plan at ``B / N``.

- ``ddp``: every rank holds the whole model and state, plus ``allreduce_buffer``: the flat copy of the adapter
  gradients that is summed over the ranks (``parallel.replicas``) — ``lora_grads`` bytes once more.
- ``fsdp`` (the layout ``--distributed fsdp`` trains with, ``parallel.fsdp``; the padding of the 4-bit rows to
  whole double-quantization groups per rank, 2.8 % for SmolLM2 on 2 ranks, is not counted): ``weights_4bit``,
  ``quant_constants``, ``lora_params``, ``lora_grads`` and ``optimizer_state`` are divided by ``N`` (rounded
  up), and ``fsdp_gathered_blocks`` adds the all-gathered
  4-bit weights, constants and adapters of two decoder blocks at a time (the one computing and the one
  prefetched): ``2 (weights_4bit + quant_constants + lora_params) / L``. Embeddings, head and norms stay
  whole on every rank.
"""

from __future__ import annotations

import dataclasses

from qlorakit.errors import ConfigError
from qlorakit.planner.estimate import MemoryPlan, Part, PlanSettings, plan
from qlorakit.planner.shapes import ModelShape

STRATEGIES = ("ddp", "fsdp")
SHARDED = ("weights_4bit", "quant_constants", "lora_params", "lora_grads", "optimizer_state")
#: Decoder blocks whose sharded parts are all-gathered at once under FSDP (computing + prefetched).
GATHERED_BLOCKS = 2


def per_rank_plan(shape: ModelShape, settings: PlanSettings, world_size: int, strategy: str,
                  budget_bytes: int | None = None) -> MemoryPlan:
    """The plan of one rank of ``world_size`` (see the module docstring)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"--distributed {strategy!r}: choose one of {STRATEGIES}")
    if world_size < 1 or settings.batch_size % world_size:
        raise ConfigError(f"--batch {settings.batch_size} (the job's micro-batch) is not divisible by --world-size "
                          f"{world_size}: each rank runs batch / world-size sequences")
    local = dataclasses.replace(settings, batch_size=settings.batch_size // world_size)
    whole = plan(shape, local, budget_bytes)
    if world_size == 1:
        return whole
    parts = list(whole.parts)
    if strategy == "ddp":
        parts.append(Part("allreduce_buffer", whole.part("lora_grads"),
                          f"the adapter gradients as one flat buffer, summed over {world_size} ranks"))
    else:
        parts = [dataclasses.replace(p, nbytes=-(-p.nbytes // world_size), note=f"{p.note}; 1/{world_size} per rank")
                 if p.name in SHARDED else p for p in parts]
        per_block = sum(whole.part(n) for n in ("weights_4bit", "quant_constants", "lora_params")) // shape.num_layers
        parts.append(Part("fsdp_gathered_blocks", GATHERED_BLOCKS * per_block,
                          f"{GATHERED_BLOCKS} decoder blocks all-gathered at once (computing + prefetched)"))
    name = f"{whole.model} (one of {world_size} ranks, {strategy}, {local.batch_size} sequences per rank)"
    return dataclasses.replace(whole, model=name, parts=tuple(parts))
