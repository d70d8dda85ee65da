"""Every change training makes to the model or the process, in one table, applied by one ``apply``.

Each row of ``REWRITES`` names a rewrite, the config field that controls it, what it does, and how long it
lasts:

- ``undone on exit``: ``apply(model, cfg)`` returns an ``ExitStack``; leaving it (normally or by an
  exception) puts the model and the process back as they were: instance ``forward`` swaps are deleted
  (``train.patching``), fused ``lora_A`` modules are unfused, per-instance switches get their old values,
  checkpointing is switched off again and ``config.use_cache`` restored;
- ``process-wide, not undone``: glibc's mmap threshold (``train.allocator``); ``mallopt`` cannot be undone,
  and ``qlorakit train`` sets it before the model loads through the same ``fix_allocator`` (set only after
  loading, the training peak was bimodal; docs/memory.md), so the table's call repeats it (a no-op);
- ``applied at load``: the forward hooks ``models.loader`` puts on the fp32 norms of a 16-bit model
  (``models.build.keep_norm_outputs_in_input_dtype``); ``train`` never imports ``models``, so the row
  only names them and says whether the run's compute dtype implies them.

The trainer prints one line per row at the start of a run and writes the list to ``<run>/rewrites.json``
(``REWRITES_FILE``): name, flag, its value, lifetime, what it does and what was applied (e.g. ``5 groups``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlorakit.config import RunConfig, checkpointed_blocks
from qlorakit.fileio import write_json_atomic
from qlorakit.hardware import flush_denormals, resolve_dtype
from qlorakit.lora.fused import shared_input_fusion
from qlorakit.lora.layer import LoraLinear
from qlorakit.quant.linear import Linear4bit
from qlorakit.train import allocator, arena, varlen
from qlorakit.train.rebuild import decoder_layers, rebuild_adapter_inputs
from qlorakit.train.recompute import swiglu_recompute
from qlorakit.train.rmsnorm import fused_rmsnorm

UNDONE = "undone on exit"
PROCESS = "process-wide, not undone"
AT_LOAD = "applied at load"

#: The list of applied rewrites in a run directory.
REWRITES_FILE = "rewrites.json"

#: ``enter(model, cfg)``: a context manager that applies the rewrite and yields what it did, as a few words.
Enter = Callable[[nn.Module, RunConfig], AbstractContextManager[str]]


@dataclass(frozen=True)
class Rewrite:
    """One row of the table: ``flag`` is a ``section.field`` of ``RunConfig`` (None: always on)."""

    name: str
    flag: str | None
    does: str
    lifetime: str
    enter: Enter | None  # None: applied elsewhere (at load), listed here only


def fix_allocator(cfg: RunConfig) -> bool:
    """The one entry point to the process's allocators: the caching arena when ``memory.arena`` asks for it
    (``train.arena.install``) and glibc's mmap threshold. The CLI calls it before the model loads, ``apply``
    again (a repeat changes nothing); returns whether glibc took the threshold."""
    if cfg.memory.arena:
        arena.install()
    return allocator.fix_mmap_threshold(cfg.memory.malloc_mmap_threshold_kib)


@contextmanager
def _denormals(model: nn.Module, cfg: RunConfig) -> Iterator[str]:
    with flush_denormals():
        yield "on"


@contextmanager
def _allocator(model: nn.Module, cfg: RunConfig) -> Iterator[str]:
    kib = cfg.memory.malloc_mmap_threshold_kib
    took = fix_allocator(cfg)
    glibc = f"{kib} KiB" if took else ("glibc's dynamic threshold" if kib == 0 else "not glibc: unchanged")
    if cfg.memory.arena:
        glibc = ("caching arena for blocks of 64 KiB or more, " if arena.installed() else
                 f"caching arena unavailable ({arena.unavailable_reason() or 'build failed'}), ") + glibc
    yield glibc


@contextmanager
def _trim(model: nn.Module, cfg: RunConfig) -> Iterator[str]:
    with allocator.trim_after_each_step(cfg.memory.malloc_trim) as on:
        yield "after each optimizer step" if on else ("off" if not cfg.memory.malloc_trim else "not glibc: off")


@contextmanager
def _fusion(model: nn.Module, cfg: RunConfig) -> Iterator[str]:
    with shared_input_fusion(model, cfg.memory.fuse_lora) as groups:
        yield f"{len(groups)} groups"


@contextmanager
def _swiglu(model: nn.Module, cfg: RunConfig) -> Iterator[str]:
    with swiglu_recompute(model, cfg.memory.recompute_swiglu) as count:
        yield f"{count} MLPs"


@contextmanager
def _rmsnorm(model: nn.Module, cfg: RunConfig) -> Iterator[str]:
    with fused_rmsnorm(model, cfg.memory.fuse_rmsnorm) as count:
        yield f"{count} norms"


def _checkpointed(layers: list[nn.Module], cfg: RunConfig) -> int:
    """How many of the decoder blocks ``layers`` checkpointing recomputes (``config.checkpointed_blocks``)."""
    return checkpointed_blocks(cfg.memory.gradient_checkpointing, cfg.memory.checkpoint_blocks, len(layers))


@contextmanager
def _rebuild(model: nn.Module, cfg: RunConfig) -> Iterator[str]:
    m = cfg.memory  # checkpointing packs a block's saved tensors itself (train.rebuild): only the other blocks
    layers = decoder_layers(model)
    checkpointed = _checkpointed(layers, cfg)  # 0 without checkpointing
    rebuild = m.rebuild_adapter_inputs and (not m.gradient_checkpointing or checkpointed < len(layers))
    with rebuild_adapter_inputs(model, rebuild, m.malloc_trim_blocks, skip=checkpointed) as count:
        what = f"{count} blocks" if rebuild else ("off (checkpointing on)" if m.rebuild_adapter_inputs else "off")
        yield what + (", heap trimmed before each" if m.malloc_trim_blocks and count else "")


_UNSET = object()


@contextmanager
def instance_switch(modules: list[nn.Module], name: str, value: Any) -> Iterator[int]:
    """Set attribute ``name`` to ``value`` on each module; on exit restore each old instance value (or delete it)."""
    saved = [(module, vars(module).get(name, _UNSET)) for module in modules]
    for module in modules:
        setattr(module, name, value)
    try:
        yield len(modules)
    finally:
        for module, old in saved:
            if old is _UNSET:
                delattr(module, name)  # the class's value shows through again
            else:
                setattr(module, name, old)


def _switch(kind: type[nn.Module], name: str, flag: str) -> Enter:
    """``enter`` of a per-instance switch: ``name`` on every ``kind`` module is the config's ``flag``."""

    @contextmanager
    def enter(model: nn.Module, cfg: RunConfig) -> Iterator[str]:
        value = flag_value(cfg, flag)
        with instance_switch([m for m in model.modules() if isinstance(m, kind)], name, value) as count:
            yield f"{value} on {count} {kind.__name__}"

    return enter


