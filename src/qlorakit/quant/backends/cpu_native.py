"""The compiled CPU backend: batch-1 4-bit GEMV, 4-bit dequantize and dense GEMV from ``quant/csrc``.

Reached through ``qlorakit.quant.backends.native_cpu()``, which returns the ``CpuKernels`` of this module
or ``None`` (then callers use their pure-torch path: same results, slower). ``cpu_build`` compiles and
loads the C sources; this module declares their functions (``PROTOTYPES``) and calls them on tensors.

Same math as ``quant.gemv`` (see its docstring): for each row ``o`` and each segment of ``G = gcd(B, in)``
consecutive inputs (a segment lies in one block, so it has one scale ``s``),

    y[o] += s * sum_{i in segment} T[q[o, i]] * x[i]

With AVX-512 the 16-entry table ``T`` sits in one register and ``_mm512_permutexvar_ps`` looks up 16
codes at once; the high and low nibbles of 16 packed bytes meet the even and odd inputs (de-interleaved
once per call), so 32 weights cost two lookups and two fused multiply-adds and are never stored. For one
input row each segment's vector sum is scaled and added to the row's accumulator, reduced once per row;
for several rows (a short prefill) two weight rows are decoded and scaled at a time and used for 8 input
rows, with the 16 accumulators in registers.
The double-quantized scale is decoded in the kernel exactly as ``block_absmax`` does it in fp32:
``nested_code[a] * nested_absmax[b / 256] + offset``. Without AVX-512 (or when ``G`` is not a multiple
of 32) a scalar loop does the same sums. The decode (``dequant4bit``) is bit-identical to
``dequantize_4bit_reference``; the bf16 variants round once, as ``.to(torch.bfloat16)`` does.

The kernels are off with ``QLORAKIT_NATIVE=0``, off x86-64, and when no C compiler is found or the
build fails (a warning says why). One thread (batch-1 work per layer is small).
"""

from __future__ import annotations

import ctypes
import math
from functools import cache
from typing import Any

import torch

from qlorakit.quant.backends.cpu_build import DATA_PTR, Prototype, load_library
from qlorakit.quant.tensor import QuantizedTensor

_I64 = ctypes.c_int64
#: The block-scale arguments every 4-bit kernel takes (``_scale_args`` fills them).
_SCALE = (("absmax", DATA_PTR), ("qabsmax", DATA_PTR), ("nested_absmax", DATA_PTR), ("nested_code", DATA_PTR),
          ("offset", ctypes.c_float), ("nested_bs", _I64))
_GEMV4BIT = (("x", DATA_PTR), ("packed", DATA_PTR), *_SCALE, ("code", DATA_PTR), ("y", DATA_PTR),
             ("out", _I64), ("in", _I64), ("blocksize", _I64), ("seg", _I64), ("rows", _I64))
_DEQUANT4BIT = (("packed", DATA_PTR), *_SCALE, ("code", DATA_PTR), ("out", DATA_PTR), ("n", _I64),
                ("blocksize", _I64))
_DENSE = (("x", DATA_PTR), ("w", DATA_PTR), ("y", DATA_PTR), ("out", _I64), ("in", _I64))

#: Every function the C sources export, its arguments by name (checked against the sources at load).
PROTOTYPES = (
    Prototype("gemv4bit", _GEMV4BIT),  # csrc/gemv4bit.c: fp32 x, y
    Prototype("gemv4bit_bf16", _GEMV4BIT),  # bf16 x, y
    Prototype("dequant4bit", _DEQUANT4BIT),  # csrc/dequant4bit.c: fp32 out
    Prototype("dequant4bit_bf16", _DEQUANT4BIT),  # bf16 out
    Prototype("gemv_f32", _DENSE),  # csrc/gemv_dense.c
    Prototype("gemv_bf16", _DENSE),
)


def _usable(q: QuantizedTensor) -> bool:
    return q.device.type == "cpu" and q.code.dtype == torch.float32 and all(t.is_contiguous() for t in q.tensors())


def _scale_args(q: QuantizedTensor) -> tuple:
    """(absmax, qabsmax, nested_absmax, nested_code, offset, nested_bs): the kernels' block-scale arguments."""
    nested = q.nested
    if nested is None:
        return q.absmax.data_ptr(), None, None, None, 0.0, 1
    return None, q.absmax.data_ptr(), nested.absmax.data_ptr(), nested.code.data_ptr(), nested.offset, nested.blocksize


