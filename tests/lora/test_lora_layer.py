"""LoraLinear: forward against a float64 reference, init, dropout, rsLoRA, named adapters, merge/unmerge.

Tolerance for the fp64 comparisons: an fp32 dot product of length K carries a relative rounding error of
about K * 2**-24; with K <= 64 and unit-scale data we allow rtol = atol = 1e-5 (as the quant tests do).
"""

import math

import pytest
import torch
from torch import nn

from qlorakit.config import LoraConfig
from qlorakit.errors import ConfigError
from qlorakit.lora import LoraLinear, MergeError
from qlorakit.quant import Linear4bit, dequantize_4bit
from qlorakit.quant.gemv import FEW_ROWS

TOL = {"rtol": 1e-5, "atol": 1e-5}
IN, OUT = 48, 40


def _lora(base=None, r=8, alpha=16.0, dropout=0.0, rslora=False, init="default", name="default"):
    layer = LoraLinear(base if base is not None else nn.Linear(IN, OUT))
    layer.add_adapter(name, LoraConfig(r=r, alpha=alpha, dropout=dropout, rslora=rslora, init=init))
    layer.set_active(name)
    return layer


def _randomize_b(layer, name="default"):
    with torch.no_grad():
        layer.lora_B[name].weight.normal_()


def _reference(layer, x, name="default"):
    """fp64 ``x W^T + b + scale * (x A^T) B^T`` (dropout off)."""
    base = layer.base_layer
    w = dequantize_4bit(base.qweight, torch.float64) if isinstance(base, Linear4bit) else base.weight.double()
    a, b = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
    x64 = x.double()  # (batch, in)
    return x64 @ w.t() + base.bias.double() + layer.scaling[name] * (x64 @ a.t()) @ b.t()


@pytest.mark.parametrize("four_bit", [False, True])
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_matches_fp64_reference(four_bit, rslora):
    base = nn.Linear(IN, OUT)
    layer = _lora(Linear4bit.from_linear(base) if four_bit else base, rslora=rslora)
    _randomize_b(layer)
    x = torch.randn(2, 5, IN)
    torch.testing.assert_close(layer(x).double(), _reference(layer, x), **TOL)


@pytest.mark.parametrize("four_bit", [False, True])
def test_fused_up_projection_matches_reference_path(four_bit):
    """``addmm`` (fast) vs ``result + B(u) * scale`` (reference): outputs and the gradients of x, A and B.

    The two round differently only in the final sum (one multiply-add chain vs product, scaling and sum
    rounded apart), and the gradients inherit that through ``2 * out``: a few fp32 ulps (2**-24 ~ 6e-8) of
    each tensor's scale, so the normwise relative difference must stay under 1e-6 (measured <= 2e-7).
    """
    base = nn.Linear(IN, OUT)
    layer = _lora(Linear4bit.from_linear(base) if four_bit else base, alpha=5.0)  # scale 5/8: not 1
    _randomize_b(layer)
    x = torch.randn(2, 5, IN)
    runs = []
    for fused in (True, False):
        layer.fuse_up_projection = fused
        xg = x.clone().requires_grad_(True)
        out = layer(xg)
        out.pow(2).sum().backward()
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        runs.append((out.detach(), xg.grad, a.grad.clone(), b.grad.clone()))
        a.grad, b.grad = None, None
    assert not torch.equal(runs[0][3], torch.zeros_like(runs[0][3]))
    for fast, reference in zip(runs[0], runs[1], strict=True):
        assert float((fast - reference).norm() / reference.norm()) < 1e-6
    torch.testing.assert_close(runs[0][0].double(), _reference(layer, x), **TOL)


def test_rslora_scales_by_alpha_over_sqrt_r():
    assert _lora(r=16, alpha=8.0, rslora=True).scaling["default"] == 8.0 / 4.0
    assert _lora(r=16, alpha=8.0).scaling["default"] == 8.0 / 16.0


