"""The Triton kernels compile to cubins for sm_80 and sm_90 without a GPU (Triton's wheel ships ptxas).

The interpreter tests check what the kernels compute; this checks that the CUDA compiler accepts them
(types, dot shapes, constexpr branches), in a fresh process without ``TRITON_INTERPRET`` and with an
empty kernel cache, so every case is really compiled. Nothing is run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("triton_compile_check.py")


def test_kernels_compile_for_ampere_and_hopper(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, str(SCRIPT), "80", "90"], capture_output=True, text=True, env=env,
                          timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report) == 8 and all(r["cubin_bytes"] > 0 for r in report.values()), report
    for name in ("dequantize bf16", "gemv fp16", "matmul forward bf16 aligned"):  # no local-memory spills
        assert report[f"{name} sm_90"]["spill_store_bytes"] == 0, report
