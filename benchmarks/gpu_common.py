"""Shared pieces of the GPU benchmarks (``gpu_kernels.py``, ``gpu_train.py``): device checks, datasheet
peaks, CUDA-event timing of alternating repeats, and the run's environment.

Datasheet peaks are vendor numbers (dense, no sparsity) matched on ``torch.cuda.get_device_name()``;
each benchmark also measures what the device reaches with a plain copy / a plain bf16 matmul in the same
run and reports both fractions. ``--peak-gbs`` / ``--peak-tflops`` override the datasheet value.
"""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from _harness import git_head

#: (words of the device name, HBM GB/s, dense bf16 TFLOP/s), from the vendors' datasheets; the key must
#: appear as whole words of ``torch.cuda.get_device_name()`` (so "A10" does not match "A10G" or "A100").
DATASHEET = (
    ("H100 PCIe", 2000.0, 756.0),
    ("H100 NVL", 3900.0, 835.0),
    ("H100 80GB HBM3", 3350.0, 989.0),  # SXM5
    ("H200", 4800.0, 989.0),
    ("A100-SXM4-80GB", 2039.0, 312.0),
    ("A100 80GB PCIe", 1935.0, 312.0),
    ("A100-SXM4-40GB", 1555.0, 312.0),
    ("A100-PCIE-40GB", 1555.0, 312.0),
    ("L40S", 864.0, 362.0),
    ("L4", 300.0, 121.0),
    ("A10", 600.0, 125.0),
    ("RTX 4090", 1008.0, 165.0),
)


def no_cuda_message(script: str) -> str | None:
    """None when a CUDA device is visible; otherwise the sentence to print before exiting."""
    import torch

    if torch.cuda.is_available():
        return None
    return (f"{script}: no CUDA device is visible to torch ({torch.__version__}); nothing was measured. "
            "Run it on a machine with an NVIDIA GPU and a CUDA build of torch.")  # fmt: skip


def datasheet_peak(device_name: str) -> tuple[float | None, float | None]:
    """(HBM GB/s, dense bf16 TFLOP/s) of the ``DATASHEET`` entry named in ``device_name``, else (None, None)."""
    padded = f" {device_name} "
    for key, gbs, tflops in DATASHEET:
        if f" {key} " in padded:
            return gbs, tflops
    return None, None


def time_ms(fn: Callable[[], Any], iters: int) -> float:
    """Mean milliseconds of ``fn()`` over ``iters`` calls between two CUDA events (after one untimed call)."""
    import torch

    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def peak_extra_mib(fn: Callable[[], Any]) -> float:
    """MiB allocated by one ``fn()`` call at its peak, beyond what was allocated before it."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak / 2**20


def alternate(fns: dict[str, Callable[[], Any]], repeats: int, iters: int) -> dict[str, list[float]]:
    """Milliseconds per call of each function, ``repeats`` times, in turn (a, b, a, b, ...)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_ms(fn, iters))
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def copy_bandwidth_gbs(gib: float = 1.0, iters: int = 10) -> float:
    """Device-to-device copy GB/s (read + write) of a ``gib`` GiB buffer: what a plain copy reaches."""
    import torch

    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = min(time_ms(lambda: dst.copy_(src), iters) for _ in range(3))
    return 2 * n / (ms * 1e-3) / 1e9


def matmul_tflops(n: int = 8192, iters: int = 10) -> float:
    """bf16 ``n x n`` matmul TFLOP/s, best of three: what a plain torch matmul reaches."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = min(time_ms(lambda: a @ b, iters) for _ in range(3))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Device, driver-visible CUDA version, package versions and the git commit, for the JSON."""
    import torch

    env: dict[str, Any] = {
        "versions": {p: _version(p) for p in ("torch", "triton", "transformers", "peft", "bitsandbytes", "qlorakit")},
        "python": sys.version.split()[0],
        "qlorakit_git_head": git_head(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {"device": props.name, "device_memory_gib": props.total_memory / 2**30,
                "sm_count": props.multi_processor_count, "torch_cuda": torch.version.cuda}  # fmt: skip
    return env
