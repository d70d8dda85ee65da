"""The allocator setting the trainer applies: glibc takes a fixed mmap threshold, 0 leaves it alone."""

from __future__ import annotations

import platform
import sys

import pytest

from qlorakit.train.allocator import fix_mmap_threshold


def test_zero_leaves_the_allocator_alone():
    assert fix_mmap_threshold(0) is False


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_accepts_a_fixed_threshold():
    assert fix_mmap_threshold(128) is True


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_trim_runs_after_every_optimizer_step_inside_the_block_only(monkeypatch):
    import torch

    from qlorakit.train import allocator

    calls = []
    monkeypatch.setattr(allocator, "trim_heap", lambda: calls.append(1) or True)
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    with allocator.trim_after_each_step(True) as on:
        assert on
        for _ in range(3):
            weight.sum().backward()
            optimizer.step()
    optimizer.step()  # outside: the hook is gone
    assert len(calls) == 3
    with allocator.trim_after_each_step(False) as on:
        optimizer.step()
    assert not on and len(calls) == 3
