"""8-bit AdamW state: both moments stored blockwise-quantized, as bitsandbytes' 8-bit blockwise optimizers.

Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization". For a parameter of ``n`` elements the
state is, per moment, ``n`` uint8 codes plus one fp32 absmax per block of ``B = 256`` elements
(2 + 8/256 bytes per parameter for both moments, against 8 for fp32 state):

    absmax_b = max_{i in b} |s_i|                         (fp32)
    code_i   = bnb_round(s_i / absmax_b, map)             (uint8; bitsandbytes' CPU 65,536-bin grid rounding)
    s_hat_i  = map[code_i] * absmax_b                     (fp32)

The first moment ``m`` uses the signed dynamic map, the second moment ``v`` (never negative) the unsigned
one, whose 256 codes all lie in [0, 1] and so give ``v`` one more bit of precision.

One update (bitsandbytes 0.50.2 ``_optimizer_update_8bit_blockwise_cpu``, same fp32 operations in the same
order, so codes, absmax and parameters are bit-identical to ``bnb.optim.AdamW8bit`` on CPU):

    m, v  = dequantize(m_codes), dequantize(v_codes)      (fp32, whole tensor)
    m     = m * b1 + (1 - b1) * g
    v     = v * b2 + (1 - b2) * g * g
    denom = sqrt(v) / sqrt(1 - b2^t) + eps
    p     = p * (1 - lr * wd)                             (only when wd > 0)
    p     = p - lr / (1 - b1^t) * m / denom
    m_codes, v_codes = quantize(m), quantize(v)            (new absmax per block)

The rounding is ``qlorakit.quant.functional``'s reproduction of bitsandbytes' CPU kernel (shared with
double quantization, not copied here).
"""

from __future__ import annotations

import math
from functools import cache

import torch

from qlorakit.quant.codebooks import dynamic_map_8bit
from qlorakit.quant.functional import dequantize_blockwise_8bit, quantize_blockwise_8bit

#: Elements per absmax block of the 8-bit state (bitsandbytes' fixed optimizer blocksize).
STATE_BLOCKSIZE = 256

#: The state keys of an 8-bit parameter: codes and block scales of each moment.
KEYS_8BIT = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")


@cache
def state_map(signed: bool, device: torch.device) -> torch.Tensor:
    """The 256-entry dynamic map (signed for ``m``, unsigned for ``v``) on ``device`` (cached; do not modify)."""
    return dynamic_map_8bit(signed).to(device)


def num_blocks(numel: int) -> int:
    return -(-numel // STATE_BLOCKSIZE)


def layout_8bit(shape: torch.Size) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of the 8-bit state of a parameter of ``shape``."""
    blocks = (num_blocks(math.prod(shape)),)
    return {
        "exp_avg_codes": (tuple(shape), torch.uint8),
        "exp_avg_absmax": (blocks, torch.float32),
        "exp_avg_sq_codes": (tuple(shape), torch.uint8),
        "exp_avg_sq_absmax": (blocks, torch.float32),
    }


def dequantize_moment(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """uint8 codes (any shape, n elements) + absmax (blocks,) -> fp32 moment (n,)."""
    return dequantize_blockwise_8bit(codes.reshape(-1), absmax, state_map(signed, codes.device), STATE_BLOCKSIZE)


def quantize_moment_into(moment: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> None:
    """Quantize the fp32 moment (n,) and write codes (n elements, any shape) and absmax (blocks,) in place."""
    new_codes, new_absmax = quantize_blockwise_8bit(moment, state_map(signed, moment.device), STATE_BLOCKSIZE)
    codes.view(-1).copy_(new_codes)
    absmax.copy_(new_absmax)


@torch.no_grad()
def adamw_update_8bit(
    p: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, torch.Tensor],
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW update of ``p`` with the 8-bit ``state`` (keys ``KEYS_8BIT``), both updated in place."""
    beta1, beta2 = betas
    m = dequantize_moment(state["exp_avg_codes"], state["exp_avg_absmax"], signed=True)  # (n,) fp32
    v = dequantize_moment(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], signed=False)  # (n,) fp32
    g = grad.reshape(-1).float()  # (n,)
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    correction1 = 1.0 - beta1**step
    correction2 = math.sqrt(1.0 - beta2**step)
    denom = (v.sqrt() / correction2).add_(eps)
    p32 = p.reshape(-1).float()  # (n,) fp32: a view of p when p is contiguous fp32, else a copy
    if weight_decay > 0.0:
        p32.mul_(1.0 - lr * weight_decay)
    p32.addcdiv_(m, denom, value=-lr / correction1)
    if p32.data_ptr() != p.data_ptr():  # p is bf16/fp16 or not contiguous: write the fp32 result back
        p.copy_(p32.view(p.shape))
    quantize_moment_into(m, state["exp_avg_codes"], state["exp_avg_absmax"], signed=True)
    quantize_moment_into(v, state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], signed=False)
