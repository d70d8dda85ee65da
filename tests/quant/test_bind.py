"""The bound projections (``Linear4bit.bind``, ``bind_linear``) are their layer's forward, and the layer
settings (``use_gemv``, ``reuse_dequant_buffer``) belong to each layer, not to the class.

``Linear4bit.bind()`` must equal ``Linear4bit.forward`` bit for bit: it runs the same branch with the same
kernel, only marshalled once. The dense one-row GEMV of ``bind_linear`` sums in another order than
``F.linear``: it is held to the fp32 summation bound ``1e-6 * sqrt(in) * max|x| * max|W|`` (as in test_gemv).
"""

import pytest
import torch
from torch import nn

import qlorakit.quant.linear as linear_module
from qlorakit.quant.backends import native_cpu
from qlorakit.quant.gemv import FEW_ROWS, gemv_4bit
from qlorakit.quant.linear import Linear4bit, bind_linear

IN, OUT = 96, 40


def _layer(bias=True, compute_dtype=None, seed=0):
    torch.manual_seed(seed)
    return Linear4bit.from_linear(nn.Linear(IN, OUT, bias=bias), compute_dtype=compute_dtype)


@pytest.mark.parametrize("rows", [1, FEW_ROWS, FEW_ROWS + 1, 40])
@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_bound_linear4bit_equals_forward_bit_for_bit(rows, compute_dtype, input_dtype, bias):
    layer = _layer(bias, compute_dtype)
    bound = layer.bind()
    x = torch.randn(rows, IN).to(input_dtype)
    with torch.no_grad():
        got, want = bound(x), layer(x)
    assert got.dtype == want.dtype == input_dtype and got.shape == (rows, OUT)
    assert torch.equal(got, want)


def test_bound_linear4bit_uses_the_prebound_kernel_for_few_rows(monkeypatch):
    if native_cpu() is None:
        pytest.skip("no compiled kernel on this machine")
    layer = _layer()
    bound = layer.bind()
    monkeypatch.setattr(linear_module, "gemv_4bit", lambda x, q: pytest.fail("per-call gemv_4bit used"))
    with torch.no_grad():
        bound(torch.randn(FEW_ROWS, IN))


def test_bound_linear4bit_reads_use_gemv_at_every_call():
    layer = _layer()
    bound = layer.bind()
    x = torch.randn(1, IN)
    with torch.no_grad():
        fast = bound(x)
        layer.use_gemv = False
        reference = bound(x)
        assert torch.equal(reference, layer(x))  # the dequantize + matmul path
    tolerance = 1e-5 * IN**0.5 * float(x.abs().max() * layer.dequantize(torch.float32).abs().max())
    torch.testing.assert_close(fast, reference, rtol=0, atol=tolerance)


def test_bound_linear4bit_sends_inputs_needing_grad_to_forward():
    layer = _layer()
    x = torch.randn(1, IN, requires_grad=True)
    layer.bind()(x).sum().backward()  # the reference path: it has a backward
    assert x.grad is not None and x.grad.shape == (1, IN)


def test_use_gemv_is_a_setting_of_each_layer(monkeypatch):
    calls = []
    monkeypatch.setattr(linear_module, "gemv_4bit", lambda x, q: calls.append(q) or gemv_4bit(x, q))
    on, off = _layer(seed=1), _layer(seed=2)
    off.use_gemv = False
    assert Linear4bit.from_linear(nn.Linear(IN, OUT)).use_gemv  # a new layer keeps the default
    with torch.no_grad():
        on(torch.randn(1, IN))
        off(torch.randn(1, IN))
    assert calls == [on.qweight]


def test_reuse_dequant_buffer_is_a_setting_of_each_layer(monkeypatch):
    used = []
    scratch = linear_module.dequantize_scratch
    monkeypatch.setattr(linear_module, "dequantize_scratch", lambda q, dtype: used.append(q) or scratch(q, dtype))
    reusing, fresh = _layer(seed=1), _layer(seed=2)
    fresh.reuse_dequant_buffer = False
    x = torch.randn(FEW_ROWS + 1, IN, requires_grad=True)
    (reusing(x).sum() + fresh(x).sum()).backward()  # forward and backward of each
    assert used == [reusing.qweight, reusing.qweight]


def test_empty_layer_has_the_default_settings():
    layer = Linear4bit.empty(IN, OUT, compute_dtype=torch.bfloat16)
    assert (layer.use_gemv, layer.reuse_dequant_buffer, layer.compute_dtype) == (True, True, torch.bfloat16)
    assert (layer.in_features, layer.out_features) == (IN, OUT)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 5])
def test_bound_dense_linear_is_its_forward(bias, rows):
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT, bias=bias)
    x = torch.randn(rows, IN)
    with torch.no_grad():
        got, want = bind_linear(linear)(x), linear(x)
    if rows == 1 and not bias:  # the compiled dense GEMV, when there is one
        bound = 1e-6 * IN**0.5 * float(x.abs().max() * linear.weight.detach().abs().max())
        assert got.shape == want.shape and float((got - want).abs().max()) <= bound
    else:
        assert torch.equal(got, want)  # F.linear


def test_bind_linear_of_other_modules_is_the_module():
    module = nn.Identity()
    assert bind_linear(module) is module
