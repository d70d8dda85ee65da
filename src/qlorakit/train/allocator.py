"""Keep the C allocator from holding freed activation buffers: a fixed glibc mmap threshold while training.

glibc's ``malloc`` serves a request of at least ``M_MMAP_THRESHOLD`` bytes with its own ``mmap`` and
returns it to the kernel on ``free``. The threshold starts at 128 KiB but is *dynamic*: each time an
mmapped block is freed, the threshold rises to that block's size (up to 32 MiB on 64-bit). A training
step allocates and frees activations of many sizes, so after the first step most of them come from the
heap instead, and freed heap memory in the middle of the heap is not returned: the process's resident
set grows to several times the live tensors. Measured on SmolLM2-135M (NF4 + LoRA r 16, fp32, 2 x 512
tokens, gradient checkpointing, chunked loss): peak RSS 3038 MiB with the dynamic threshold, 968 MiB
with a fixed 128 KiB one (``benchmarks/train_throughput.py`` measures it against the peer stack).

``mallopt(M_MMAP_THRESHOLD, n)`` fixes the threshold (and turns the dynamic adjustment off) for the
whole process; large buffers then cost an ``mmap``/``munmap`` and fresh zeroed pages each time. Setting it
is a no-op outside glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

#: ``M_MMAP_THRESHOLD`` of glibc's ``<malloc.h>``.
_M_MMAP_THRESHOLD = -3


def fix_mmap_threshold(kib: int) -> bool:
    """Serve every allocation of ``kib`` KiB or more by ``mmap`` (returned at ``free``); True if glibc took it.

    ``kib`` 0 leaves the allocator alone. The setting lasts for the process (glibc cannot undo it).
    """
    if kib <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 — only glibc has it (musl's mallopt is a stub)
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(kib * 1024)))