@pytest.mark.parametrize("init", ["default", "gaussian", "zeros"])
def test_fresh_adapter_gives_exactly_the_base_output(init):
    layer = _lora(init=init)
    x = torch.randn(3, IN)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_init_schemes():
    r = 8
    default = _lora(r=r)
    bound = 1.0 / math.sqrt(IN)  # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
    assert default.lora_A["default"].weight.abs().max() <= bound
    assert default.lora_A["default"].weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(default.lora_B["default"].weight) == 0
    gaussian = LoraLinear(nn.Linear(1024, OUT))
    gaussian.add_adapter("g", LoraConfig(r=r, init="gaussian"))
    assert gaussian.lora_A["g"].weight.std().item() == pytest.approx(1.0 / r, rel=0.05)  # 8192 samples
    zeros = _lora(init="zeros")
    assert torch.count_nonzero(zeros.lora_A["default"].weight) == 0


def test_adapter_weights_are_fp32_and_results_keep_the_base_dtype():
    layer = _lora(nn.Linear(IN, OUT).to(torch.bfloat16))
    _randomize_b(layer)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(4, IN, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16


def test_only_adapter_parameters_require_grad_and_get_gradients():
    layer = _lora()
    _randomize_b(layer)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {
        "lora_A.default.weight", "lora_B.default.weight",
    }
    layer(torch.randn(3, IN)).sum().backward()
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    assert layer.lora_A["default"].weight.grad.abs().sum() > 0
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0


def test_dropout_acts_only_in_training_mode():
    layer = _lora(dropout=0.5)
    _randomize_b(layer)
    x = torch.randn(6, IN)
    layer.train()
    first, second = layer(x), layer(x)
    assert not torch.equal(first, second)
    layer.eval()
    torch.testing.assert_close(layer(x).double(), _reference(layer, x), **TOL)
    assert torch.equal(layer(x), layer(x))


def test_named_adapters_switch_disable_and_delete():
    layer = _lora(name="a")
    layer.add_adapter("b", LoraConfig(r=4, alpha=4.0, dropout=0.0))
    assert layer.active_adapter == "a"  # adding does not activate
    _randomize_b(layer, "a")
    _randomize_b(layer, "b")
    x = torch.randn(3, IN)
    out_a = layer(x)
    torch.testing.assert_close(out_a.double(), _reference(layer, x, "a"), **TOL)
    layer.set_active("b")
    out_b = layer(x)
    torch.testing.assert_close(out_b.double(), _reference(layer, x, "b"), **TOL)
    assert (out_a - out_b).abs().max() > 1e-2
    layer.set_enabled(False)
    assert torch.equal(layer(x), layer.base_layer(x))
    layer.set_enabled(True)
    layer.delete_adapter("b")
    assert layer.adapter_names == ["a"] and layer.active_adapter is None
    assert torch.equal(layer(x), layer.base_layer(x))
    with pytest.raises(ConfigError, match=r"no adapter 'b' on this layer; adapters: \['a'\]"):
        layer.set_active("b")


def test_merge_then_unmerge_restores_fp32_weight():
    layer = _lora()
    _randomize_b(layer)
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(5, IN)
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight, w0 + layer.delta_weight("default"), rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged, **TOL)  # the merged forward is the base forward
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged, **TOL)


def test_merge_then_unmerge_restores_bf16_weight_to_rounding():
    """Two roundings to bf16 (8 significant bits: relative error <= 2**-8 each) of values bounded by
    |W| + |delta| give |W' - W| <= 2**-7 * (|W| + |delta|) elementwise."""
    layer = _lora(nn.Linear(IN, OUT).to(torch.bfloat16))
    _randomize_b(layer)
    w0 = layer.base_layer.weight.detach().clone()
    delta = layer.delta_weight("default")
    layer.merge()
    assert layer.base_layer.weight.dtype == torch.bfloat16
    layer.unmerge()
    error = (layer.base_layer.weight.float() - w0.float()).abs()
    assert (error <= 2**-7 * (w0.float().abs() + delta.abs())).all()


