"""The plan as a table; memory sizes as people write them (``48GB``, ``24GiB``, ``512MB``) are read by
``config.parse_size``, re-exported here.

Units are strict: ``GB``/``MB``/``KB`` are powers of ten, ``GiB``/``MiB``/``KiB`` powers of two (a
"24 GB" GPU holds 24 GiB, so ``24GB`` is the conservative reading). The table prints MiB, as the QLoRA
paper's "MB".
"""

from __future__ import annotations

from qlorakit.config import parse_size
from qlorakit.planner.estimate import MemoryPlan

__all__ = ["format_plan", "mib", "parse_size"]  # parse_size lives in config (the trainer reads the budget too)


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f}"


def format_plan(p: MemoryPlan) -> str:
    """The human-readable breakdown ``qlorakit plan`` prints, ending with the verdict."""
    s = p.settings
    lines = [
        f"model     {p.model}",
        (f"settings  {s.device}, compute {s.compute}, batch {s.batch_size}{_pair_note(s)} x seq {s.seq_len}, "
         f"LoRA r {s.lora_r} "
        f"({s.lora_dtype}), {s.optim}, gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}"),
        "",
        f"{'part':<20}{'MiB':>12}  note",
    ]
    lines += [f"{part.name:<20}{mib(part.nbytes):>12}  {part.note}" for part in p.parts]
    lines.append(f"{'total':<20}{mib(p.total_bytes):>12}  ({p.total_bytes / 1e9:,.2f} GB)")
    alt = p.alternatives
    lines += [
        "",
        (f"quant constants with / without double quant: {mib(alt['quant_constants_with_double_quant'])} / "
        f"{mib(alt['quant_constants_without_double_quant'])} MiB"),
        (f"activations with / without checkpointing:    {mib(alt['activations_with_checkpointing'])} / "
        f"{mib(alt['activations_without_checkpointing'])} MiB"),
    ]
    if p.offloaded_bytes:
        lines.append(f"paged optimizer state outside the device:     {mib(p.offloaded_bytes)} MiB (host memory)")
    if s.device == "gpu":
        lines.append("not counted: the CUDA context and allocator fragmentation (keep some headroom)")
    elif s.arena:
        lines.append("not counted: in 16-bit, glibc's heap grows by about 4 MiB a step beside the arena (kernels "
                     "cached per shape; docs/memory.md)")
    elif s.mmap_threshold_kib == 0:
        lines.append("not counted: the glibc heap's growth over a run with the dynamic threshold (the total is the "
                     "first steps'; qlorakit train's heap guard fixes the threshold near its budget, docs/memory.md)")
    lines.append("")
    lines.append(verdict(p))
    return "\n".join(lines)


def verdict(p: MemoryPlan) -> str:
    if p.budget_bytes is None:
        return "verdict: no memory budget given (--gpu-mem)"
    spare = p.budget_bytes - p.total_bytes
    word = "FITS" if spare >= 0 else "DOES NOT FIT"
    return (f"verdict: {word} in {mib(p.budget_bytes)} MiB ({p.budget_bytes / 1e9:,.2f} GB): "
            f"{mib(abs(spare))} MiB {'spare' if spare >= 0 else 'short'}")


def _pair_note(s) -> str:
    return "" if s.method == "sft" else f" {s.method} pairs = {s.rows} rows (chosen + rejected)"
