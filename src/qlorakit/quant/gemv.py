"""Batch-1 4-bit matrix-vector product ``y = x @ W^T`` without materializing ``W``.

For one input row ``x`` (``in`` values) and a 4-bit weight ``W`` (``out x in``, flattened row-major into
blocks of ``B`` values with scale ``s_b`` and codes ``q_k`` into the 16-entry table ``T``):

    y[o] = sum_i T[q[o, i]] * s[block(o, i)] * x[i]
         = sum_b s_b * ( sum_{(o, i) in block b} T[q[o, i]] * x[i] )

The inner sum only needs ``T[c] * x[i]`` for the 16 codes ``c``, so it is a table lookup instead of a
multiply. The even-``in`` path (every real model) looks up whole packed bytes: byte ``j`` of a row
holds the codes of inputs ``2j`` (high nibble) and ``2j + 1`` (low nibble), so with

    L[j, v] = T[v >> 4] * x[2j] + T[v & 15] * x[2j + 1]        (in/2 x 256 table, built per call)

each byte contributes ``L[j, byte]``: one int32 gather per byte, no per-element scale multiply, and
the only full-size temporaries are the int32 index and the gathered fp32 values of one row tile. The
gathered values are summed over segments of ``G = gcd(B, in) / 2`` bytes (a segment lies inside one
block and one row), each segment sum is scaled by its block's ``s_b``, and the segments of a row are
added up. An odd ``in`` (a byte can straddle two rows) uses the same scheme per nibble with a
``in x 16`` table.

On x86 CPUs with a C compiler a compiled kernel (``backends.native_cpu()``, the C source in ``quant/csrc``)
does these sums with AVX-512 table lookups; the torch code here is its portable fallback, and both are
tested against the reference.

The arithmetic is fp32 whatever the input dtype; the result is cast back to the input's dtype. The
summation order differs from ``x @ dequantize(W).T`` (``gemv_4bit_reference``), so the two agree to
fp32 rounding, not bit for bit: the tests hold them within ``1e-5 * sqrt(in) * max|x| * max|W|``.
"""

from __future__ import annotations

import math
from functools import cache

import torch

from qlorakit.errors import QuantizationError
from qlorakit.quant import backends
from qlorakit.quant.functional import block_absmax, dequantize_4bit
from qlorakit.quant.tensor import QuantizedTensor

#: Most input rows ``Linear4bit`` sends here instead of dequantize + matmul. Since the compiled dequantize
#: (``backends.native_cpu()``) made the reference path cheaper, the kernel's break-even on SmolLM2's shapes is
#: about 16 rows (``benchmarks/gemv_speed.py``, 2026-11-23: kernel / reference 0.85-1.22 at 16 rows, 0.95-1.47 at 32).
FEW_ROWS = 16

#: Bytes of int32 index (and of gathered fp32 values) per row tile (1 MiB: 256 KiB and 4 MiB measured no faster).
TILE_BYTES = 1 << 20


def gemv_4bit_reference(x: torch.Tensor, qweight: QuantizedTensor) -> torch.Tensor:
    """The obviously-correct product: dequantize the whole weight, then multiply. x: (..., in)."""
    return x @ dequantize_4bit(qweight, dtype=x.dtype).t()  # (..., out)