def _is_checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


@contextmanager
def _checkpointing(model: nn.Module, cfg: RunConfig) -> Iterator[str]:
    if _is_checkpointing(model):
        yield "on (already; left on)"
        return
    if not cfg.memory.gradient_checkpointing:
        yield "off"
        return
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(model)
    checkpointed = _checkpointed(layers, cfg)
    for layer in layers[checkpointed:]:  # memory.checkpoint_blocks: these keep their activations
        layer.gradient_checkpointing = False
    try:
        yield "on" if checkpointed == len(layers) else f"on for the first {checkpointed} of {len(layers)} blocks"
    finally:
        model.activation_checkpointing_disable()
        model.disable_input_require_grads()  # the embedding hook that enabling added


@contextmanager
def _no_kv_cache(model: nn.Module, cfg: RunConfig) -> Iterator[str]:
    old = model.config.use_cache
    model.config.use_cache = False
    try:
        yield f"False (was {old})"
    finally:
        model.config.use_cache = old


@contextmanager
def _varlen_attention(model: nn.Module, cfg: RunConfig) -> Iterator[str]:
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    device = next(model.parameters()).device.type
    if not cfg.data.packing:
        yield "off"
        return
    if current != "sdpa" or device != "cpu":
        yield f"not applied ({current} attention on {device})"
        return
    config._attn_implementation = varlen.register()
    try:
        yield "sdpa -> SDPA per packed example"
    finally:
        config._attn_implementation = current


