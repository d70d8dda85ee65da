"""A caching arena for torch's CPU tensors: fast like glibc's dynamic threshold, lean like a fixed one.

Neither glibc policy is both (docs/memory.md). With a fixed 1 MiB mmap threshold every large tensor is fresh
``mmap`` pages, freed with ``munmap``: ~1.5 M page faults and ~3 s of system time per SmolLM2 step at 2 x 512
tokens. With the dynamic threshold the blocks come from glibc's heap, where the freed activations lie between
small long-lived objects and are refilled only by requests that fit: the resident heap grows step after step
(the creep of "Over a whole run").

The arena (``csrc/arena.cpp``, compiled on first use against the installed torch and made torch's CPU
allocator with ``c10::SetCPUAllocator``) serves every request of at least ``MIN_BYTES``:

- round the request ``n`` up to a page: ``s = 4096 ceil(n / 4096)``;
- take the free block of least size ``>= s`` (lowest address among equals), split off the remainder, which
  stays free; with none, map a new segment of ``max(s, SEGMENT_BYTES)`` and carve it the same way;
- on free, merge the block with its free neighbours in the same segment and keep it; nothing is unmapped
  until ``trim()``, which returns the wholly free segments (the arena also trims, and tries once more, when
  mapping a new segment fails).

So the resident memory is the arena's ``mapped`` bytes, at most the peak of live tensor bytes plus what
best fit cannot place (``peak_mapped - peak_live``; measured on SmolLM2 at 2 x 512 tokens, bf16: 1,244 MiB
mapped for a live peak of 1,215), and a step that repeats the last one's requests faults no page in. Requests
under ``MIN_BYTES`` (Python's objects, small tensors) stay with glibc, whose heap then holds little that
fragments. ``QLORAKIT_ARENA=0`` keeps it off; a machine without a C++ compiler, or not Linux, gets
``unavailable_reason()`` and glibc's policies.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

#: Requests of this many bytes or more come from the arena; smaller ones from glibc.
MIN_BYTES = 64 * 1024
#: Size of a new segment (a larger request gets a segment of its own size).
SEGMENT_BYTES = 32 * 2**20
#: Set to "0" to keep torch's default CPU allocator.
ARENA_ENV = "QLORAKIT_ARENA"
SOURCE_PACKAGE, SOURCE = "qlorakit.train", "csrc/arena.cpp"
CXXFLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC")

_library: ctypes.CDLL | None = None
_build_error: str | None = None  # why the last install could not build or load the library


@dataclass(frozen=True)
class ArenaStats:
    """Bytes live in tensors and mapped by the arena (now and at their peaks), and how requests were served."""

    live: int
    mapped: int
    peak_live: int
    peak_mapped: int
    reused: int  # requests served from a free block
    segments_mapped: int  # requests that mapped a new segment


def compiler() -> str | None:
    """The C++ compiler: ``$CXX`` (default ``c++``) on PATH, else ``g++``, else ``None``."""
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def unavailable_reason() -> str | None:
    """Why the arena cannot be used here, or None."""
    if os.environ.get(ARENA_ENV, "1") == "0":
        return f"{ARENA_ENV}=0"
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform})"
    if _library is None and compiler() is None:
        return "no C++ compiler (c++/g++) on PATH"
    return None if _library is not None or _build_error is None else f"build failed: {_build_error}"


def _load() -> ctypes.CDLL:
    """Build the library once per source, flags and torch (``cpu_build``'s cache and atomic build) and load it."""
    import torch

    from qlorakit.quant.backends.cpu_build import cache_dir, cache_key, compile_library

    root = Path(torch.__file__).parent
    sources = {"arena.cpp": (resources.files(SOURCE_PACKAGE) / SOURCE).read_text(encoding="utf-8")}
    flags = [*CXXFLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", f"-I{root / 'include'}"]
    libraries = [f"-L{root / 'lib'}", "-lc10", f"-Wl,-rpath,{root / 'lib'}"]
    target = cache_dir() / f"arena-{cache_key(sources, flags + libraries, f'torch {torch.__version__}')}.so"
    if not target.is_file():
        cxx = compiler()
        if cxx is None:
            raise OSError("no C++ compiler (c++/g++) on PATH")
        compile_library(sources, target, cxx, flags, libraries)
    library = ctypes.CDLL(str(target))
    library.qlk_arena_install.argtypes, library.qlk_arena_install.restype = [ctypes.c_int64] * 2, ctypes.c_int
    library.qlk_arena_stats.argtypes, library.qlk_arena_stats.restype = [ctypes.c_void_p], None
    library.qlk_arena_trim.argtypes, library.qlk_arena_trim.restype = [], ctypes.c_int64
    return library


def install() -> bool:
    """Make the arena torch's CPU allocator for the rest of the process (idempotent); True if it is.

    Call it before the model loads so that the weights and every later tensor come from it. Failing to build
    warns and returns False: the process keeps torch's allocator (glibc's policies, ``train.allocator``)."""
    global _library, _build_error
    if _library is not None:
        return True
    reason = unavailable_reason()
    if reason is not None:
        return False
    try:
        library = _load()
    except (OSError, subprocess.CalledProcessError) as exc:
        lines = str(getattr(exc, "stderr", "") or exc).strip().splitlines()
        _build_error = lines[-1] if lines else type(exc).__name__
        warnings.warn(f"qlorakit: the CPU arena is unavailable ({_build_error}); using glibc's allocator",
                      stacklevel=2)
        return False
    library.qlk_arena_install(MIN_BYTES, SEGMENT_BYTES)
    _library = library
    return True


def installed() -> bool:
    return _library is not None


def stats() -> ArenaStats | None:
    """The arena's counters, or None when it is not installed."""
    if _library is None:
        return None
    out = (ctypes.c_int64 * 6)()
    _library.qlk_arena_stats(out)
    return ArenaStats(*out)


def trim() -> int:
    """Unmap the arena's wholly free segments; the bytes given back (0 when it is not installed)."""
    return int(_library.qlk_arena_trim()) if _library is not None else 0
