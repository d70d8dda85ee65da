"""Property tests (hypothesis): packing round trips, quantize/dequantize round trips and error bounds."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlorakit.quant import dequantize_4bit, quantize_4bit
from qlorakit.quant.codebooks import code_table
from qlorakit.quant.functional import pack_nibbles, unpack_nibbles
from qlorakit.quant.tensor import QuantizedTensor

quant_types = st.sampled_from(["nf4", "fp4", "int4"])
blocksizes = st.sampled_from([32, 64, 128, 256])
finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


@given(st.lists(st.integers(0, 15), min_size=1, max_size=300))
def test_pack_then_unpack_returns_the_codes(codes):
    t = torch.tensor(codes, dtype=torch.uint8)
    packed = pack_nibbles(t)
    assert packed.shape == ((len(codes) + 1) // 2, 1)
    assert torch.equal(unpack_nibbles(packed, len(codes)), t)
    assert int(packed[0, 0]) >> 4 == codes[0]  # the even index sits in the high nibble


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=700), quant_types, blocksizes)
def test_requantizing_a_dequantized_tensor_reproduces_it(values, quant_type, blocksize):
    x = torch.tensor(values)
    q = quantize_4bit(x, quant_type, blocksize, double_quant=False)
    x_hat = dequantize_4bit(q)
    q2 = quantize_4bit(x_hat, quant_type, blocksize, double_quant=False)
    assert torch.equal(dequantize_4bit(q2), x_hat)


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=700), quant_types, blocksizes)
def test_error_is_at_most_half_the_widest_gap_times_absmax(values, quant_type, blocksize):
    x = torch.tensor(values)
    q = quantize_4bit(x, quant_type, blocksize, double_quant=False)
    err = (dequantize_4bit(q) - x).abs()
    table = code_table(quant_type).sort().values
    half_gap = (table[1:] - table[:-1]).max() / 2
    scale = q.absmax.repeat_interleave(blocksize)[: x.numel()]
    assert bool((err <= half_gap * scale * (1 + 1e-6) + 1e-30).all())


@settings(max_examples=40, deadline=None)
@given(st.lists(finite, min_size=1, max_size=3000), quant_types, blocksizes, st.booleans())
def test_state_survives_the_bitsandbytes_dict_round_trip(values, quant_type, blocksize, double_quant):
    x = torch.tensor(values)
    q = quantize_4bit(x, quant_type, blocksize, double_quant)
    back = QuantizedTensor.from_bnb_dict(q.packed, q.to_bnb_dict())
    assert torch.equal(dequantize_4bit(back), dequantize_4bit(q))


@settings(max_examples=40, deadline=None)
@given(st.lists(finite, min_size=1, max_size=3000), blocksizes)
def test_double_quant_changes_each_scale_by_little(values, blocksize):
    x = torch.tensor(values)
    plain = quantize_4bit(x, "nf4", blocksize, double_quant=False)
    dq = quantize_4bit(x, "nf4", blocksize, double_quant=True)
    assert torch.equal(dq.packed, plain.packed)  # the codes do not depend on how absmax is stored
    from qlorakit.quant.functional import block_absmax

    spread = float(plain.absmax.max() - plain.absmax.min())
    # 8-bit dynamic codes of (absmax - mean): error below 1% of the largest |absmax - mean| per 256-block
    assert float((block_absmax(dq) - plain.absmax).abs().max()) <= 0.01 * spread + 1e-6 * float(plain.absmax.max())


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=3000), quant_types, blocksizes, st.booleans(),
       st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_fast_dequantize_equals_the_reference_bit_for_bit(values, quant_type, blocksize, double_quant, dtype):
    from qlorakit.quant.functional import dequantize_4bit_reference

    x = torch.tensor(values).clamp(-6e4, 6e4).to(dtype)
    q = quantize_4bit(x, quant_type, blocksize, double_quant)
    for out_dtype in (None, torch.float32, torch.bfloat16):
        ref = dequantize_4bit_reference(q, out_dtype)
        for use_native in (True, False):  # the compiled kernel (where it builds) and the torch gather
            fast = dequantize_4bit(q, out_dtype, use_native=use_native)
            assert fast.dtype == ref.dtype and torch.equal(fast, ref)
