"""4-bit quantization of a large weight in chunks, bit-identical to ``quantize_4bit`` on the whole tensor.

``quantize_4bit`` holds several temporaries the size of its input (an fp32 copy, the scaled values,
int64 codes): about 24 bytes per element, 270 MiB for an 11.5M-element MLP weight of a 1B model —
ten times the bf16 weight itself. Loading streams one tensor at a time, so that transient is the
loader's peak above the final model. Here the flattened weight is cut at multiples of the block size
and each chunk is quantized alone without double quantization; since blocks never straddle a cut (and
only the last chunk can end in a partial block), the packed codes and the fp32 per-block absmax are
exactly those of the whole tensor. Double quantization (QLoRA eq. 6) is then applied to the
concatenated absmax, exactly as ``quantize_4bit`` does: ``offset = mean(absmax)``, ``absmax - offset``
quantized blockwise (256) to 8 bits with the dynamic map.
"""

from __future__ import annotations

import torch

from qlorakit.config import QuantConfig
from qlorakit.quant.codebooks import dynamic_table
from qlorakit.quant.functional import quantize_4bit, quantize_blockwise_8bit
from qlorakit.quant.tensor import NESTED_BLOCKSIZE, NestedState, QuantizedTensor

#: Elements quantized at once (about 24 MiB of temporaries).
CHUNK_NUMEL = 2**20


def quantize_chunked(
    w: torch.Tensor, quant: QuantConfig, name: str = "weight", chunk_numel: int = CHUNK_NUMEL
) -> QuantizedTensor:
    """``quantize_4bit(w, ...)`` with temporaries bounded by ``chunk_numel`` elements; same bits."""
    if w.numel() <= chunk_numel:
        return quantize_4bit(w, quant.quant_type, quant.blocksize, quant.double_quant, name=name)
    step = max(quant.blocksize, chunk_numel - chunk_numel % quant.blocksize)  # whole blocks per chunk
    flat = w.detach().reshape(-1)  # (n,)
    parts = [
        quantize_4bit(flat[start : start + step], quant.quant_type, quant.blocksize, False, name=name)
        for start in range(0, flat.numel(), step)
    ]
    packed = torch.cat([p.packed for p in parts])  # ((n + 1) // 2, 1): every chunk but the last has even length
    absmax = torch.cat([p.absmax for p in parts])  # fp32 (blocks,)
    nested = None
    if quant.double_quant:
        offset = absmax.mean()
        absmax, nested_absmax = quantize_blockwise_8bit(absmax - offset, dynamic_table(w.device), NESTED_BLOCKSIZE)
        nested = NestedState(absmax=nested_absmax, code=dynamic_table(w.device), offset=float(offset))
    return QuantizedTensor(
        packed=packed, absmax=absmax, code=parts[0].code, quant_type=quant.quant_type, blocksize=quant.blocksize,
        shape=tuple(w.shape), dtype=w.dtype, nested=nested,
    )  # fmt: skip
