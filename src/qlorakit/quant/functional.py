"""Blockwise 4-bit quantization (NF4 / FP4 / INT4) with double quantization — the pure-torch reference.

QLoRA section 3. For a flattened weight ``x`` split into blocks of ``B`` values (the last may be partial):

    absmax_b = max_i |x_i|                      (fp32, per block)
    code_i   = argmin_k |x_i / absmax_b - T[k]| (T = the 16-entry table; a tie goes to the lower entry)
    x_hat_i  = T[code_i] * absmax_b

Double quantization (QLoRA eq. 6) stores the fp32 absmax values themselves in 8 bits:
``offset = mean(absmax)``, ``absmax - offset`` is quantized blockwise (block 256) with the signed dynamic
map, so the scale costs ``8/B + 32/(256 B)`` bits per parameter instead of ``32/B``.

Every operation is the one bitsandbytes 0.50 performs on CPU, in the same fp32 order, so packed bytes,
absmax and dequantized values are bit-identical to it (tests hold this):

- 4-bit: full blocks are scaled by the fp32 reciprocal ``x * (1/absmax)``; a trailing partial block is
  divided ``x / absmax``; a zero absmax is clamped to 1e-38 in the reciprocal (the stored absmax stays 0
  for full blocks and becomes 1e-38 for a zero partial block), so all-zero blocks give code(0), not NaN.
- 8-bit (double quant): bitsandbytes' CPU kernel maps ``v = x * (1/absmax)`` to a 65,536-bin grid,
  ``i = floor((v + 1) * 0.5 * 65535 + 0.5)``, and looks up the code nearest to the bin's centre
  ``-1 + 2 i / 65535``. This differs from exact nearest rounding for ~6% of values near 0, so the
  reference implements the grid, not ``argmin``.
"""

from __future__ import annotations

from functools import cache

import torch

from qlorakit.errors import QuantizationError
from qlorakit.quant import backends
from qlorakit.quant.codebooks import code_table, dynamic_table, midpoints
from qlorakit.quant.tensor import (
    NESTED_BLOCKSIZE,
    NestedState,
    QuantizedTensor,
    check_format,
)

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: Number of bins of bitsandbytes' CPU 8-bit quantization grid.
LUT_BINS = 65536


def bits_per_param(quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True) -> float:
    """Storage bits per parameter: 4 for the code plus the amortised block scales.

    Without double quant: ``4 + 32/B``. With it: ``4 + 8/B + 32/(256 B)`` (the 256-entry maps are a
    per-tensor constant and are not counted). NF4 + DQ at B = 64 gives 4.127; without DQ 4.5.
    """
    check_format(quant_type, blocksize)
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * NESTED_BLOCKSIZE)
    return 4 + 32 / blocksize


def check_weight(w: torch.Tensor, name: str = "weight") -> None:
    """Raise ``QuantizationError`` unless ``w`` is a non-empty, finite fp32/bf16/fp16 tensor."""
    if not isinstance(w, torch.Tensor):
        raise QuantizationError(f"{name}: expected a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise QuantizationError(f"{name}: dtype {w.dtype} cannot be quantized; use float32, bfloat16 or float16")
    if w.numel() == 0:
        raise QuantizationError(f"{name}: empty tensor (shape {tuple(w.shape)}) cannot be quantized")
    finite = torch.isfinite(w)
    if not bool(finite.all()):
        bad = int((~finite).reshape(-1).nonzero()[0])
        value = w.reshape(-1)[bad].item()
        raise QuantizationError(f"{name}: non-finite value {value} at flat index {bad} (shape {tuple(w.shape)})")


# --- packing ---------------------------------------------------------------------------------------


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (n,) in 0..15 -> packed uint8 ((n+1)//2, 1); even index in the high nibble.

    For odd n the spare low nibble is 0 (``quantize_4bit`` passes an even count itself).
    """
    codes = codes.reshape(-1).to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    return ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``pack_nibbles``: packed uint8 -> codes uint8 (n,)."""
    packed = packed.reshape(-1)
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:n]


# --- 4-bit -----------------------------------------------------------------------------------------


def _scale_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """flat fp32 (n,) -> (scaled values in [-1, 1] (n,), absmax fp32 (blocks,)), as bitsandbytes does."""
    n = flat.numel()
    full = n - n % blocksize
    body = flat[:full].view(-1, blocksize)  # (full_blocks, B)
    absmax = body.abs().amax(dim=1)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)
    if full < n:
        tail_absmax = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_absmax, -1, 1)])
    return scaled, absmax


def quantize_4bit(
    w: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    name: str = "weight",
) -> QuantizedTensor:
    """Quantize ``w`` (any shape, fp32/bf16/fp16) blockwise to 4 bits; ``name`` labels errors."""
    check_format(quant_type, blocksize)
    check_weight(w, name)
    table = code_table(quant_type, w.device)
    bounds, order = midpoints(table)
    flat = w.detach().reshape(-1).float()  # (n,)
    scaled, absmax = _scale_blocks(flat, blocksize)
    if scaled.numel() % 2:  # an odd count: the spare low nibble holds the code of 0.0
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    codes = torch.bucketize(scaled, bounds, out_int32=True)  # (n or n+1,) positions in the sorted table
    if not torch.equal(order, torch.arange(16, device=order.device)):  # NF4's table is sorted already
        codes = order[codes]
    nested = None
    if double_quant:
        offset = absmax.mean()
        qabsmax, nested_absmax = quantize_blockwise_8bit(absmax - offset, dynamic_table(w.device), NESTED_BLOCKSIZE)
        nested = NestedState(absmax=nested_absmax, code=dynamic_table(w.device), offset=float(offset))
        absmax = qabsmax
    return QuantizedTensor(
        packed=pack_nibbles(codes),
        absmax=absmax,
        code=table,
        quant_type=quant_type,
        blocksize=blocksize,
        shape=tuple(w.shape),
        dtype=w.dtype,
        nested=nested,
    )


