"""Linear4bit: fp64 reference for forward/backward, bitsandbytes state-dict interop, device moves.

Tolerance for the fp64 comparisons: the fp32 result of a length-K dot product carries a relative
rounding error of about K * 2**-24; with K <= 256 and unit-scale data we allow rtol = atol = 1e-5.
"""

import pytest
import torch
from torch import nn

from qlorakit.errors import StateDictError
from qlorakit.quant import Linear4bit, dequantize_4bit, quantize_4bit
from qlorakit.quant.linear import dequantize_scratch

bnb = pytest.importorskip("bitsandbytes")

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _linear(in_f=128, out_f=96, bias=True):
    return nn.Linear(in_f, out_f, bias=bias)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("lead", [(7,), (2, 3), (2, 3, 4)])
def test_forward_and_input_grad_match_fp64_reference(quant_type, double_quant, lead):
    lin = _linear()
    layer = Linear4bit.from_linear(lin, quant_type=quant_type, double_quant=double_quant)
    w64 = dequantize_4bit(layer.qweight, torch.float64)  # (out, in)
    x = torch.randn(*lead, 128, requires_grad=True)
    y = layer(x)
    assert y.shape == (*lead, 96)
    ref = x.detach().double() @ w64.t() + lin.bias.detach().double()
    torch.testing.assert_close(y.double(), ref, **TOL)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad.double(), g.double() @ w64, **TOL)


def test_only_the_input_gets_a_gradient_and_no_weight_sized_tensor_is_saved():
    layer = Linear4bit.from_linear(_linear(256, 192))
    assert [p.requires_grad for p in layer.parameters()] == [False]  # the frozen bias only
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(4, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert all(t.numel() < 192 * 256 for t in saved), [tuple(t.shape) for t in saved]
    y.sum().backward()
    assert x.grad is not None and layer.bias.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("use_native", [True, False])
def test_dequantize_into_out_equals_a_new_tensor(dtype, use_native):
    q = quantize_4bit(torch.randn(96, 128), "nf4", 64, True)
    out = torch.full((96, 128), float("nan"), dtype=dtype)
    result = dequantize_4bit(q, dtype, use_native=use_native, out=out)
    assert result.data_ptr() == out.data_ptr() and result.shape == (96, 128)
    assert torch.equal(out, dequantize_4bit(q, dtype, use_native=use_native))


def test_reused_dequant_buffer_gives_bit_identical_outputs_and_grads():
    """Two layers of different shapes run forward, then backward in reverse: each pass dequantizes into the
    one shared buffer, so a result that leaked from it (a view kept past the matmul) would be overwritten."""
    layers = [Linear4bit.from_linear(_linear(128, 96)), Linear4bit.from_linear(_linear(96, 160))]
    x = torch.randn(2, 5, 128)
    runs = []
    for reuse in (True, False):
        for layer in layers:
            layer.reuse_dequant_buffer = reuse
        xg = x.clone().requires_grad_(True)
        out = layers[1](layers[0](xg))
        out.backward(torch.ones_like(out))
        runs.append((out.detach(), xg.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    first = dequantize_scratch(layers[0].qweight, torch.float32)
    assert dequantize_scratch(layers[1].qweight, torch.float32).data_ptr() == first.data_ptr()  # one buffer


def test_compute_dtype_casts_input_and_returns_input_dtype():
    layer = Linear4bit.from_linear(_linear(), compute_dtype=torch.bfloat16)
    x = torch.randn(3, 128)
    y = layer(x)
    assert y.dtype == torch.float32
    w = dequantize_4bit(layer.qweight, torch.bfloat16)
    ref = (x.bfloat16() @ w.t() + layer.bias.bfloat16()).float()
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2)


def _bnb_layer(lin, quant_type, double_quant):
    layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compress_statistics=double_quant, quant_type=quant_type)
    layer.load_state_dict(lin.state_dict())
    layer = layer.to("cpu")  # quantizes
    layer.support_avx512bf16_for_cpu = False  # keep bitsandbytes on its exact fp32 path (no repacking)
    return layer


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_is_exactly_bitsandbytes(quant_type, double_quant, bias):
    lin = _linear(bias=bias)
    ours = Linear4bit.from_linear(lin, quant_type=quant_type, double_quant=double_quant).state_dict()
    theirs = _bnb_layer(lin, quant_type, double_quant).state_dict()
    assert list(ours) == list(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_state_dict_loads_here_with_the_same_output(quant_type, double_quant):
    lin = _linear()
    theirs = _bnb_layer(lin, quant_type, double_quant)
    ours = Linear4bit(128, 96, quant_type="nf4", double_quant=not double_quant)  # overwritten by the load
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 5, 128)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
    assert ours.qweight.quant_type == quant_type and ours.qweight.double_quant == double_quant


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_our_state_dict_loads_into_bitsandbytes_with_the_same_output(quant_type, double_quant):
    # bitsandbytes reads a saved 4-bit layer through Params4bit.from_prequantized (what transformers
    # calls when loading a 4-bit checkpoint); its Linear4bit.load_state_dict takes only the bias.
    lin = _linear()
    ours = Linear4bit.from_linear(lin, quant_type=quant_type, double_quant=double_quant)
    sd = ours.state_dict()
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    theirs = bnb.nn.Linear4bit(128, 96, bias=True)
    theirs.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=theirs)
    theirs.bias = nn.Parameter(sd["bias"].clone())
    theirs.support_avx512bf16_for_cpu = False
    assert theirs.weight.quant_state.quant_type == quant_type and theirs.weight.quant_state.nested == double_quant
    x = torch.randn(2, 5, 128)
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-6, atol=1e-6)


