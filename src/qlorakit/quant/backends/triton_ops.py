"""Python entry points of the Triton backend: argument checks, launch grids and block sizes.

- ``dequantize_4bit(q, dtype)``: the whole weight, the same fp32 operations as ``dequantize_4bit_reference``;
- ``matmul_4bit(x, q)``: ``x (..., K) @ W^T -> (..., N)`` without materializing ``W`` (the GEMV for one row);
- ``grad_input_4bit(dy, q)``: ``dy (..., N) @ W -> (..., K)``, the input gradient of the same layer;
- ``gemv_4bit(x, q)``: the batch-1 path of ``matmul_4bit``.

Kernels run compiled on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``
set before triton is first imported; Triton reads it when a function is decorated). The interpreter runs
``tl.dot`` with numpy, which takes fp32 inputs only. On the GPU the matmul and GEMV block sizes come from
``triton.autotune`` over a few configurations per weight shape, and dequantization reads whole
quantization blocks, 2 KiB of codes per program; under the interpreter all sizes are fixed and small.
Every launch disables floating-point contraction so the decoded weights equal the reference's.
"""

from __future__ import annotations

import contextlib
import math
from functools import cache

import torch
import triton
import triton.language as tl

from qlorakit.errors import QuantizationError
from qlorakit.quant.backends import triton_kernels as kernels
from qlorakit.quant.tensor import QuantizedTensor

#: Flat indices are int32 inside the kernels.
MAX_ELEMENTS = 2**31 - 1

#: True under Triton's interpreter: kernels take CPU tensors. It must be on before triton is first imported,
#: because triton's own library (``tl.zeros``, ``tl.interleave``, ...) is decorated at that import.
INTERPRETED = type(kernels.dequantize_kernel).__name__ == "InterpretedFunction"
if INTERPRETED and type(tl.standard.cdiv).__name__ != "InterpretedFunction":
    raise ImportError(
        "TRITON_INTERPRET=1 was set after triton had been imported; set it before the first import of triton"
    )

_SMALL = {"matmul": {"BLOCK_M": 16, "BLOCK_P": 16, "BLOCK_R": 32}, "gemv": {"BLOCK_N": 8, "BLOCK_B": 32}}

#: Packed bytes one dequantize program reads (whole blocks; a single block when it is larger).
DEQUANT_BYTES = 64 if INTERPRETED else 2048


def _gpu_configs(name: str) -> list:
    c = triton.Config
    if name == "matmul":
        # (BLOCK_M, BLOCK_P, BLOCK_R, warps, stages). On sm_90 ptxas reports no spills for any of these in the
        # forward; in the input gradient those with BLOCK_P = 128 spill (their scales are per element), the
        # others do not (benchmarks/gpu_kernel_resources.py). The autotuner times them all.
        shapes = [(128, 128, 32, 4, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 8, 3),
                  (128, 64, 32, 8, 3), (64, 64, 64, 4, 3), (64, 64, 32, 4, 3), (16, 128, 64, 4, 3), (16, 64, 64, 4, 3)]
        return [c({"BLOCK_M": m, "BLOCK_P": p, "BLOCK_R": r}, num_warps=w, num_stages=s) for m, p, r, w, s in shapes]
    # (BLOCK_N, BLOCK_B, warps)
    shapes = [(4, 128, 2), (8, 128, 4), (8, 256, 4), (16, 64, 4), (16, 128, 4), (32, 64, 8)]
    return [c({"BLOCK_N": n, "BLOCK_B": b}, num_warps=w) for n, b, w in shapes]


@cache
def _kernel(name: str):
    """The kernel to launch and the meta-parameters to pass (none when autotuned)."""
    fn = {"matmul": kernels.matmul_kernel, "gemv": kernels.gemv_kernel}[name]
    if INTERPRETED:
        return fn, _SMALL[name]
    keys = {"matmul": ["M_BUCKET", "P", "R", "FORWARD"], "gemv": ["N", "K"]}[name]
    return triton.autotune(_gpu_configs(name), key=keys)(fn), {}


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' device (a no-op on CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_device(t: torch.Tensor, q: QuantizedTensor, what: str) -> None:
    if t.device != q.device:
        raise QuantizationError(
            f"{what} is on {t.device} but the 4-bit weight is on {q.device}; move both to one device"
        )
    if not INTERPRETED and t.device.type != "cuda":
        raise QuantizationError(
            f"{what} is on {t.device}: the Triton kernels run on CUDA tensors (or on CPU with TRITON_INTERPRET=1 set "
            "before qlorakit.quant.backends.triton_ops is imported)"
        )
    if q.numel > MAX_ELEMENTS:
        raise QuantizationError(f"weight of {q.numel} elements exceeds the kernels' int32 indexing ({MAX_ELEMENTS})")


def _weight_args(q: QuantizedTensor) -> tuple[list, dict]:
    """Positional pointers/scalars and constexprs describing ``q`` to a kernel."""
    nested = q.nested
    nested_absmax = nested.absmax if nested is not None else q.absmax  # unused without double quant
    nested_code = nested.code if nested is not None else q.code
    offset = nested.offset if nested is not None else 0.0
    args = [q.packed, q.absmax, q.code, nested_absmax, nested_code, offset]
    meta = {
        "BLOCKSIZE": q.blocksize,
        "NESTED_BLOCKSIZE": nested.blocksize if nested is not None else 1,
        "DOUBLE_QUANT": nested is not None,
    }
    return args, meta


