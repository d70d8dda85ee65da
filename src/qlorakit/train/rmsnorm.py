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
gradients within 1e-5).

16-bit inputs (bf16, fp16) with the fp32 weight qlorakit keeps, where the loader's hook casts the norm's output
back to the input dtype (``models.build.keep_norm_outputs_in_input_dtype``, which marks the module with
``constants.NORM_OUTPUT_IN_INPUT_DTYPE``): the module computes

    x32 = float(x),  n = c(x32 * rsqrt(mean(x32^2) + eps)),  y = c(w * float(n))     (c: round to x's dtype)

and autograd keeps ``x32``, the fp32 upcast (4 bytes a value, the block's largest saved tensor but the MLP's).
``_RMSNorm16`` runs the very same ops in forward (``normalize_16bit``: the output is bit-identical) and keeps
``x`` as it came (2 bytes a value; ``float(x)`` is exact, so backward rebuilds ``x32``) and ``r``. Backward is
the fp32 formula above on ``g32 = float(g)`` with ``w g32`` rounded to ``c`` once, where the module's autograd
rounds it (the gradient of ``n``); ``dL/dx`` is rounded to ``c`` at the end. The module rounds at the same two
points but sums two fp32 paths into ``x``: tests hold the two within 16-bit rounding and the fused one no
further from an fp64 evaluation than the module. The output is offered to ``train.rebuild`` like the fp32
one's, so the q/k/v and gate/up adapters' shared inputs are rebuilt in backward instead of kept (2 of the 3
``(B, T, d)`` 16-bit inputs a block's dropout paths would keep). Other dtypes, or a norm without that hook,
keep the module's forward.

``fused_rmsnorm(model)`` sets this forward on every module whose class is in ``RMSNORMS`` and restores
the class's forward on the way out.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qlorakit.constants import NORM_OUTPUT_IN_INPUT_DTYPE, RMSNORMS
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


def _normalize_16bit(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's 16-bit forward plus the loader's output cast, op for op, and ``r``: x (..., H) bf16/fp16,
    weight (H,) fp32 -> (..., H) in x's dtype, (..., 1) fp32."""
    x32 = x.to(torch.float32)  # (..., H)
    r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1), the module's ops (pow, mean)
    n = (x32 * r).to(x.dtype)  # (..., H)
    return (weight * n).to(x.dtype), r


def normalize_16bit(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``_RMSNorm16``'s output without autograd (bit-identical; module docstring): what ``train.rebuild`` reruns."""
    return _normalize_16bit(x, weight, eps)[0]


class _RMSNorm16(torch.autograd.Function):
    """``normalize_16bit`` keeping ``x`` in its own dtype and ``r``; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # x: (..., H) 16-bit
        out, r = _normalize_16bit(x, weight, eps)  # (..., H), r: (..., 1)
        ctx.save_for_backward(x, weight, r)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad: (..., H) in x's dtype
        x, weight, r = ctx.saved_tensors
        x32 = x.to(torch.float32)  # (..., H), exact
        g32 = grad.to(torch.float32)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (g32 * (x32 * r).to(x.dtype)).reshape(-1, x.shape[-1]).sum(0)  # (H,): sum g * n
        if not ctx.needs_input_grad[0]:
            return None, grad_w, None
        wg = (g32 * weight).to(x.dtype).to(torch.float32)  # (..., H): dL/dn, rounded where autograd rounds it
        coef = (wg * x32).sum(-1, keepdim=True).mul_(r.pow(3)).div_(x.shape[-1])  # (..., 1): r^3 sum(wg x) / H
        return wg.mul_(r).sub_(x32.mul_(coef)).to(x.dtype), grad_w, None


def _hooked_to_input_dtype(norm: nn.Module) -> bool:
    return getattr(norm, NORM_OUTPUT_IN_INPUT_DTYPE, False) is True


def _fused_forward(norm: nn.Module):
    reference = type(norm).forward

    def forward(x: torch.Tensor) -> torch.Tensor:  # x: (..., H)
        w, eps = norm.weight, norm.variance_epsilon
        if w.dtype != torch.float32:
            return reference(norm, x)
        if x.dtype == torch.float32:
            out = rms_norm(x, w, eps)  # (..., H)
            rebuild.offer(out, normalize, x, w, eps)  # inside a block: rebuilt if saved
            return out
        if x.dtype in (torch.bfloat16, torch.float16) and _hooked_to_input_dtype(norm):
            out = _RMSNorm16.apply(x, w, eps)  # (..., H) in x's dtype; the hook's cast returns it as it is
            rebuild.offer(out, normalize_16bit, x, w, eps)
            return out
        return reference(norm, x)

    return forward


def rmsnorms(model: nn.Module) -> list[nn.Module]:
    """The norms of ``model`` that ``fused_rmsnorm`` can take over."""
    return [m for m in model.modules() if type(m).__name__ in RMSNORMS and hasattr(m, "variance_epsilon")]


@contextmanager
def fused_rmsnorm(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """``with fused_rmsnorm(model) as n: ...``: ``n`` norms use ``rms_norm`` inside, their own forward after."""
    with patched_forwards(rmsnorms(model) if enabled else [], _fused_forward) as count:
        yield count
