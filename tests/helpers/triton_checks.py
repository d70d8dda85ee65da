"""Shared pieces of the Triton kernel tests: random 4-bit weights and the fp32 summation error bound.

Tolerance of every matmul test: the kernels and ``x @ dequantize_4bit_reference(q).T`` multiply the same
(exactly decoded, identically cast) operands and differ only in the order of the fp32 sums. For a sum of
``R`` products with fp32 accumulation the classic bound (Higham, Accuracy and Stability of Numerical
Algorithms, eq. 3.5) is ``|computed - exact| <= gamma_R * sum |a_i w_i|`` with ``gamma_R = R u / (1 - R u)``
and ``u = 2**-24``; the exact value is computed in float64 from the same operands. A 16-bit output adds
one rounding of the fp32 accumulator ``acc``, half an ulp: ``2**-8 |acc|`` for bfloat16, ``2**-11 |acc|`` for
float16, with ``|acc| <= |exact| + gamma_R sum |a_i w_i|``.
"""

from __future__ import annotations

import torch

from qlorakit.quant.functional import dequantize_4bit_reference, quantize_4bit
from qlorakit.quant.tensor import QuantizedTensor

UNIT_ROUNDOFF = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def random_weight(shape, quant_type="nf4", blocksize=64, double_quant=True, device="cpu") -> QuantizedTensor:
    """A quantized N(0, 1) weight with a few zero blocks and one large outlier (exercise every path)."""
    w = torch.randn(shape)
    flat = w.view(-1)
    flat[: min(blocksize, flat.numel())] = 0.0  # an all-zero first block
    flat[flat.numel() // 2] = 40.0  # an outlier that dominates its block's absmax
    return quantize_4bit(w, quant_type, blocksize, double_quant).to(device)


def reference_weight(q: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized weight exactly as the reference path hands it to its matmul."""
    return dequantize_4bit_reference(q, dtype)


def assert_within_sum_bound(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out`` equals ``a @ b`` (a: (M, R), b: (R, P)) within fp32 summation error + one output rounding."""
    a64, b64 = a.double(), b.double()
    exact = a64 @ b64  # (M, P)
    reduction = a.shape[-1]
    u = 2.0**-24
    gamma = reduction * u / (1 - reduction * u)
    sum_bound = gamma * (a64.abs() @ b64.abs())  # fp32 accumulation
    bound = sum_bound + UNIT_ROUNDOFF[out.dtype] * (exact.abs() + sum_bound) + 1e-30  # + output rounding
    err = (out.double() - exact).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error reaches {worst:.3g} x the bound (max abs error {err.max().item():.3g})"
