"""Selective recompute: SwiGLU MLPs keep ``gate`` and ``up`` for backward, not ``silu(gate)``.

A Llama-style MLP computes ``down(silu(g) * u)`` with ``g = gate(x)``, ``u = up(x)``: (..., I) each. Plain
autograd keeps three (..., I) tensors of it for backward: ``g`` (for silu's derivative) and ``silu(g)``
and ``u`` (for the product's). ``silu(g)`` is cheap to recompute from ``g``, so ``_SiluMul`` keeps only
``g`` and ``u`` and rebuilds it in backward:

    h = silu(g) * u                         forward, one (..., I) output
    dL/du = silu(g) * dL/dh                 backward, silu(g) recomputed from the saved g
    dL/dg = silu'(g) * (u * dL/dh)          (aten.silu_backward, as autograd computes it)

These are the very elementwise ops autograd runs for ``act_fn(g) * u`` (IEEE products are commutative),
so outputs and gradients are bit-identical to the module's own forward (``tests/train/test_recompute.py``
holds them equal). Saved: one (..., I) tensor less per MLP (for SmolLM2 at 2 x 512 tokens, 6 MiB per
block, 180 MiB over its 30 blocks) and one fewer (..., I) allocation in forward; the extra work is one
``silu`` per MLP in backward. With gradient checkpointing on the saving only lasts through a block's
recompute.

``swiglu_recompute(model)`` sets this forward on every MLP whose class is listed in ``SWIGLU_MLPS`` (their
forward is exactly ``down(act_fn(gate(x)) * up(x))``) and whose activation is SiLU, and restores the
class's forward on the way out.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from qlorakit.constants import SWIGLU_MLPS
from qlorakit.train import rebuild
from qlorakit.train.patching import patched_forwards

#: Activation classes that compute ``F.silu``.
_SILU = ("SiLUActivation", "SiLU")


def silu_mul_value(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` as ``_SiluMul`` computes it (what ``train.rebuild`` reruns in backward): (..., I)."""
    return F.silu(gate).mul_(up)


class _SiluMul(torch.autograd.Function):
    """``silu(gate) * up`` saving only ``gate`` and ``up``; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # gate, up: (..., I)
        ctx.save_for_backward(gate, up)
        return silu_mul_value(gate, up)  # (..., I)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad: (..., I)
        gate, up = ctx.saved_tensors
        grad_gate = None
        if ctx.needs_input_grad[0]:
            grad_gate = grad * up  # (..., I), then silu_backward in place (elementwise, same values)
            torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        grad_up = F.silu(gate).mul_(grad) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` that keeps ``gate`` and ``up`` (not ``silu(gate)``) for backward."""
    return _SiluMul.apply(gate, up)


def _recomputing_forward(mlp: nn.Module):
    def forward(x: torch.Tensor) -> torch.Tensor:  # x: (..., H)
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)  # (..., I) each
        product = silu_mul(gate, up)  # (..., I)
        rebuild.offer(product, silu_mul_value, gate, up)  # inside a block: rebuilt if down_proj's adapter saves it
        return mlp.down_proj(product)  # (..., H)

    return forward


def swiglu_mlps(model: nn.Module) -> list[nn.Module]:
    """The MLPs of ``model`` that ``swiglu_recompute`` can take over (listed class, SiLU activation)."""
    return [m for m in model.modules()
            if type(m).__name__ in SWIGLU_MLPS and type(getattr(m, "act_fn", None)).__name__ in _SILU]  # fmt: skip


@contextmanager
def swiglu_recompute(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """``with swiglu_recompute(model) as n: ...``: ``n`` MLPs use ``silu_mul`` inside, their own forward after."""
    with patched_forwards(swiglu_mlps(model) if enabled else [], _recomputing_forward) as count:
        yield count
