"""What the machine can do: CPU feature flags, the compute dtype it runs well, and memory readings."""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch

#: CPU flags that decide bf16/fp32 speed on x86 (shown in benchmark output).
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@cache
def cpu_flags() -> frozenset[str]:
    """The flags line of /proc/cpuinfo (empty where it does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def speed_flags() -> dict[str, bool]:
    flags = cpu_flags()
    return {name: name in flags for name in SPEED_FLAGS}


def cpu_runs_bf16_well() -> bool:
    """True on CPUs with AVX512_BF16 or AMX (bf16 matmul faster than fp32); False on AVX2-only CPUs."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_compute_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """bfloat16 where the hardware runs it well (CUDA with bf16 support, or a bf16-capable CPU), else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_runs_bf16_well() else torch.float32


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """``"auto"`` / ``"float32"`` / ``"bfloat16"`` / ``"float16"`` -> torch dtype."""
    if name == "auto":
        return auto_compute_dtype(device)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    """Current resident memory of this process in MiB (from /proc/self/statm; 0 where unavailable)."""
    try:
        with open("/proc/self/statm", encoding="utf-8") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes a new allocation can get: ``MemAvailable`` of /proc/meminfo on the CPU (0 where unreadable), the
    free memory of the device on CUDA (``torch.cuda.mem_get_info``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Flush fp32 denormals to zero inside the block (x86 FTZ/DAZ), then switch it off again.

    Denormal arithmetic is microcoded on x86 and dozens of times slower; measured on SmolLM2 with NF4 +
    LoRA in fp32 on CPU, a forward of 4 x 256 tokens took 27 s with denormals and 5 s flushed. Values
    below 1.2e-38 carry no signal for training, and GPUs flush them in the same kernels.
    """
    enabled = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if enabled:
            torch.set_flush_denormal(False)