def block_absmax(q: QuantizedTensor) -> torch.Tensor:
    """The fp32 per-block scales of ``q`` (decoding the 8-bit double-quantized form if present)."""
    if q.nested is None:
        return q.absmax
    return dequantize_blockwise_8bit(q.absmax, q.nested.absmax, q.nested.code, q.nested.blocksize) + q.nested.offset


def dequantize_4bit_reference(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The obviously-correct decode: unpack every code, look it up, scale it by its block's absmax."""
    codes = unpack_nibbles(q.packed, q.numel).long()  # (n,)
    scale = block_absmax(q).repeat_interleave(q.blocksize)[: q.numel]  # (n,)
    return (q.code[codes] * scale).view(q.shape).to(dtype or q.dtype)


@cache
def _pair_index(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    byte = torch.arange(256, device=device)
    return byte >> 4, byte & 0x0F


def pair_table(code: torch.Tensor) -> torch.Tensor:
    """(256,) int64 whose 8 bytes are the fp32 values ``(code[byte >> 4], code[byte & 15])`` of each byte."""
    hi, lo = _pair_index(code.device)
    return torch.stack([code[hi], code[lo]], dim=1).contiguous().view(torch.int64).view(256)


def dequantize_4bit(
    q: QuantizedTensor, dtype: torch.dtype | None = None, use_native: bool = True, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``table[code] * absmax`` in fp32, reshaped to ``q.shape`` and cast to ``dtype`` (default ``q.dtype``).

    The fast path of ``dequantize_4bit_reference`` (bit-identical; tests hold them equal): each packed
    byte indexes a 256-entry table whose int64 entries hold the fp32 pair it decodes to, so one gather
    yields two values; viewing the gathered int64 as fp32 puts the high nibble's value first (little-endian
    byte order, as on x86 and ARM). The stream is padded to whole blocks (the block size is even, so a
    byte never straddles two blocks) and sliced back afterwards. On a CPU where the compiled kernel
    (``backends.native_cpu()``) is available it does the same lookups and multiplies in AVX-512 registers
    instead (also bit-identical; ``use_native=False`` or ``QLORAKIT_NATIVE=0`` keeps the torch gather).
    ``out``: a contiguous tensor of ``q.shape`` in the target dtype to write the result into (and return);
    the compiled kernel writes it directly, the torch path copies into it.
    """
    target = dtype or q.dtype
    kernels = backends.native_cpu() if use_native else None
    if kernels is not None:
        kernel_dtype = target if target == torch.bfloat16 else torch.float32
        direct = out if out is not None and target == kernel_dtype else None
        native = kernels.dequantize(q, kernel_dtype, out=direct)  # (n,) or None
        if native is not None:
            result = native.view(q.shape).to(target)
            return result if out is None or direct is not None else out.copy_(result)
    if out is not None:
        return out.copy_(dequantize_4bit(q, dtype, use_native=False))
    absmax = block_absmax(q)  # (blocks,)
    padded_bytes = q.num_blocks * q.blocksize // 2
    packed = q.packed.reshape(-1)
    if packed.numel() < padded_bytes:
        packed = torch.nn.functional.pad(packed, (0, padded_bytes - packed.numel()))
    pairs = pair_table(q.code).index_select(0, packed.int())  # (bytes,) int64; int32 indices gather ~3x faster
    values = pairs.view(torch.float32).view(q.num_blocks, q.blocksize)  # (blocks, B)
    out = (values * absmax.unsqueeze(1)).view(-1)[: q.numel]
    return out.view(q.shape).to(dtype or q.dtype)


# --- 8-bit blockwise (double quantization) ---------------------------------------------------------


@cache
def _grid_lookup(code_bytes: bytes, device: torch.device) -> torch.Tensor:
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32).to(device)
    centres = -1.0 + (2.0 * torch.arange(LUT_BINS, dtype=torch.float32, device=device)) / float(LUT_BINS - 1)
    bounds = (code[:-1] + code[1:]) * 0.5  # (255,) midpoints of the sorted map
    return torch.searchsorted(bounds, centres, side="left").to(torch.uint8)  # (65536,)


def quantize_blockwise_8bit(
    x: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n,) float -> (uint8 codes (n,), fp32 absmax (blocks,)), bitsandbytes' CPU 8-bit rounding.

    ``code`` is a sorted 256-entry map. A block whose absmax is 0 gets code 0 everywhere.
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - n)).view(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)  # (blocks,)
    inv = 1.0 / torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # zero blocks: codes set to 0 below
    v = torch.clamp(padded * inv.unsqueeze(1), -1.0, 1.0)
    bins = ((v + 1.0) * 0.5 * float(LUT_BINS - 1) + 0.5).to(torch.int64)  # (blocks, B)
    lut = _grid_lookup(code.float().cpu().contiguous().numpy().tobytes(), flat.device)
    codes = lut[bins]
    codes[absmax == 0] = 0
    return codes.view(-1)[:n], absmax


def dequantize_blockwise_8bit(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """uint8 codes (n,) -> fp32 ``code[c] * absmax[block]`` (n,)."""
    n = codes.numel()
    blocks = absmax.numel()
    values = torch.nn.functional.pad(code[codes.reshape(-1).long()], (0, blocks * blocksize - n))
    return (values.view(blocks, blocksize) * absmax.unsqueeze(1)).view(-1)[:n]
