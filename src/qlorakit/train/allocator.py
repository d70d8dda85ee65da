"""Keep the C allocator from holding freed activation buffers: a fixed glibc mmap threshold while training.

glibc's ``malloc`` serves a request of at least ``M_MMAP_THRESHOLD`` bytes with its own ``mmap`` and
returns it to the kernel on ``free``. The threshold starts at 128 KiB but is *dynamic*: each time an
mmapped block is freed, the threshold rises to that block's size (up to 32 MiB on 64-bit). A training
step allocates and frees activations of many sizes, so after the first step most of them come from the
heap instead, and freed heap memory in the middle of the heap is not returned: the process's resident
set grows to several times the live tensors. Measured on SmolLM2-135M (NF4 + LoRA r 16, fp32, 2 x 512
tokens of the OASST1 sample, chunked loss, fused LoRA), peak RSS of three micro-batches:

    threshold            dynamic (glibc)   32 MiB   8 MiB   1 MiB   128 KiB
    checkpointing on     -                 2564     2304    1078    968 (random tokens)
    checkpointing off    4720              -        -       2298    2030 (random tokens)

``mallopt(M_MMAP_THRESHOLD, n)`` fixes the threshold (and turns the dynamic adjustment off) for the
whole process; every buffer above it then costs an ``mmap``/``munmap`` and fresh zeroed pages, i.e. page
faults: at 128 KiB a profiled step took 56 s against 40 s with the dynamic threshold (elementwise ops
4x slower) on this 2-core VM under load; 1 MiB keeps most of the saving for fewer faults. Still, at 1 MiB a
2 x 512-token step (checkpointing off) took 2.0 M minor faults, 2.7-3.4 s of system time in a 12 s step,
against 0.1 s with the dynamic threshold; 4 MiB already lost the saving (3,153 MiB). So the trainer cuts
the step's full-size temporaries instead (fused LoRA up-projection, SwiGLU recompute, fused RMSNorm, a
reused dequantization buffer; docs/benchmarks.md, issue 8). ``MemoryConfig.malloc_mmap_threshold_kib``
defaults to 1 MiB (0 leaves glibc alone); ``qlorakit train`` picks 0 (glibc's dynamic threshold: 1.26x less
CPU time per step, 1.7x the peak RSS on SmolLM2 at 512 x 2 tokens) whenever the planner predicts that it fits
the run's memory budget (``planner.choose``; the measurements of ``benchmarks/allocator_policies.py`` are in
docs/memory.md, with the candidates that did not help: transparent huge pages, ``malloc_trim`` after each step).
``trim_after_each_step`` is ``memory.malloc_trim``: ``malloc_trim(0)`` after each optimizer step returns the
heap's free pages between steps (not at the peak, which is inside the step). ``memory.malloc_trim_blocks``
calls ``trim_heap`` before each decoder block's forward instead (``train.rebuild``; the budget's
``dynamic-trim-blocks``): without checkpointing the dynamic threshold's heap holds 0.5-0.8 GB of freed forward
temporaries at the peak on SmolLM2 at 2 x 512 tokens, and trimming as they form cut the peak from 2,560 to
1,975 MiB for 0.6-0.7 M page faults a step (docs/memory.md). No-op outside glibc.
``HeapGuard`` bounds what the dynamic threshold costs over a long run. Its heap does not stop growing at the
first step: on the README's run (SmolLM2-135M, bf16 compute, 4 packed rows of 512 tokens, no checkpointing)
the peak RSS rose from 3,900 MiB after step 1 to 4,902 after step 10 and 7,709 after step 49 (docs/memory.md),
while the live tensors at the end of each step stayed near 1.1 GB. So after every optimizer step the guard
compares the peak RSS plus the last step's rise with the run's memory budget (``memory.memory_budget``, which
``qlorakit train`` always fills in). When the next step could cross it, the guard fixes the threshold at
``GUARD_THRESHOLD_KIB``: the budget chooser's ``fixed`` allocator, whose peak does not creep. It then returns the
free heap and tells the trainer, once. A library caller without a budget gets no guard.
Its one entry point is ``train.rewrites.fix_allocator``: ``qlorakit train`` calls it before the model loads and
``train()``'s rewrite table again (a repeat changes nothing): set only after loading, the same threshold left
the training peak bimodal across identical runs (docs/memory.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from qlorakit.config import MemoryConfig
from qlorakit.train import arena as caching_arena

#: ``M_MMAP_THRESHOLD`` of glibc's ``<malloc.h>``.
_M_MMAP_THRESHOLD = -3
#: The fixed threshold ``HeapGuard`` switches to: the trainer's default (``planner.choose``'s ``fixed`` allocator).
GUARD_THRESHOLD_KIB = MemoryConfig().malloc_mmap_threshold_kib


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 — only glibc has it (musl's mallopt is a stub)
    except (OSError, AttributeError):
        return None
    return libc


def trim_heap() -> bool:
    """``malloc_trim(0)``: give every free page of glibc's heaps back to the OS; True if glibc released memory."""
    libc = _glibc()
    return bool(libc.malloc_trim(ctypes.c_size_t(0))) if libc is not None else False


