"""DoRA: weight-decomposed LoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation").

The adapted weight is split into a magnitude vector ``m`` (one value per output feature) and a direction:

    W' = m * (W + s B A) / ||W + s B A||_row          (eq. 5; ``||.||_row``: L2 norm over ``in_features``
                                                        of each output row, shape (out,); the paper's
                                                        "column norm" of ``W`` stored (in, out))
    y  = x W'^T + b = b + (m / n) * (x W^T + s x A^T B^T),    n = ||W + s B A||_row, detached (section 4.3)

``n`` is treated as a constant in backward, as the paper suggests and PEFT does, so ``A`` and ``B`` get
their gradient only through the numerator and ``m`` through ``m / n``. ``m`` is initialised to ``n`` of the
adapter's starting weights (``||W||_row`` when ``B = 0``), so a fresh DoRA adapter leaves the output unchanged.

With dropout on the adapter input in training, PEFT 0.21 (``lora.variants.DoraLinearVariant.forward``)
computes ``y = base(x) + (m/n - 1) * (dropout(x) W^T) + (m/n) * s * B A dropout(x)``: the magnitude's
rescaling of the base term sees the dropped input too. qlorakit follows it exactly, so an adapter trains
the same way in both; with no dropout (or in eval) that is the formula above.

``W`` is the dequantized 4-bit base (``quant.functional.dequantize_4bit`` in fp32) or a 16/32-bit base
weight; the norm is computed in fp32 without grad. It needs the full ``(out, in)`` weight, so every DoRA
forward dequantizes each adapted weight once more than LoRA does (PEFT does the same). Without grad
(decoding, evaluation) the norm is cached per adapter until ``A``, ``B`` or the base weight change.
"""

from __future__ import annotations

import torch
from torch import nn

from qlorakit.quant.functional import dequantize_4bit
from qlorakit.quant.linear import Linear4bit


class DoraMagnitude(nn.Module):
    """The magnitude vector ``m`` of one DoRA adapter: ``weight`` (out,), as PEFT's ``lora_magnitude_vector[name]``."""

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)  # (out,)


def base_weight_fp32(base: nn.Linear | Linear4bit) -> torch.Tensor:
    """The base layer's weight as an fp32 ``(out, in)`` tensor (a 4-bit weight dequantized; no grad)."""
    if isinstance(base, Linear4bit):
        return dequantize_4bit(base.qweight, torch.float32)
    return base.weight.detach().float()


def weight_norm(base: nn.Linear | Linear4bit, weight_a: torch.Tensor, weight_b: torch.Tensor,
                scale: float) -> torch.Tensor:
    """``n = ||W + s B A||_row`` in fp32, detached: W (out, in), B (out, r), A (r, in) -> (out,)."""
    with torch.no_grad():
        weight = base_weight_fp32(base)  # (out, in)
        combined = torch.addmm(weight, weight_b.float(), weight_a.float(), alpha=scale)  # (out, in)
        return torch.linalg.vector_norm(combined, dim=1)  # (out,)


def base_version(base: nn.Linear | Linear4bit) -> tuple[int, int]:
    """Identity and in-place version of the base weight, so a cached norm notices a merge or a new weight."""
    tensor = base.qweight.packed if isinstance(base, Linear4bit) else base.weight
    return id(tensor), tensor._version


def dora_output(result: torch.Tensor, base_part: torch.Tensor, up: torch.Tensor, factor: torch.Tensor,
                scale: float) -> torch.Tensor:
    """``result + (m/n - 1) * base_part + (m/n) * s * up``: result, base_part, up (..., out), factor (out,).

    ``base_part`` is the base output without bias (of the dropped input when dropout is active); ``up`` is
    ``B A h``. The sum is in the dtype of ``factor`` (the adapter's) and cast back to ``result``'s.
    """
    delta = (factor - 1) * base_part + factor * (up * scale)  # (..., out)
    return result + (delta if delta.dtype == result.dtype else delta.to(result.dtype))