@cache
def _nibble_index(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    byte = torch.arange(256, device=device)
    return byte >> 4, byte & 0x0F


def _check(x: torch.Tensor, qweight: QuantizedTensor) -> tuple[int, int]:
    if len(qweight.shape) != 2:
        raise QuantizationError(f"gemv_4bit needs a 2-D weight, got shape {list(qweight.shape)}")
    out_f, in_f = qweight.shape
    if x.dim() == 0 or x.shape[-1] != in_f:
        raise QuantizationError(f"gemv_4bit: input shape {list(x.shape)} does not end in in_features = {in_f}")
    return out_f, in_f


def gemv_4bit(x: torch.Tensor, qweight: QuantizedTensor, use_native: bool = True) -> torch.Tensor:
    """``x @ dequant(qweight).T`` without building the weight: x (..., in) -> (..., out).

    Meant for one row (batch-1 decoding) or a few (a short prefill; ``Linear4bit`` sends at most
    ``FEW_ROWS``): every row costs a pass over the packed weight. The compiled kernel
    (``backends.native_cpu()``) runs when it is available and ``in`` is even; otherwise, or with
    ``use_native=False``, the pure-torch lookup below does the same sums, row by row.
    """
    out_f, in_f = _check(x, qweight)
    xf = x.reshape(-1, in_f).float().contiguous()  # (rows, in)
    kernels = backends.native_cpu() if use_native and in_f % 2 == 0 and xf.device.type == "cpu" else None
    y = None if kernels is None else kernels.gemv(xf, qweight)  # (rows, out)
    if y is None:
        scale = block_absmax(qweight)  # (blocks,) fp32
        one_row = _gemv_pairs if in_f % 2 == 0 else _gemv_nibbles
        y = torch.stack([one_row(row, qweight, scale, out_f, in_f) for row in xf])  # (rows, out)
    return y.to(x.dtype).reshape(*x.shape[:-1], out_f)


def _segment_scales(scale: torch.Tensor, per_block: int, segments: int) -> torch.Tensor:
    """The scale of each segment: (blocks,) -> (segments,), segment ``s`` lying in block ``s // per_block``."""
    return scale if per_block == 1 else scale.repeat_interleave(per_block)[:segments]


def _gemv_pairs(xf: torch.Tensor, q: QuantizedTensor, scale: torch.Tensor, out_f: int, in_f: int) -> torch.Tensor:
    """Even ``in``: one lookup per packed byte in the (in/2, 256) pair table."""
    half = in_f // 2
    hi, lo = _nibble_index(xf.device)
    pairs = xf.view(half, 2)  # (in/2, 2)
    table = pairs[:, :1] * q.code[hi] + pairs[:, 1:] * q.code[lo]  # (in/2, 256)
    offsets = torch.arange(half, dtype=torch.int32, device=xf.device) * 256  # (in/2,)
    packed = q.packed.view(out_f, half)  # (out, in/2) uint8
    seg = math.gcd(q.blocksize, in_f) // 2  # bytes per segment
    seg_scale = _segment_scales(scale, q.blocksize // 2 // seg, out_f * half // seg).view(out_f, -1)  # (out, segs/row)
    rows_per_tile = max(1, TILE_BYTES // (4 * half))
    y = torch.empty(out_f, device=xf.device)
    flat_table = table.view(-1)
    for r0 in range(0, out_f, rows_per_tile):
        r1 = min(out_f, r0 + rows_per_tile)
        index = packed[r0:r1].int() + offsets  # (rows, in/2) int32
        values = flat_table.index_select(0, index.view(-1))  # (rows * in/2,)
        sums = values.view(r1 - r0, -1, seg).sum(dim=2)  # (rows, segs/row)
        y[r0:r1] = (sums * seg_scale[r0:r1]).sum(dim=1)
    return y


def _gemv_nibbles(xf: torch.Tensor, q: QuantizedTensor, scale: torch.Tensor, out_f: int, in_f: int) -> torch.Tensor:
    """Odd ``in``: unpack every code and look it up in the (in, 16) table ``T[c] * x[i]``."""
    table = (xf.unsqueeze(1) * q.code.unsqueeze(0)).view(-1)  # (in * 16,)
    packed = q.packed.view(-1)
    seg = math.gcd(q.blocksize, in_f)  # elements per segment (odd: a divisor of in)
    seg_scale = _segment_scales(scale, q.blocksize // seg, out_f * in_f // seg).view(out_f, -1)  # (out, segs/row)
    rows_per_tile = max(1, TILE_BYTES // (4 * in_f))
    cols = torch.arange(in_f, dtype=torch.int32, device=xf.device) * 16  # (in,)
    y = torch.empty(out_f, device=xf.device)
    for r0 in range(0, out_f, rows_per_tile):
        r1 = min(out_f, r0 + rows_per_tile)
        k0, k1 = r0 * in_f, r1 * in_f  # flat element range of the tile
        chunk = packed[k0 // 2 : (k1 + 1) // 2].int()
        codes = torch.stack([chunk >> 4, chunk & 0x0F], dim=1).view(-1)[k0 % 2 : k0 % 2 + (k1 - k0)]  # (rows*in,)
        values = table.index_select(0, (codes.view(r1 - r0, in_f) + cols).view(-1))  # (rows * in,)
        sums = values.view(r1 - r0, -1, seg).sum(dim=2)  # (rows, segs/row)
        y[r0:r1] = (sums * seg_scale[r0:r1]).sum(dim=1)
    return y
