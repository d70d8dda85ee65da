"""quantize_chunked is quantize_4bit, bit for bit, with bounded temporaries."""

from __future__ import annotations

import pytest
import torch

from qlorakit.config import QuantConfig
from qlorakit.models.chunked import quantize_chunked
from qlorakit.quant import quantize_4bit


def _assert_identical(a, b):
    assert (a.shape, a.dtype, a.quant_type, a.blocksize) == (b.shape, b.dtype, b.quant_type, b.blocksize)
    for x, y in zip(a.tensors(), b.tensors(), strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)
    assert (a.nested is None) == (b.nested is None)
    if a.nested is not None:
        assert a.nested.offset == b.nested.offset and a.nested.blocksize == b.nested.blocksize


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(90, 130), (64, 96), (1001, 1), (2, 2049)])
def test_chunked_quantization_is_bit_identical(quant_type, double_quant, shape):
    w = torch.randn(shape)
    w[0] = 0.0  # an all-zero block
    quant = QuantConfig(quant_type=quant_type, blocksize=64, double_quant=double_quant)
    _assert_identical(quantize_chunked(w, quant, chunk_numel=1000), quantize_4bit(w, quant_type, 64, double_quant))


@pytest.mark.parametrize("blocksize", [32, 256])
def test_chunk_smaller_than_a_block_and_bf16_input(blocksize):
    w = torch.randn(40, 70).to(torch.bfloat16)
    quant = QuantConfig(blocksize=blocksize)
    _assert_identical(quantize_chunked(w, quant, chunk_numel=10), quantize_4bit(w, "nf4", blocksize, True))
