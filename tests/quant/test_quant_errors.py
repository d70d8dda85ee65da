"""Bad input to the 4-bit core fails with a specific, named error."""

import pytest
import torch

from qlorakit.errors import QuantizationError
from qlorakit.quant import Linear4bit, bits_per_param, quantize_4bit


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool, torch.float64])
def test_non_float_or_unsupported_dtype_is_rejected(dtype):
    with pytest.raises(QuantizationError, match="cannot be quantized; use float32, bfloat16 or float16"):
        quantize_4bit(torch.zeros(64, dtype=dtype))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_value_names_the_tensor_and_index(bad):
    w = torch.randn(4, 64)
    w[2, 5] = bad
    with pytest.raises(QuantizationError, match=r"layers\.0\.q_proj\.weight: non-finite value .* at flat index 133"):
        quantize_4bit(w, name="layers.0.q_proj.weight")


def test_nan_in_a_linear_is_named_by_from_linear():
    lin = torch.nn.Linear(64, 8)
    lin.weight.data[0, 0] = float("nan")
    with pytest.raises(QuantizationError, match="mlp.up_proj.weight"):
        Linear4bit.from_linear(lin, name="mlp.up_proj.weight")


def test_empty_tensor_is_rejected():
    with pytest.raises(QuantizationError, match=r"empty tensor \(shape \(0, 64\)\)"):
        quantize_4bit(torch.zeros(0, 64))


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192])
def test_unsupported_blocksize_is_rejected(blocksize):
    with pytest.raises(QuantizationError, match=f"blocksize {blocksize} not supported"):
        quantize_4bit(torch.randn(64), blocksize=blocksize)


def test_unknown_quant_type_lists_the_choices():
    with pytest.raises(QuantizationError, match="unknown quant_type 'nf5'; choose one of nf4, fp4, int4"):
        quantize_4bit(torch.randn(64), quant_type="nf5")


def test_not_a_tensor_is_rejected():
    with pytest.raises(QuantizationError, match="expected a torch.Tensor, got list"):
        quantize_4bit([1.0, 2.0])


def test_bad_compute_dtype_is_rejected():
    with pytest.raises(QuantizationError, match="compute_dtype"):
        Linear4bit(64, 8, compute_dtype=torch.int8)


def test_wrong_input_width_is_rejected():
    with pytest.raises(QuantizationError, match="input has 32 features, layer expects 64"):
        Linear4bit(64, 8)(torch.randn(2, 32))


def test_bits_per_param_matches_the_paper():
    assert round(bits_per_param("nf4", 64, True), 3) == 4.127
    assert bits_per_param("nf4", 64, False) == 4.5
    assert round(bits_per_param("nf4", 64, False) - bits_per_param("nf4", 64, True), 3) == 0.373
    with pytest.raises(QuantizationError):
        bits_per_param("nf4", 63, True)