def dequantize_4bit(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The full weight in ``dtype`` (default ``q.dtype``), decoded as ``dequantize_4bit_reference`` decodes it."""
    _check_device(q.packed, q, "the packed codes")
    out = torch.empty(q.shape, dtype=dtype or q.dtype, device=q.device)
    args, meta = _weight_args(q)
    rows = max(1, DEQUANT_BYTES // (q.blocksize // 2))  # blocks per program (powers of two)
    launch = {} if INTERPRETED else {"num_warps": 4 if rows * q.blocksize <= 4096 else 8}
    grid = (triton.cdiv(q.num_blocks, rows),)
    with _on(out.device):
        kernels.dequantize_kernel[grid](*args, out, q.numel, **meta, ROWS=rows, enable_fp_fusion=False, **launch)
    return out


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products like torch's default CUDA matmul (TF32 off); 16-bit inputs ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch_matmul(a: torch.Tensor, q: QuantizedTensor, forward: bool) -> torch.Tensor:
    """``a (M, R) @ W^T -> (M, N)`` (``forward``) or ``a (M, R) @ W -> (M, K)``, for ``W`` of shape ``(N, K)``."""
    n_out, k_in = q.shape
    p, r = (n_out, k_in) if forward else (k_in, n_out)
    m = a.shape[0]
    out = torch.empty((m, p), dtype=a.dtype, device=a.device)
    if m == 0:
        return out
    args, meta = _weight_args(q)
    kernel, fixed = _kernel("matmul")
    bucket = min(1 << max(m - 1, 0).bit_length(), 8192)  # autotune key: M rounded up to a power of two
    def grid(meta_):
        return (triton.cdiv(m, meta_["BLOCK_M"]), triton.cdiv(p, meta_["BLOCK_P"]))
    with _on(out.device):
        kernel[grid](
            a, *args, out, m, p, r, k_in, a.stride(0), a.stride(1), out.stride(0), out.stride(1), bucket, **meta,
            FORWARD=forward, K_ALIGNED=k_in % q.blocksize == 0, PRECISION=_precision(a.dtype), **fixed,
            enable_fp_fusion=False,
        )
    return out


_ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _rows(t: torch.Tensor, features: int, what: str) -> torch.Tensor:
    if t.dtype not in _ACTIVATION_DTYPES:
        raise QuantizationError(f"{what} has dtype {t.dtype}; use float32, bfloat16 or float16")
    if t.shape[-1] != features:
        raise QuantizationError(
            f"{what} has {t.shape[-1]} features in its last dimension, the 4-bit weight needs {features}"
        )
    if t.numel() > MAX_ELEMENTS:
        raise QuantizationError(f"{what} of {t.numel()} elements exceeds the kernels' int32 indexing ({MAX_ELEMENTS})")
    return t.reshape(-1, features)  # (M, features); a view when possible, strides go to the kernel


def matmul_4bit(x: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
    """``x (..., K) @ dequant(q).T -> (..., N)``; one row goes to the GEMV, more to the fused matmul."""
    n_out, k_in = q.shape
    _check_device(x, q, "the input")
    a = _rows(x, k_in, "the input")
    if a.shape[0] == 1 and k_in % 2 == 0:
        return gemv_4bit(x, q)
    out = _launch_matmul(a, q, forward=True)  # (M, N)
    return out.view(*x.shape[:-1], n_out)


def grad_input_4bit(grad_out: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
    """``grad_out (..., N) @ dequant(q) -> (..., K)``: the input gradient of ``matmul_4bit``."""
    n_out, k_in = q.shape
    _check_device(grad_out, q, "the output gradient")
    a = _rows(grad_out, n_out, "the output gradient")
    out = _launch_matmul(a, q, forward=False)  # (M, K)
    return out.view(*grad_out.shape[:-1], k_in)


def gemv_4bit(x: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
    """One input row: ``x (..., K)`` with ``prod(...) == 1`` -> ``(..., N)``. Needs an even ``K``."""
    n_out, k_in = q.shape
    _check_device(x, q, "the input")
    a = _rows(x, k_in, "the input")
    if a.shape[0] != 1 or k_in % 2:
        raise QuantizationError(f"gemv_4bit takes one row with an even feature count, got {a.shape[0]} rows of {k_in}")
    x_row = a.reshape(k_in).contiguous()  # (K,)
    out = torch.empty(n_out, dtype=x.dtype, device=x.device)
    args, meta = _weight_args(q)
    kernel, fixed = _kernel("gemv")
    def grid(meta_):
        return (triton.cdiv(n_out, meta_["BLOCK_N"]),)
    with _on(out.device):
        kernel[grid](
            x_row, *args, out, n_out, k_in, **meta, K_ALIGNED=k_in % q.blocksize == 0, **fixed, enable_fp_fusion=False
        )
    return out.view(*x.shape[:-1], n_out)


def is_supported(q: QuantizedTensor, t: torch.Tensor | None = None) -> bool:
    """Whether these kernels take ``q`` (a non-empty 2-D weight with int32-addressable elements) and the
    activation ``t`` (fp32/bf16/fp16; it and the result int32-addressable); else callers use pure torch."""
    weight_ok = len(q.shape) == 2 and 0 < math.prod(q.shape) <= MAX_ELEMENTS
    if not weight_ok or t is None:
        return weight_ok
    rows = t.numel() // max(t.shape[-1], 1) if t.dim() else 1
    return t.dtype in _ACTIVATION_DTYPES and t.numel() <= MAX_ELEMENTS and rows * max(q.shape) <= MAX_ELEMENTS