def test_merge_into_a_4bit_base_is_refused():
    layer = _lora(Linear4bit.from_linear(nn.Linear(IN, OUT)))
    _randomize_b(layer)
    packed = layer.base_layer.qweight.packed.clone()
    with pytest.raises(MergeError, match="merge_and_export"):
        layer.merge()
    assert torch.equal(layer.base_layer.qweight.packed, packed) and layer.merged_adapter is None


@pytest.mark.parametrize("dtype, b_value", [(torch.float32, float("nan")), (torch.float16, 1e5)])
def test_non_finite_merge_is_refused_and_leaves_the_weight_untouched(dtype, b_value):
    layer = _lora(nn.Linear(IN, OUT).to(dtype))
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(b_value)  # fp16: |scale * B @ A| overflows 65504
    w0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(MergeError, match="non-finite"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, w0) and layer.merged_adapter is None


def test_switching_or_deleting_while_merged_is_refused():
    layer = _lora(name="a")
    layer.add_adapter("b", LoraConfig(r=4))
    layer.merge()
    with pytest.raises(MergeError, match="unmerge"):
        layer.set_active("b")
    with pytest.raises(MergeError, match="unmerge"):
        layer.delete_adapter("a")
    with pytest.raises(MergeError, match="already merged"):
        layer.merge()


def _two_adapters(base):
    layer = LoraLinear(base)
    for name, r, alpha in (("one", 8, 5.0), ("two", 4, 3.0)):  # scales 5/8 and 3/4: not powers of two
        layer.add_adapter(name, LoraConfig(r=r, alpha=alpha, dropout=0.0))
        _randomize_b(layer, name)
    return layer


@pytest.mark.parametrize("four_bit", [False, True])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("rows", [1, FEW_ROWS])
def test_bound_projection_equals_forward_for_two_adapters(four_bit, fused, rows):
    """Bound once, then switched: each adapter (and none, and disabled) gives forward's output bit for bit.
    The nn.Linear base has a bias, so its bound projection is ``F.linear`` (the dense GEMV is for bias-free rows)."""
    base = nn.Linear(IN, OUT)
    layer = _two_adapters(Linear4bit.from_linear(base) if four_bit else base)
    layer.fuse_up_projection = fused
    bound = layer.bind()
    x = torch.randn(rows, IN)
    with torch.no_grad():
        for active, enabled in (("one", True), ("two", True), (None, True), ("one", False)):
            layer.set_active(active)
            layer.set_enabled(enabled)
            got, want = bound(x), layer(x)
            assert torch.equal(got, want), (active, enabled)
        assert torch.equal(bound(x), layer.base_layer(x))  # disabled: the base only
        layer.set_enabled(True)
        assert not torch.equal(bound(x), layer.base_layer(x))  # "one" is active again


def test_forward_and_bound_projection_go_through_add_delta(monkeypatch):
    layer = _two_adapters(Linear4bit.from_linear(nn.Linear(IN, OUT)))
    layer.set_active("two")
    x = torch.randn(3, IN)
    with torch.no_grad():
        before, bound_before = layer(x), layer.bind()(x)
        add_delta = LoraLinear.add_delta
        monkeypatch.setattr(LoraLinear, "add_delta", lambda self, *args: add_delta(self, *args) + 1.0)
        assert torch.equal(layer(x), before + 1.0)
        assert torch.equal(layer.bind()(x), bound_before + 1.0)


def test_fuse_up_projection_is_a_setting_of_each_layer():
    one, two = _lora(alpha=5.0), _lora(alpha=5.0)
    one.fuse_up_projection = False
    assert two.fuse_up_projection and LoraLinear(nn.Linear(IN, OUT)).fuse_up_projection
    assert "fuse_up_projection" not in vars(LoraLinear)
