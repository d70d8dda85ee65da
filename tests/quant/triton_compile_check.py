"""Compile each Triton kernel for CUDA architectures on a machine without a GPU; prints one JSON line.

Run as a script by ``test_triton_compile.py`` in a process without ``TRITON_INTERPRET`` (the interpreter
replaces the kernels with Python functions that cannot be compiled). Triton's wheel carries ``ptxas``, so
this reaches a cubin: it catches type, shape and constexpr errors that the interpreter lets through. It
runs nothing. Signatures come from ``benchmarks/gpu_kernel_resources.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from gpu_kernel_resources import FORMAT, compile_kernel, ptxas_report

SMALL_MATMUL = {"BLOCK_M": 64, "BLOCK_P": 64, "BLOCK_R": 32}
CASES = {
    "dequantize bf16": ("dequantize", "bf16", FORMAT | {"ROWS": 64}),
    "gemv fp16": ("gemv", "fp16", FORMAT | {"K_ALIGNED": True, "BLOCK_N": 8, "BLOCK_B": 128}),
    "matmul forward bf16 aligned": (
        "matmul", "bf16", FORMAT | SMALL_MATMUL | {"FORWARD": True, "K_ALIGNED": True, "PRECISION": "tf32"}),
    "matmul grad_input fp32 straddling": (
        "matmul", "fp32", FORMAT | SMALL_MATMUL | {"FORWARD": False, "K_ALIGNED": False, "PRECISION": "ieee"}),
}  # fmt: skip


def main(archs: list[int]) -> dict[str, dict[str, int]]:
    """``"<case> sm_<arch>"`` -> cubin size in bytes; on sm_90 also registers and spill bytes (``ptxas -v``)."""
    report = {}
    for arch in archs:
        for name, (kernel, dtype, constexprs) in CASES.items():
            compiled = compile_kernel(kernel, dtype, constexprs, arch)
            row = {"cubin_bytes": len(compiled.asm["cubin"])}
            report[f"{name} sm_{arch}"] = row | (ptxas_report(compiled.asm["ptx"], arch) if arch == 90 else {})
    return report


if __name__ == "__main__":
    print(json.dumps(main([int(a) for a in sys.argv[1:]])))
