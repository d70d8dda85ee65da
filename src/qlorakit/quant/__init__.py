"""4-bit storage of frozen weights: code tables, blockwise (double) quantization, ``Linear4bit``.

- ``codebooks``: the 4-bit (NF4, FP4, INT4) and 8-bit code tables.
- ``tensor``: ``QuantizedTensor``, the one owner of a 4-bit tensor's state, and its bitsandbytes layout.
- ``functional``: blockwise 4-bit quantize / dequantize with double quantization (the pure-torch reference
  and its fast path) and the 8-bit blockwise rounding of the scales.
- ``gemv``: the few-row 4-bit GEMV ``x @ W^T`` that never builds ``W`` (pure torch, else a compiled kernel).
- ``linear``: ``Linear4bit`` and ``matmul_4bit``.
- ``report``: quantization error and throughput of the formats (``qlorakit quant-report``).
- ``backends``: the one dispatch point for compiled kernels, ``select(device)`` (CUDA) and ``native_cpu()``
  (CPU); either returns ``None`` for the pure-torch path.

  - ``backends.triton_decode``, ``backends.triton_kernels``, ``backends.triton_ops``: the Triton backend
    for CUDA tensors (the optional extra ``[gpu]``);
  - ``backends.cpu_build``: reads the C sources of ``csrc/`` (package data), builds them with the system C
    compiler into a cache keyed by their hash, checks and loads them with ``ctypes``;
  - ``backends.cpu_native``: the CPU kernel set on tensors (4-bit GEMV, 4-bit dequantize, dense GEMV).
- ``csrc/`` (C, not a Python package): ``common.h``, ``gemv4bit.c``, ``dequant4bit.c``, ``gemv_dense.c``.

Imports torch and, of qlorakit, only ``constants``, ``errors``, ``hardware`` (the CPU flags in the kernel
cache key) and ``fileio`` (the report's output). Without Triton or a C compiler every operation runs in
pure torch, more slowly, to the same values (the decode bit for bit, the matmul sums to fp32 rounding).
"""

from qlorakit.quant.codebooks import QUANT_TYPES, code_table
from qlorakit.quant.functional import bits_per_param, dequantize_4bit, quantize_4bit
from qlorakit.quant.linear import Linear4bit, matmul_4bit
from qlorakit.quant.tensor import BLOCKSIZES, QuantizedTensor

__all__ = [
    "BLOCKSIZES",
    "QUANT_TYPES",
    "Linear4bit",
    "QuantizedTensor",
    "bits_per_param",
    "code_table",
    "dequantize_4bit",
    "matmul_4bit",
    "quantize_4bit",
]
