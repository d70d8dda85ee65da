"""Shared test setup: CPU, fp32, deterministic; paths to the shared data and model; the tiny Llama directory."""

import os
from pathlib import Path

# bitsandbytes wraps some CPU fallbacks in torch.compile; compiling per test shape only costs time.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
# qlorakit's caching arena (train.arena) replaces torch's CPU allocator for the rest of a process and cannot be
# taken out again: a test that runs `qlorakit train` in this process would switch every later test to it. So it
# is off here; tests/train/test_arena.py runs it in child processes with QLORAKIT_ARENA=1.
os.environ.setdefault("QLORAKIT_ARENA", "0")

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


@pytest.fixture(scope="session")
def save_tiny_llama(tmp_path_factory):
    """``save_tiny_llama(name, tokenizer=None, **overrides) -> directory``: a new temporary directory holding a
    random tiny Llama (seed 0; ``tests.helpers.tiny_llama`` with ``overrides``) and ``tokenizer`` if given."""
    from tests.helpers.tiny_llama import save_tiny_llama as save

    return lambda name, tokenizer=None, **overrides: save(tmp_path_factory.mktemp(name), tokenizer, **overrides)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)
