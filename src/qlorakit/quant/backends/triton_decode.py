"""Triton device functions that decode 4-bit weights inside a kernel (imported only by the Triton backend).

The format is the one ``qlorakit.quant.functional`` writes (bitsandbytes' layout). For flat element index
``e`` of a weight with ``n`` elements and block size ``B``:

    byte   = packed[e >> 1]                       two codes per byte, the even index in the high nibble
    code   = (byte >> 4) if e is even else (byte & 15)
    scale  = absmax[e // B]                                              (fp32, no double quant)
    scale  = nested_code[absmax[e // B]] * nested_absmax[(e // B) // 256] + offset   (double quant)
    value  = table[code] * scale

Every product and sum is a separate fp32 operation in the order ``dequantize_4bit_reference`` uses, so a
kernel launched without floating-point contraction (``enable_fp_fusion=False``) decodes bit-identical
values. ``e`` is int32: callers keep ``n < 2**31``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def block_scale(
    block, mask, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
    NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
):
    """fp32 scale of each block index in ``block`` (int32, any shape); 0 where ``mask`` is False."""
    if DOUBLE_QUANT:
        q8 = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        step = tl.load(nested_code_ptr + q8, mask=mask, other=0.0)
        nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        scale = step * nested
        scale = scale + offset
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def code_values(e, mask, packed_ptr, code_ptr):
    """Flat element indices ``e`` (int32, any shape) -> fp32 ``table[code]`` of the same shape (0 off mask)."""
    byte = tl.load(packed_ptr + (e >> 1), mask=mask, other=0).to(tl.int32)
    shift = ((e & 1) ^ 1) * 4  # even index: high nibble
    code = (byte >> shift) & 0x0F
    return tl.load(code_ptr + code, mask=mask, other=0.0)
