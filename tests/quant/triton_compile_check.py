"""Compile each Triton kernel for a CUDA architecture on a machine without a GPU; prints one JSON line.

Run as a script by ``test_triton_compile.py`` in a process without ``TRITON_INTERPRET`` (the interpreter
replaces the kernels with Python functions that cannot be compiled). Triton's wheel carries ``ptxas``, so
this reaches a cubin: it catches type, shape and constexpr errors that the interpreter lets through. It
runs nothing.
"""

from __future__ import annotations

import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from qlorakit.quant.backends import triton_kernels as kernels

WEIGHT = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "code_ptr": "*fp32", "nested_absmax_ptr": "*fp32",
          "nested_code_ptr": "*fp32", "offset": "fp32"}  # fmt: skip
FORMAT = {"BLOCKSIZE": 64, "NESTED_BLOCKSIZE": 256, "DOUBLE_QUANT": True}


def _matmul(dtype: str, forward: bool, aligned: bool) -> tuple:
    ints = ("M", "P", "R", "K", "stride_am", "stride_ar", "stride_om", "stride_op", "M_BUCKET")
    sig = {"a_ptr": f"*{dtype}"} | WEIGHT | {"out_ptr": f"*{dtype}"} | dict.fromkeys(ints, "i32")
    precision = "ieee" if dtype == "fp32" else "tf32"
    consts = FORMAT | {"FORWARD": forward, "K_ALIGNED": aligned, "PRECISION": precision, "BLOCK_M": 64,
                       "BLOCK_P": 64, "BLOCK_R": 32}  # fmt: skip
    return kernels.matmul_kernel, sig, consts


CASES = {
    "dequantize bf16": (kernels.dequantize_kernel, WEIGHT | {"out_ptr": "*bf16", "n_elements": "i32"},
                        FORMAT | {"ROWS": 64}),
    "gemv fp16": (kernels.gemv_kernel, {"x_ptr": "*fp16"} | WEIGHT | {"out_ptr": "*fp16", "N": "i32", "K": "i32"},
                  FORMAT | {"K_ALIGNED": True, "BLOCK_N": 8, "BLOCK_B": 128}),
    "matmul forward bf16 aligned": _matmul("bf16", True, True),
    "matmul grad_input fp32 straddling": _matmul("fp32", False, False),
}  # fmt: skip


def main(archs: list[int]) -> dict[str, int]:
    """``"<case> sm_<arch>"`` -> size in bytes of the compiled cubin."""
    sizes = {}
    for arch in archs:
        for name, (fn, sig, consts) in CASES.items():
            source = ASTSource(fn=fn, signature=sig | dict.fromkeys(consts, "constexpr"), constexprs=consts)
            options = {"enable_fp_fusion": False}
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
            sizes[f"{name} sm_{arch}"] = len(compiled.asm["cubin"])
    return sizes


if __name__ == "__main__":
    print(json.dumps(main([int(a) for a in sys.argv[1:]])))