class BoundGemv:
    """``x @ dequant(q).T`` by the compiled kernel for one weight, its arguments marshalled once.

    Holds ``q`` (so the pointers stay valid); call with fp32 ``x (rows, in)`` contiguous on the CPU.
    """

    __slots__ = ("_bf16", "_function", "_head", "_tail", "out_features", "q")

    def __init__(self, library: Any, q: QuantizedTensor) -> None:
        out_f, in_f = q.shape
        absmax, qabsmax, nested_absmax, nested_code, offset, nested_bs = _scale_args(q)
        self._function, self._bf16 = library.gemv4bit, library.gemv4bit_bf16
        self.q, self.out_features = q, out_f
        self._head = (q.packed.data_ptr(), absmax, qabsmax, nested_absmax, nested_code, offset, nested_bs,
                      q.code.data_ptr())
        self._tail = (out_f, in_f, q.blocksize, math.gcd(q.blocksize, in_f))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: (rows, in) fp32 -> (rows, out) fp32
        y = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)
        self._function(x.data_ptr(), *self._head, y.data_ptr(), *self._tail, x.shape[0])
        return y

    def bf16(self, x: torch.Tensor) -> torch.Tensor:  # x: (rows, in) bf16 -> (rows, out) bf16
        """``self(x.float()).to(torch.bfloat16)`` in one call (the casts done in C, bit-identical)."""
        y = torch.empty(x.shape[0], self.out_features, dtype=torch.bfloat16)
        self._bf16(x.data_ptr(), *self._head, y.data_ptr(), *self._tail, x.shape[0])
        return y


class CpuKernels:
    """The loaded kernel set. Each method returns ``None`` for an input the kernels cannot take."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.library = library

    def bind_gemv(self, q: QuantizedTensor) -> BoundGemv | None:
        """A ``BoundGemv`` for a 2-D CPU weight with an even ``in``, or ``None`` when the kernel cannot take it."""
        if len(q.shape) != 2 or q.shape[1] % 2 or not _usable(q):
            return None
        return BoundGemv(self.library, q)

    def gemv(self, x: torch.Tensor, q: QuantizedTensor) -> torch.Tensor | None:
        """x fp32 (rows, in) contiguous on the CPU -> y fp32 (rows, out), or ``None`` if the kernel cannot take it."""
        bound = self.bind_gemv(q) if x.device.type == "cpu" else None
        return None if bound is None else bound(x)

    def dequantize(
        self, q: QuantizedTensor, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The decode of ``q`` (flat, ``q.numel`` values) in fp32, or rounded once to bf16.

        ``None`` for another ``dtype`` (the caller then casts the fp32 decode) or a ``q`` not on the CPU.
        ``out``: a contiguous CPU tensor of ``q.numel`` elements in ``dtype`` to write into (returned flat)
        instead of a new one.
        """
        if not _usable(q) or dtype not in (torch.float32, torch.bfloat16):
            return None
        if out is None:
            out = torch.empty(q.numel, dtype=dtype)
        elif out.dtype != dtype or out.numel() != q.numel or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"out must be a contiguous CPU {dtype} tensor of {q.numel} elements, got {out.dtype} "
                             f"{tuple(out.shape)} on {out.device}")
        out = out.view(-1)
        function = self.library.dequant4bit if dtype == torch.float32 else self.library.dequant4bit_bf16
        function(q.packed.data_ptr(), *_scale_args(q), q.code.data_ptr(), out.data_ptr(), q.numel, q.blocksize)
        return out

    def dense_gemv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        """``x (in,) @ weight (out, in).T -> (out,)``, one CPU row in fp32 or bf16 (fp32 sums), or ``None``."""
        usable = x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16)
        on_cpu = x.device.type == weight.device.type == "cpu"
        usable = usable and on_cpu and x.is_contiguous() and weight.is_contiguous()
        if not usable:
            return None
        out_f, in_f = weight.shape
        y = torch.empty(out_f, dtype=x.dtype)
        function = self.library.gemv_f32 if x.dtype == torch.float32 else self.library.gemv_bf16
        function(x.data_ptr(), weight.data_ptr(), y.data_ptr(), out_f, in_f)
        return y


@cache
def load() -> CpuKernels | None:
    """The kernel set (building the library on first use), or ``None`` when it is off or cannot be built."""
    library = load_library(PROTOTYPES)
    return None if library is None else CpuKernels(library)
