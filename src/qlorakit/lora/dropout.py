"""LoRA's down-projection of a dropped input, ``u = dropout(h) A^T``, keeping ``h`` and a 1-bit mask for backward.

Inverted dropout with probability ``p`` (Srivastava et al., 2014; PEFT applies it to the adapter input only):

    keep = (U >= p),  U ~ Uniform[0, 1) per value        one draw per call: keep (..., in), bool
    u    = ((keep * h) / (1 - p)) A^T                      h (..., in), A (r, in) -> u (..., r)
    dL/dh = keep * (g A) / (1 - p)                         g = dL/du: (..., r)
    dL/dA = g^T ((keep * h) / (1 - p))                     (r, in), the dropped input rebuilt from h and keep

Autograd of ``down_product(nn.Dropout(p)(h), A)`` keeps the dropped copy (the matmul's input, ``c`` bytes a
value) and, on the CPU, dropout's mask as a float tensor (``h``'s dtype: 4 bytes a value in fp32): 8 bytes a
value in fp32. ``_DroppedDown`` keeps ``h`` (which the caller often holds anyway: the shared input of a fused
group) and ``keep`` packed 8 values to a byte (``pack_mask``: 1 bit a value), and rebuilds the mask
(``unpack_mask``, a 256-entry table lookup) and the dropped input in backward (one elementwise pass each). For
SmolLM2 at 2 x 512 tokens (fp32, r 16, dropout 0.05, fused groups) that is 47.6 -> about 32 MiB saved per
decoder block (the bool mask was 3.2 MiB of it, the packed one 0.4). ``h`` may come in the compute dtype
while ``A`` is fp32 (bf16 compute, fp32 adapters): the cast to ``A``'s dtype happens inside and ``h`` is kept
as it came, 2 bytes a value instead of the cast's 4 (the cast is exact, so backward casts it again to the same
values). The mask comes from ``torch.rand`` on the global
generator, so seeding, and gradient checkpointing's recompute (which restores the RNG state), give the same mask
again; it is a different random stream from ``nn.Dropout``'s (Bernoulli draws), with the same distribution.

``LoraLinear.add_delta`` and the fused groups (``lora.fused``) call ``dropped_down_product(h, A, p)`` when
``lean_dropout(module)`` gives ``p`` (a plain ``nn.Dropout`` in training mode with ``0 < p < 1``); any other
module (``nn.Identity``, a dropout in eval mode, a custom one) is applied as it is before ``down_product``.
``reference_dropped_down(h, weight, keep, p)`` is the op-by-op formula with a given mask (tests hold the two
to each other within fp32 rounding).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn


def keep_mask(h: torch.Tensor, p: float) -> torch.Tensor:
    """``U >= p`` with ``U ~ Uniform[0, 1)`` from the global generator: (..., in) bool, True = kept."""
    return torch.rand(h.shape, dtype=torch.float32, device=h.device) >= p


#: Multiplying 8 bytes that are each 0 or 1 (one int64, little-endian, byte ``i`` at bits ``8i``) by this
#: gathers bit ``8i`` into bit ``56 + i``: every byte of the product's top byte comes from exactly one term, so
#: nothing carries into it (a wrapping int64 product; ``tests/lora/test_dropout.py`` checks all 256 patterns).
_GATHER_BITS = 0x0102040810204080
#: Row ``p`` holds the 8 bytes (0 or 1) of bits 0..7 of ``p``, in memory order: (256, 8) uint8.
_SPREAD_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).to(torch.uint8)


def _padded_bytes(keep: torch.Tensor) -> torch.Tensor:
    flat = keep.reshape(-1)  # (n,)
    if flat.numel() % 8:
        flat = torch.nn.functional.pad(flat, (0, 8 - flat.numel() % 8))
    return flat.view(torch.uint8)  # (8 ceil(n / 8),) of 0 / 1


def reference_pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """``pack_mask`` spelled out: each group of 8 values shifted to its bit and summed (distinct bits, no carry)."""
    bits = _padded_bytes(keep).view(-1, 8)  # (n / 8, 8)
    return (bits << torch.arange(8, dtype=torch.uint8, device=keep.device)).sum(-1, dtype=torch.uint8)


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """A bool mask packed 8 values to a byte: (...) bool -> (ceil(numel / 8),) uint8, value ``8j + i`` in bit ``i``
    of byte ``j`` (zero-padded at the end). One int64 product per byte (``_GATHER_BITS``, which reads the 8 bytes
    of a word little-endian); ``reference_pack_mask`` on a big-endian machine."""
    if sys.byteorder != "little":
        return reference_pack_mask(keep)
    words = _padded_bytes(keep).view(torch.int64)  # (n / 8,): 8 mask bytes each
    return ((words * _GATHER_BITS) >> 56).to(torch.uint8)  # (n / 8,)


def unpack_mask(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``pack_mask``'s inverse: (ceil(numel / 8),) uint8 -> ``shape`` bool."""
    table = _SPREAD_BITS.to(packed.device).view(torch.int64).reshape(-1)  # (256,): 8 bytes in one word each
    words = table[packed.long()]  # (n / 8,) int64
    return words.view(torch.uint8)[: shape.numel()].view(torch.bool).reshape(shape)


def _dropped(h: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.where(keep, h * scale, 0.0)  # (..., in): the kept values times 1 / (1 - p), the rest 0


class _DroppedDown(torch.autograd.Function):
    """``u = ((keep * h) / (1 - p)) A^T`` saving ``h``, ``A`` and ``keep`` packed to bits; see the module docstring."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:  # h: (..., in), A: (r, in)
        keep = keep_mask(h, p)  # (..., in) bool
        scale = 1.0 / (1.0 - p)
        # h as given: its cast to A's dtype is redone in backward; keep as (numel / 8,) uint8
        ctx.save_for_backward(h, weight, pack_mask(keep))
        ctx.scale = scale
        return F.linear(_dropped(h.to(weight.dtype), keep, scale), weight)  # (..., r)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad: (..., r)
        h, weight, packed = ctx.saved_tensors
        keep = unpack_mask(packed, h.shape)  # (..., in) bool
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = torch.where(keep, (grad @ weight).mul_(ctx.scale), 0.0).to(h.dtype)  # (..., in)
        if ctx.needs_input_grad[1]:
            dropped = _dropped(h.to(weight.dtype), keep, ctx.scale).reshape(-1, h.shape[-1])  # (N, in)
            grad_w = grad.reshape(-1, grad.shape[-1]).t() @ dropped  # (r, in)
        return grad_h, grad_w, None


def lean_dropout(dropout: nn.Module | None) -> float | None:
    """``p`` when ``dropout`` is a plain ``nn.Dropout`` in training mode with ``0 < p < 1``; else None."""
    if type(dropout) is not nn.Dropout or not dropout.training or not 0.0 < dropout.p < 1.0:
        return None
    return float(dropout.p)


def dropped_down_product(h: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    """``dropout_p(h) @ A^T`` through ``_DroppedDown``: h (..., in) in any float dtype (cast to A's inside), A (r, in)
    -> (..., r) in A's dtype."""
    return _DroppedDown.apply(h, weight, p)


def reference_dropped_down(h: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """The formula op by op with a given mask ``keep`` (..., in): ``(h * keep / (1 - p)) A^T`` (plain autograd)."""
    return F.linear(h * keep.to(h.dtype) / (1.0 - p), weight)  # (..., r)
