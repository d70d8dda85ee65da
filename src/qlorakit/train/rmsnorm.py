"""RMSNorm as one autograd function: fewer full-size temporaries than the module's op-by-op forward.

For a row ``x`` of width ``H``, weight ``w`` and ``eps`` (Zhang & Sennrich, 2019, eq. 4):

    r = (sum_i x_i^2 / H + eps)^(-1/2),    y = w * (x r)
    dL/dx = r (w g) - x r^3 sum_i (w g)_i x_i / H           (g = dL/dy)
    dL/dw = sum over rows of g * x r                         (only when w trains)

The module's forward (``LlamaRMSNorm``: ``pow``, ``mean``, ``rsqrt``, two products) writes three (..., H)
tensors and autograd's backward about eight (the products' gradients, ``pow``'s, the sum of the two
paths into ``x``). ``_RMSNorm`` writes one in forward (``x r``, scaled by ``w`` in place) and two in
backward; it saves the same ``x`` (plus ``r``: (..., 1)). At the 1 MiB mmap threshold every such tensor
is fresh pages (``train.allocator``), so this saves page faults as much as arithmetic.

``r`` comes from ``torch.linalg.vector_norm`` instead of ``pow(2).mean``, and the gradient is formed in
one expression instead of two summed paths: fp32 rounding differs, so ``tests/train/test_rmsnorm.py``
holds outputs and gradients to the module's within a normwise relative 1e-6 (a whole model's LoRA
gradients within 1e-5). fp32 only (inputs and
weight); other dtypes keep the module's forward, whose casts this does not reproduce.

``fused_rmsnorm(model)`` sets this forward on every module whose class is in ``RMSNORMS`` and restores
the class's forward on the way out.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qlorakit.constants import RMSNORMS
from qlorakit.train import rebuild
from qlorakit.train.patching import patched_forwards


def _normalize(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w * x r, r)`` with ``r = rsqrt(mean(x^2) + eps)``: x (..., H) -> (..., H), (..., 1)."""
    r = torch.rsqrt(torch.linalg.vector_norm(x, 2, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps))
    return (x * r).mul_(weight), r


def normalize(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``_RMSNorm``'s output without autograd (bit-identical): what ``train.rebuild`` reruns in backward."""
    return _normalize(x, weight, eps)[0]


class _RMSNorm(torch.autograd.Function):
    """``w * x r`` with ``r = rsqrt(mean(x^2) + eps)`` per row; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # x: (..., H), w: (H,)
        out, r = _normalize(x, weight, eps)  # (..., H), r: (..., 1)
        ctx.save_for_backward(x, weight, r)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad: (..., H)
        x, weight, r = ctx.saved_tensors
        grad_w = (grad * x).mul_(r).reshape(-1, x.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None  # (H,)
        if not ctx.needs_input_grad[0]:
            return None, grad_w, None
        wg = grad * weight  # (..., H)
        tmp = wg * x  # (..., H)
        coef = tmp.sum(-1, keepdim=True).mul_(r.pow(3)).div_(x.shape[-1])  # (..., 1): r^3 sum(w g x) / H
        torch.mul(x, coef, out=tmp)  # (..., H), reusing tmp
        return wg.mul_(r).sub_(tmp), grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x * rsqrt(mean(x^2, -1) + eps)`` (fp32) through ``_RMSNorm``."""
    return _RMSNorm.apply(x, weight, eps)


def _fused_forward(norm: nn.Module):
    reference = type(norm).forward

    def forward(x: torch.Tensor) -> torch.Tensor:  # x: (..., H)
        if x.dtype != torch.float32 or norm.weight.dtype != torch.float32:
            return reference(norm, x)
        out = rms_norm(x, norm.weight, norm.variance_epsilon)  # (..., H)
        rebuild.offer(out, normalize, x, norm.weight, norm.variance_epsilon)  # inside a block: rebuilt if saved
        return out

    return forward


def rmsnorms(model: nn.Module) -> list[nn.Module]:
    """The norms of ``model`` that ``fused_rmsnorm`` can take over."""
    return [m for m in model.modules() if type(m).__name__ in RMSNORMS and hasattr(m, "variance_epsilon")]


@contextmanager
def fused_rmsnorm(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """``with fused_rmsnorm(model) as n: ...``: ``n`` norms use ``rms_norm`` inside, their own forward after."""
    with patched_forwards(rmsnorms(model) if enabled else [], _fused_forward) as count:
        yield count
