"""Shared test setup: CPU, fp32, deterministic; paths to the shared data and model."""

import os
from pathlib import Path

# bitsandbytes wraps some CPU fallbacks in torch.compile; compiling per test shape only costs time.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import pytest
import torch

# Without CUDA the Triton kernels run under Triton's interpreter, which must be switched on before triton
# is first imported (bitsandbytes imports it); torch itself does not import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)