@contextmanager
def trim_after_each_step(enabled: bool) -> Iterator[bool]:
    """Inside the block, ``trim_heap()`` after every ``torch.optim.Optimizer.step`` (a global step hook, removed
    on exit); yields whether it is on (``enabled`` and glibc)."""
    if not enabled or _glibc() is None:
        yield False
        return
    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: trim_heap())
    try:
        yield True
    finally:
        handle.remove()


def fix_mmap_threshold(kib: int) -> bool:
    """Serve every allocation of ``kib`` KiB or more by ``mmap`` (returned at ``free``); True if glibc took it.

    ``kib`` 0 leaves the allocator alone. The setting lasts for the process (glibc cannot undo it).
    """
    libc = _glibc() if kib > 0 else None
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(kib * 1024))) if libc is not None else False


@dataclass
class HeapGuard:
    """After each optimizer step: once the peak RSS plus the last step's rise reaches ``budget_bytes``, switch
    glibc to the fixed threshold and return the free heap (module docstring). ``peak_bytes`` reads the process's
    high-water mark; ``switch`` makes the switch and says whether glibc took it (injected by tests)."""

    budget_bytes: int
    peak_bytes: Callable[[], int]
    switch: Callable[[], bool]
    last_peak: int = 0
    switched_at: int | None = None  # the step after which the threshold was fixed

    def after_step(self, step: int) -> str | None:
        """The message of the switch when this step makes it, else None."""
        now = self.peak_bytes()
        rise, self.last_peak = (max(now - self.last_peak, 0) if self.last_peak else 0), now
        if self.switched_at is not None or now + rise < self.budget_bytes:
            return None
        self.switched_at = step
        took = self.switch()
        mib = 2**20
        what = (f"glibc's mmap threshold fixed at {GUARD_THRESHOLD_KIB} KiB from the next step and the free heap "
                "returned" if took else "glibc did not take the fixed threshold (not glibc?); nothing changed")
        return (f"heap guard: peak RSS {now / mib:,.0f} MiB + the last step's rise {rise / mib:,.0f} MiB "
                f"reaches the memory budget of {self.budget_bytes / mib:,.0f} MiB; {what}")


def switch_to_fixed_threshold() -> bool:
    """``HeapGuard``'s switch: the fixed ``GUARD_THRESHOLD_KIB`` threshold, then ``trim_heap``."""
    took = fix_mmap_threshold(GUARD_THRESHOLD_KIB)
    trim_heap()
    return took


def heap_guard(budget_bytes: int | None, mmap_threshold_kib: int, on_cpu: bool,
               arena: bool = False) -> HeapGuard | None:  # fmt: skip
    """The guard of a run: only with a budget, glibc's dynamic threshold (``mmap_threshold_kib`` 0), on the CPU
    (a GPU's budget is device memory) and under glibc; None otherwise, and None when the run asks for the caching
    arena (``arena``) and it can serve them (``train.arena``: installed, or buildable here before the model loads):
    glibc then holds no tensor block that could creep."""
    if arena and caching_arena.unavailable_reason() is None:
        return None
    if not budget_bytes or mmap_threshold_kib != 0 or not on_cpu or _glibc() is None:
        return None
    from qlorakit.hardware import peak_rss_mb

    return HeapGuard(budget_bytes, lambda: int(peak_rss_mb() * 2**20), switch_to_fixed_threshold)
