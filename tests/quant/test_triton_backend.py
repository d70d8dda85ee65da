"""Backend selection: CPU tensors never reach Triton, Triton is optional, and nothing imports it early."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from qlorakit.quant import backends


def test_cpu_tensors_use_the_reference_path():
    assert backends.select("cpu") is None
    assert backends.select(torch.device("cpu")) is None


def test_disable_variable_keeps_cuda_on_the_reference_path(monkeypatch):
    monkeypatch.setenv(backends.DISABLE_ENV, "1")
    assert backends.select("cuda") is None
    assert backends.select("cuda:0") is None


_CHILD = """
import sys
import qlorakit, qlorakit.quant, qlorakit.models, qlorakit.train, qlorakit.lora, qlorakit.cli.main
print("imported_triton", "triton" in sys.modules)
sys.modules["triton"] = None  # as if triton were not installed
from qlorakit.quant import backends
print("problem", backends._triton_problem())
"""


def test_package_never_imports_triton_and_names_the_missing_extra():
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120, check=True).stdout
    assert "imported_triton False" in out
    assert "pip install 'qlorakit[gpu]'" in out


@pytest.mark.gpu
def test_cuda_selects_the_triton_kernels():
    pytest.importorskip("triton")
    from qlorakit.quant.backends import triton_ops

    assert backends.available() and backends.unavailable_reason() is None
    assert backends.select("cuda") is triton_ops