REWRITES: tuple[Rewrite, ...] = (
    Rewrite("flush_denormals", None, "fp32 denormals flushed to zero (x86 FTZ/DAZ): 5x faster CPU steps", UNDONE,
            _denormals),
    Rewrite("malloc_mmap_threshold", "memory.malloc_mmap_threshold_kib",
            "glibc returns freed blocks of this size or more to the OS (lower peak RSS); with memory.arena the "
            "caching arena serves torch's large CPU tensors", PROCESS, _allocator),
    Rewrite("malloc_trim", "memory.malloc_trim",
            "glibc's free heap pages returned to the OS after each optimizer step (a global step hook)", UNDONE,
            _trim),
    Rewrite("shared_input_fusion", "memory.fuse_lora",
            "q/k/v and gate/up share one LoRA A product (lora_A ModuleDict entries swapped)", UNDONE, _fusion),
    Rewrite("swiglu_recompute", "memory.recompute_swiglu",
            "SwiGLU MLP forward keeps gate/up, recomputes silu(gate) in backward", UNDONE, _swiglu),
    Rewrite("fused_rmsnorm", "memory.fuse_rmsnorm", "fp32 RMSNorm forward as one autograd function", UNDONE,
            _rmsnorm),
    Rewrite("rebuild_adapter_inputs", "memory.rebuild_adapter_inputs",
            "decoder blocks rebuild the norm outputs and SwiGLU product LoRA A's backward reads (no checkpointing)",
            UNDONE, _rebuild),
    Rewrite("fuse_up_projection", "memory.fuse_up_projection", "LoraLinear adds scale * u B^T with one addmm",
            UNDONE, _switch(LoraLinear, "fuse_up_projection", "memory.fuse_up_projection")),
    Rewrite("reuse_dequant_buffer", "memory.reuse_dequant_buffer",
            "Linear4bit's CPU matmul dequantizes into one reused buffer", UNDONE,
            _switch(Linear4bit, "reuse_dequant_buffer", "memory.reuse_dequant_buffer")),
    Rewrite("use_gemv", "memory.use_gemv", "Linear4bit runs few-row no-grad inputs through gemv_4bit", UNDONE,
            _switch(Linear4bit, "use_gemv", "memory.use_gemv")),
    Rewrite("gradient_checkpointing", "memory.gradient_checkpointing",
            "decoder layers recompute their activations in backward", UNDONE, _checkpointing),
    Rewrite("varlen_attention", "data.packing",
            "CPU sdpa attention runs on each packed example's span instead of a block-diagonal mask (train.varlen)",
            UNDONE, _varlen_attention),
    Rewrite("no_kv_cache", None, "model.config.use_cache = False (no KV cache while training)", UNDONE,
            _no_kv_cache),
    Rewrite("norm_output_dtype", "train.compute_dtype",
            "fp32 norms of a 16-bit model return their input's dtype (forward hooks, models.build)", AT_LOAD, None),
)


def flag_value(cfg: RunConfig, flag: str) -> Any:
    """The value of ``section.field`` in ``cfg``."""
    section, field_name = flag.split(".")
    return getattr(getattr(cfg, section), field_name)


def _at_load(cfg: RunConfig) -> str:
    """What ``models.loader`` did at load, as ``qlorakit train`` loads: hooks when the compute dtype is 16-bit."""
    sixteen_bit = resolve_dtype(cfg.train.compute_dtype) != torch.float32
    return "hooked at load (16-bit compute)" if sixteen_bit else "not applied (fp32 compute)"


class AppliedRewrites(ExitStack):
    """The ``ExitStack`` of ``apply``, with one record per row of ``REWRITES``."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict[str, Any]] = []

    def lines(self) -> list[str]:
        """One line per rewrite: name, flag=value, what was applied, lifetime."""
        out = []
        for r in self.records:
            flag = f"{r['flag']}={r['value']}" if r["flag"] else "always"
            out.append(f"rewrite {r['name']:<22} {flag:<40} {r['applied']:<32} [{r['lifetime']}]")
        return out

    def report(self, run_dir: Path) -> None:
        """Print ``lines()`` and write the records to ``<run_dir>/rewrites.json``."""
        for line in self.lines():
            print(line)
        write_json_atomic(Path(run_dir) / REWRITES_FILE, self.records)


def apply(model: nn.Module, cfg: RunConfig) -> AppliedRewrites:
    """Apply every row of ``REWRITES`` in order; ``with apply(model, cfg) as applied:`` undoes them on exit."""
    stack = AppliedRewrites()
    try:
        for rewrite in REWRITES:
            applied = _at_load(cfg) if rewrite.enter is None else stack.enter_context(rewrite.enter(model, cfg))
            stack.records.append({"name": rewrite.name, "flag": rewrite.flag,
                                  "value": flag_value(cfg, rewrite.flag) if rewrite.flag else None,
                                  "lifetime": rewrite.lifetime, "does": rewrite.does, "applied": applied})
    except BaseException:
        stack.close()
        raise
    return stack
