"""Triton kernels for 4-bit weights: dequantize, fused dequantize-matmul, batch-1 GEMV.

``W`` is the ``(N, K)`` weight of a linear layer (``N`` outputs, ``K`` inputs) stored in the 4-bit format of
``triton_decode``. Three kernels:

- ``dequantize_kernel``: ``out[e] = table[code_e] * scale(e // B)`` for every element; one program decodes
  ``ROWS`` whole quantization blocks as a ``(ROWS, B/2)`` tile of packed bytes, reading each byte once and
  computing each block's scale once. Memory bound: ``n/2`` bytes of codes + ``n/B`` scales in, ``n`` values out.
- ``matmul_kernel``: ``out (M, P) = a (M, R) @ Wv (R, P)`` with ``Wv = W^T`` (``FORWARD``: ``y = x W^T``,
  ``(R, P) = (K, N)``) or ``Wv = W`` (input gradient ``dx = dy W``, ``(R, P) = (N, K)``).
  Each ``(BLOCK_M, BLOCK_P)`` output tile accumulates ``tl.dot`` of an activation tile and a ``(BLOCK_R,
  BLOCK_P)`` weight tile decoded in registers: the dequantized ``W`` is never written to memory.
  When ``K % B == 0`` (``K_ALIGNED``, every real model) and the tile's extent along ``K`` divides ``B``,
  each W row of the tile lies in one block, so the block scale is gathered once per row, not per element.
  The weight tile is cast to the activation dtype before the dot (as the reference casts the whole
  dequantized weight), the accumulator is fp32, the output is cast to ``out``'s dtype. ``M_BUCKET``
  (``M`` rounded up to a power of two) is unused by the body: it is the autotuner's key.
- ``gemv_kernel``: ``y (N,) = W x`` for one input row; one program owns ``BLOCK_N`` rows and walks ``K``
  ``2 BLOCK_B`` values at a time, reading packed bytes directly (needs even ``K``, so rows start on a byte):
  ``y_n = sum_j table[hi_j] s x_{2j} + table[lo_j] s x_{2j+1}`` with the row's block scales ``s``
  (``gemv_scales``: one gather chain per row and block when ``K % B == 0``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from qlorakit.quant.backends.triton_decode import block_scale, code_values


@triton.jit
def dequantize_kernel(
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset, out_ptr, n_elements,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROWS: tl.constexpr,
):
    block = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,) the quantization blocks of this program
    byte_idx = block[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]  # (ROWS, B/2)
    byte_mask = byte_idx * 2 < n_elements
    byte = tl.load(packed_ptr + byte_idx, mask=byte_mask, other=0).to(tl.int32)
    hi = tl.load(code_ptr + (byte >> 4), mask=byte_mask, other=0.0)  # even elements
    lo = tl.load(code_ptr + (byte & 0x0F), mask=byte_mask, other=0.0)  # odd elements
    scale = block_scale(
        block, block * BLOCKSIZE < n_elements, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
        NESTED_BLOCKSIZE, DOUBLE_QUANT,
    )[:, None]  # (ROWS, 1): one gather chain per block
    values = tl.interleave(hi * scale, lo * scale)  # (ROWS, B) in flat order
    out_idx = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + out_idx, values.to(out_ptr.dtype.element_ty), mask=out_idx < n_elements)


@triton.jit
def matmul_kernel(
    a_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset, out_ptr,
    M, P, R, K, stride_am, stride_ar, stride_om, stride_op, M_BUCKET,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    FORWARD: tl.constexpr, K_ALIGNED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_p = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        a_mask = (rm[:, None] < M) & (rr[None, :] < R)
        a = tl.load(a_ptr + rm[:, None] * stride_am + rr[None, :] * stride_ar, mask=a_mask, other=0.0)  # (BM, BR)
        w_mask = (rr[:, None] < R) & (rp[None, :] < P)
        if FORWARD:
            e = rp[None, :] * K + rr[:, None]  # (BR, BP) flat index of W[p, r]
        else:
            e = rr[:, None] * K + rp[None, :]  # (BR, BP) flat index of W[r, p]
        value = code_values(e, w_mask, packed_ptr, code_ptr)  # (BR, BP) table[code]
        if FORWARD and K_ALIGNED and BLOCKSIZE % BLOCK_R == 0:  # the tile's column of each W row is one block
            blocks = rp * (K // BLOCKSIZE) + r0 // BLOCKSIZE  # (BP,)
            scale = block_scale(
                blocks, rp < P, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, NESTED_BLOCKSIZE, DOUBLE_QUANT
            )[None, :]
        elif not FORWARD and K_ALIGNED and BLOCKSIZE % BLOCK_P == 0:  # the tile's part of each W row is one block
            blocks = rr * (K // BLOCKSIZE) + (pid_p * BLOCK_P) // BLOCKSIZE  # (BR,)
            scale = block_scale(
                blocks, rr < R, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, NESTED_BLOCKSIZE, DOUBLE_QUANT
            )[:, None]
        else:
            scale = block_scale(
                e // BLOCKSIZE, w_mask, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, NESTED_BLOCKSIZE,
                DOUBLE_QUANT,
            )  # (BR, BP)
        w = value * scale
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=PRECISION)  # (BM, BP) fp32
    out_mask = (rm[:, None] < M) & (rp[None, :] < P)
    out = out_ptr + rm[:, None] * stride_om + rp[None, :] * stride_op
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def gemv_scales(
    rn, j0, byte_idx, mask, N, K, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, K_ALIGNED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """(BLOCK_N, BLOCK_B) fp32 scales of the packed bytes ``byte_idx`` of rows ``rn``, bytes ``j0 + [0, BLOCK_B)``.

    With ``K % B == 0`` a row starts on a block, so the step covers whole blocks (one gather chain per row
    and block) or lies inside one block (one per row); otherwise every byte gathers its own.
    """
    HALF: tl.constexpr = BLOCKSIZE // 2  # packed bytes per quantization block
    if K_ALIGNED and BLOCK_B % HALF == 0:
        nb = tl.arange(0, BLOCK_B // HALF)  # (NB,) blocks per row in this step
        blocks = rn[:, None] * (K // BLOCKSIZE) + (2 * j0) // BLOCKSIZE + nb[None, :]  # (BN, NB)
        block_mask = (rn[:, None] < N) & (j0 + nb * HALF < K // 2)[None, :]
        per_block = block_scale(
            blocks, block_mask, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, NESTED_BLOCKSIZE, DOUBLE_QUANT
        )
        spread = tl.broadcast_to(per_block[:, :, None], (BLOCK_N, BLOCK_B // HALF, HALF))
        scale = tl.reshape(spread, (BLOCK_N, BLOCK_B))
    elif K_ALIGNED and HALF % BLOCK_B == 0:
        blocks = rn * (K // BLOCKSIZE) + (2 * j0) // BLOCKSIZE  # (BN,)
        per_row = block_scale(
            blocks, rn < N, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, NESTED_BLOCKSIZE, DOUBLE_QUANT
        )
        scale = tl.broadcast_to(per_row[:, None], (BLOCK_N, BLOCK_B))
    else:
        scale = block_scale(
            (byte_idx * 2) // BLOCKSIZE, mask, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
            NESTED_BLOCKSIZE, DOUBLE_QUANT,
        )
    return scale


@triton.jit
def gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset, out_ptr, N, K,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, K_ALIGNED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output rows
    half_k = K // 2
    acc = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
    for j0 in range(0, half_k, BLOCK_B):
        rj = j0 + tl.arange(0, BLOCK_B)  # (BLOCK_B,) byte columns of a row
        col_mask = rj < half_k
        x_even = tl.load(x_ptr + 2 * rj, mask=col_mask, other=0.0)  # (BLOCK_B,)
        x_odd = tl.load(x_ptr + 2 * rj + 1, mask=col_mask, other=0.0)
        mask = (rn[:, None] < N) & col_mask[None, :]
        byte_idx = rn[:, None] * half_k + rj[None, :]  # (BN, BB)
        byte = tl.load(packed_ptr + byte_idx, mask=mask, other=0).to(tl.int32)
        scale = gemv_scales(
            rn, j0, byte_idx, mask, N, K, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
            BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, K_ALIGNED, BLOCK_N, BLOCK_B,
        )  # (BN, BB)
        hi = (tl.load(code_ptr + (byte >> 4), mask=mask, other=0.0) * scale).to(x_ptr.dtype.element_ty)
        lo = (tl.load(code_ptr + (byte & 0x0F), mask=mask, other=0.0) * scale).to(x_ptr.dtype.element_ty)
        acc += hi.to(tl.float32) * x_even[None, :].to(tl.float32) + lo.to(tl.float32) * x_odd[None, :].to(tl.float32)
    y = tl.sum(acc, axis=1)  # (BLOCK_N,)
    tl.store(out_ptr + rn, y.to(out_ptr.dtype.element_ty), mask=rn < N)
