"""Accelerated backends of the 4-bit matmul; the reference path is ``qlorakit.quant.functional`` itself.

The one dispatch point for compiled kernels; two backends exist:

- ``select(device)``: Triton kernels for CUDA tensors (``triton_ops``: dequantize, fused
  dequantize-matmul for ``y = x W^T`` and ``dx = dy W``, batch-1 GEMV). It returns the backend module or
  ``None`` (then callers use the pure-torch path): ``None`` for every non-CUDA device, when Triton does not
  import, or when ``QLORAKIT_DISABLE_TRITON=1`` asks for the reference path (benchmarks use it to compare
  both in one run). Triton is an optional extra (``pip install 'qlorakit[gpu]'``); nothing imports it until
  ``select`` is asked for a CUDA device, so the package and its CPU path work without it.
- ``native_cpu()``: the C kernels of ``quant/csrc`` for CPU tensors (``cpu_native``: batch-1 4-bit GEMV,
  4-bit dequantize, dense GEMV), built with the system C compiler on first use (``cpu_build``). It returns
  the loaded ``CpuKernels`` or ``None`` (then callers use the pure-torch path: same results, slower):
  ``None`` when ``QLORAKIT_NATIVE=0``, off x86-64, or when no C compiler is found or the build fails.
"""

from __future__ import annotations

import importlib
import os
import warnings
from functools import cache
from types import ModuleType

import torch

from qlorakit.quant.backends import cpu_native

#: Set to "1" to keep CUDA tensors on the pure-torch path.
DISABLE_ENV = "QLORAKIT_DISABLE_TRITON"


@cache
def _triton_problem() -> str | None:
    """Why the Triton backend cannot load, or None when it can (imports triton on first call)."""
    try:
        importlib.import_module("qlorakit.quant.backends.triton_ops")
    except ImportError as exc:
        return f"triton does not import ({exc}); install it with pip install 'qlorakit[gpu]'"
    return None


def unavailable_reason() -> str | None:
    """Why ``available()`` is False (None when it is True)."""
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    return _triton_problem()


def available() -> bool:
    """True when a CUDA device is visible and the Triton kernels import."""
    return unavailable_reason() is None


def select(device: torch.device | str) -> ModuleType | None:
    """The backend module for tensors on ``device``, or None for the pure-torch path."""
    if torch.device(device).type != "cuda" or os.environ.get(DISABLE_ENV) == "1":
        return None
    problem = _triton_problem()
    if problem is not None:
        _warn_once(problem)
        return None
    return importlib.import_module("qlorakit.quant.backends.triton_ops")


def native_cpu() -> cpu_native.CpuKernels | None:
    """The compiled CPU kernels (built on first use), or None for the pure-torch path."""
    return cpu_native.load()


@cache
def _warn_once(problem: str) -> None:
    warnings.warn(f"4-bit matmuls on CUDA use the slower pure-torch path: {problem}", stacklevel=3)
