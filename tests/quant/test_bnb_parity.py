"""Bit-identity with bitsandbytes 0.50.2 on CPU: packed bytes, absmax / nested state, dequantized values.

bitsandbytes has no int4 quantizer, so int4 is covered by the fp64 and property tests instead.
Dequantized values are compared on bitsandbytes' 1-D view of the state, because its AVX-512 CPU kernel
mis-indexes blocks of 2-D tensors whose rows are not a multiple of the block size (0.50.2: mean error
about 2x ours on 576-wide rows with blocksize 128); 2-D shapes with whole-block rows are also compared as 2-D.
"""

import pytest
import torch

from qlorakit.quant import dequantize_4bit, quantize_4bit

bnbF = pytest.importorskip("bitsandbytes.functional")

BLOCKSIZES = [32, 64, 128, 256, 4096]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(4096 * 3,), (777_001,), (33,), (1000,), (192, 64), (96, 576), (3, 5, 7)]


def _data(shape, dtype, kind="normal"):
    n = torch.Size(shape).numel()
    if kind == "normal":
        x = torch.randn(n)
    elif kind == "heavy":  # Student-t with 1 degree of freedom (Cauchy) times a few large outliers
        x = torch.distributions.StudentT(1.0).sample((n,))
        x[:: max(n // 7, 1)] *= 1e3
    else:
        raise ValueError(kind)
    x = x.clamp(-6e4, 6e4)  # stay finite in fp16
    if n > 130:
        x[64:128] = 0  # one all-zero block (at blocksize <= 64) or a zero run inside a block
    return x.reshape(shape).to(dtype)


def _bnb(x, quant_type, blocksize, double_quant):
    return bnbF.quantize_4bit(x, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)


def _bnb_dequant_flat(packed, state):
    shape = state.shape
    state.shape = torch.Size([shape.numel()])
    try:
        return bnbF.dequantize_4bit(packed, state).reshape(shape)
    finally:
        state.shape = shape


def _assert_identical(x, quant_type, blocksize, double_quant):
    packed, state = _bnb(x, quant_type, blocksize, double_quant)
    q = quantize_4bit(x, quant_type, blocksize, double_quant)
    assert torch.equal(q.packed, packed), "packed codes differ"
    assert q.packed.shape == ((x.numel() + 1) // 2, 1)
    assert torch.equal(q.absmax, state.absmax), "absmax differs"
    if double_quant:
        assert torch.equal(q.nested.absmax, state.state2.absmax), "nested absmax differs"
        assert torch.equal(q.nested.code, state.state2.code)
        assert q.nested.offset == state.offset.item()
    ours = dequantize_4bit(q)
    assert ours.dtype == x.dtype and ours.shape == x.shape
    assert torch.equal(ours, _bnb_dequant_flat(packed, state)), "dequantized values differ"
    if x.dim() == 2 and x.shape[-1] % blocksize == 0:
        assert torch.equal(ours, bnbF.dequantize_4bit(packed, state))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bit_identical_to_bitsandbytes(quant_type, double_quant, blocksize, dtype):
    for shape in SHAPES:
        _assert_identical(_data(shape, dtype), quant_type, blocksize, double_quant)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bit_identical_on_heavy_tailed_data(quant_type, double_quant, dtype):
    for blocksize in (64, 256):
        for shape in [(64 * 257,), (511, 64), (1001,)]:
            _assert_identical(_data(shape, dtype, "heavy"), quant_type, blocksize, double_quant)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 4096])
def test_bit_identical_on_all_zero_tensors(quant_type, double_quant, n):
    x = torch.zeros(n)
    _assert_identical(x, quant_type, 64, double_quant)
    assert not dequantize_4bit(quantize_4bit(x, quant_type, 64, double_quant)).isnan().any()


def test_bit_identical_with_nested_state_spanning_several_256_blocks():
    x = torch.randn(64 * 256 * 3 + 64 * 5 + 7)  # 773 absmax values: four nested blocks, the last partial
    for quant_type in ("nf4", "fp4"):
        _assert_identical(x, quant_type, 64, True)