def test_load_rejects_a_state_dict_of_another_shape():
    other = Linear4bit.from_linear(_linear(128, 64)).state_dict()
    layer = Linear4bit(128, 96)
    with pytest.raises(StateDictError, match=r"shape \[64, 128\].*out_features=96"):
        layer.load_state_dict(other)


def test_load_rejects_corrupt_quant_state_json():
    sd = Linear4bit.from_linear(_linear()).state_dict()
    sd["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(StateDictError, match="not valid UTF-8 JSON"):
        Linear4bit(128, 96).load_state_dict(sd)


def test_load_rejects_absmax_of_the_wrong_length():
    sd = Linear4bit.from_linear(_linear()).state_dict()
    sd["weight.absmax"] = sd["weight.absmax"][:-1]
    with pytest.raises(StateDictError, match=r"weight.absmax: shape \(191,\)"):
        Linear4bit(128, 96).load_state_dict(sd)


def test_load_reports_missing_weight_key():
    sd = Linear4bit.from_linear(_linear()).state_dict()
    del sd["weight"]
    result = Linear4bit(128, 96).load_state_dict(sd, strict=False)
    assert "weight" in result.missing_keys


def test_module_dtype_cast_keeps_quantized_state_and_moves_device():
    layer = Linear4bit.from_linear(_linear())
    before = layer.qweight
    layer.half()
    assert layer.bias.dtype == torch.float16
    assert layer.qweight.absmax.dtype == torch.uint8 and layer.qweight.nested.absmax.dtype == torch.float32
    assert torch.equal(layer.qweight.nested.absmax, before.nested.absmax)
    layer.to("meta")
    assert layer.qweight.device.type == "meta" and layer.qweight.nested.code.device.type == "meta"


def test_nbytes_and_weight_property():
    layer = Linear4bit.from_linear(_linear(256, 192))
    q = layer.qweight
    assert layer.weight is q.packed and q.packed.dtype == torch.uint8
    # codes, absmax, map, 3 nested scales, nested map
    expected = 256 * 192 // 2 + 256 * 192 // 64 + 16 * 4 + 4 * 3 + 256 * 4
    assert q.nbytes == expected


def test_quantized_tensor_bnb_dict_round_trip():
    from qlorakit.quant import QuantizedTensor

    q = quantize_4bit(torch.randn(33, 65), "fp4", 128, True)
    back = QuantizedTensor.from_bnb_dict(q.packed, q.to_bnb_dict())
    assert back.shape == q.shape and back.quant_type == "fp4" and back.blocksize == 128
    assert torch.equal(dequantize_4bit(back), dequantize_4bit(q))
