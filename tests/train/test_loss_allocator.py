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
