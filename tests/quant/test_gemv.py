"""``gemv_4bit`` (batch-1 fast path: compiled kernel and pure-torch fallback) against the
dequantize-then-multiply reference, and its dispatch from ``Linear4bit``.

Tolerance: both compute the same fp32 products in a different summation order, so their difference is
fp32 rounding of an ``in``-term dot product: we allow ``1e-5 * sqrt(in) * max|x| * max|W|`` (the
observed gap is ~10x smaller). bf16 inputs are held to the fp32 result of the same bf16 values, plus
one bf16 rounding of the output (relative 2^-8).
"""

import math

import pytest
import torch

from qlorakit.errors import QuantizationError
from qlorakit.quant import backends, dequantize_4bit, quantize_4bit
from qlorakit.quant.gemv import FEW_ROWS, gemv_4bit, gemv_4bit_reference
from qlorakit.quant.linear import Linear4bit

PATHS = ["native", "torch"]


def _fp64_product(x: torch.Tensor, q) -> torch.Tensor:
    return x.double().reshape(-1) @ dequantize_4bit(q, torch.float32).double().t()  # (out,)


def _tolerance(x: torch.Tensor, q) -> float:
    w = dequantize_4bit(q, torch.float32)
    return 1e-5 * math.sqrt(x.shape[-1]) * x.abs().max().item() * w.abs().max().item()


SHAPES = [(64, 128), (7, 9), (13, 577), (96, 320), (5, 1536), (33, 50)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gemv_matches_reference_fp32(path, quant_type, double_quant, blocksize, shape):
    q = quantize_4bit(torch.randn(shape), quant_type, blocksize, double_quant)
    x = torch.randn(shape[1])
    exact = _fp64_product(x, q)
    tol = _tolerance(x, q)
    fast, ref = gemv_4bit(x, q, use_native=path == "native"), gemv_4bit_reference(x, q)
    assert fast.shape == (shape[0],) and fast.dtype == torch.float32
    assert (fast.double() - exact).abs().max().item() <= tol
    assert (fast - ref).abs().max().item() <= 2 * tol


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(64, 128), (13, 577)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_gemv_bf16_input_matches_fp32_product_of_the_same_values(path, shape):
    q = quantize_4bit(torch.randn(shape), "nf4", 64, True)
    x = torch.randn(1, shape[1]).bfloat16()
    fast = gemv_4bit(x, q, use_native=path == "native")
    assert fast.shape == (1, shape[0]) and fast.dtype == torch.bfloat16
    exact = _fp64_product(x.float(), q)
    bound = _tolerance(x.float(), q) + 2.0**-8 * exact.abs()
    assert ((fast.double().reshape(-1) - exact).abs() <= bound).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows", [3, 19])
@pytest.mark.parametrize("shape", [(96, 320), (37, 128), (40, 50)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_several_rows_match_the_reference(path, shape, rows):
    q = quantize_4bit(torch.randn(shape), "nf4", 64, True)
    x = torch.randn(1, rows, shape[1])
    fast = gemv_4bit(x, q, use_native=path == "native")
    assert fast.shape == (1, rows, shape[0])
    torch.testing.assert_close(fast, gemv_4bit_reference(x, q), rtol=0, atol=2 * _tolerance(x, q))


def test_native_kernel_is_built_and_used_here():
    """On this x86 machine with gcc the compiled kernel must exist (else the speed claims do not apply)."""
    kernels = backends.native_cpu()
    if kernels is None:
        pytest.skip("no compiled kernel on this machine (no C compiler, not x86, or QLORAKIT_NATIVE=0)")
    q = quantize_4bit(torch.randn(24, 64))
    y = kernels.gemv(torch.randn(1, 64), q)
    assert y is not None and y.shape == (1, 24)
    assert kernels.gemv(torch.randn(1, 63), quantize_4bit(torch.randn(24, 63))) is None  # odd in: torch path


def test_gemv_rejects_a_wrong_feature_count():
    q = quantize_4bit(torch.randn(8, 16))
    with pytest.raises(QuantizationError, match="in_features = 16"):
        gemv_4bit(torch.randn(2, 15), q)


def test_linear4bit_uses_gemv_for_few_rows_without_grad(monkeypatch):
    layer = Linear4bit.from_linear(torch.nn.Linear(96, 40))
    calls = []
    import qlorakit.quant.linear as linear_module

    monkeypatch.setattr(linear_module, "gemv_4bit", lambda x, q: calls.append(x.shape) or gemv_4bit(x, q))
    x = torch.randn(1, 1, 96)
    with torch.no_grad():
        fast = layer(x)
        layer.use_gemv = False
        ref = layer(x)
    assert calls == [torch.Size([1, 1, 96])]
    assert fast.shape == ref.shape == (1, 1, 40)
    torch.testing.assert_close(fast, ref, rtol=0, atol=_tolerance(x, layer.qweight) * 2)


def test_linear4bit_keeps_the_reference_path_for_grad_and_many_rows(monkeypatch):
    layer = Linear4bit.from_linear(torch.nn.Linear(32, 8))
    import qlorakit.quant.linear as linear_module

    monkeypatch.setattr(linear_module, "gemv_4bit", lambda x, q: pytest.fail("gemv used"))
    x = torch.randn(1, 32, requires_grad=True)
    layer(x).sum().backward()  # one row, but the input needs a gradient
    with torch.no_grad():
        layer(torch.randn(FEW_ROWS + 1, 32))  # more rows than the fast path takes
    assert x.grad is not None


@pytest.mark.parametrize("shape", [(49152 // 64, 576), (37, 577), (5, 15), (4, 1)])
def test_dense_gemv_kernel_matches_linear(shape):
    kernels = backends.native_cpu()
    if kernels is None:
        pytest.skip("no compiled kernel on this machine")
    torch.manual_seed(0)
    weight, x = torch.randn(*shape), torch.randn(shape[1])
    got = kernels.dense_gemv(x, weight)
    want = (weight.double() @ x.double()).float()
    bound = 1e-6 * shape[1] ** 0.5 * float(x.abs().max() * weight.abs().max())  # fp32 summation, any order
    assert got.shape == (shape[0],) and float((got - want).abs().max()) <= bound
    assert kernels.dense_gemv(x.double(), weight.double()) is None  # fp32 only


def test_dequantize_kernel_is_used_and_bit_identical():
    from qlorakit.quant.functional import dequantize_4bit_reference

    kernels = backends.native_cpu()
    if kernels is None:
        pytest.skip("no compiled kernel on this machine")
    for shape, blocksize in [((96, 576), 64), ((777,), 32), ((3, 5, 7), 128), ((4096 + 33,), 4096)]:
        q = quantize_4bit(torch.randn(*shape) * 3, "nf4", blocksize, True)
        assert torch.equal(kernels.dequantize(q).view(shape), dequantize_4bit_reference(q))
        bf16 = kernels.dequantize(q, torch.bfloat16).view(shape)  # rounded in the kernel
        assert torch.equal(bf16, dequantize_4bit_reference(q, torch.bfloat16))
    assert kernels.dequantize(q, torch.float16) is None  # the caller casts the fp32 decode


def test_bf16_kernels_round_like_torch():
    kernels = backends.native_cpu()
    if kernels is None:
        pytest.skip("no compiled kernel on this machine")
    torch.manual_seed(1)
    q = quantize_4bit(torch.randn(100, 192), "nf4", 64, True)
    x = torch.randn(3, 192).bfloat16()
    bound = kernels.bind_gemv(q)
    assert torch.equal(bound.bf16(x), bound(x.float()).to(torch.bfloat16))  # same sums, same rounding
    weight, row = torch.randn(203, 577).bfloat16(), torch.randn(577).bfloat16()
    got, want = kernels.dense_gemv(row, weight), torch.nn.functional.linear(row, weight)
    assert got.dtype == torch.bfloat16
    exact = (weight.double() @ row.double()).float()
    ulp = exact.abs() * 2.0**-7 + 1e-6  # within one bf16 rounding step of the exact product (as F.linear is)
    assert bool(((got.float() - exact).abs() <= ulp).all()) and bool(((want.float() - exact).abs() <= ulp).all())




@pytest.fixture
def reload_kernels():
    """``backends.native_cpu()`` loads anew after ``cpu_native.load.cache_clear()`` and after the test."""
    from qlorakit.quant.backends import cpu_native

    yield cpu_native.load.cache_clear
    cpu_native.load.cache_clear()  # later tests load the real kernels again


def test_without_a_compiler_the_torch_path_gives_the_same_results(monkeypatch, tmp_path, reload_kernels):
    from qlorakit.quant.backends import cpu_build
    from qlorakit.quant.functional import dequantize_4bit_reference

    q = quantize_4bit(torch.randn(40, 192), "nf4", 64, True)
    x = torch.randn(3, 192)
    layer = Linear4bit.from_linear(torch.nn.Linear(192, 24))
    kernels = backends.native_cpu()
    with torch.no_grad():
        compiled = (dequantize_4bit(q), gemv_4bit(x, q), layer(x[:1]))  # the kernels where they build
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # an empty cache: the library must be built
    monkeypatch.setattr(cpu_build, "find_compiler", lambda: None)  # and no compiler is found
    reload_kernels()
    with pytest.warns(UserWarning, match="no C compiler"):
        assert backends.native_cpu() is None
    with torch.no_grad():
        fallback = (dequantize_4bit(q), gemv_4bit(x, q), layer(x[:1]))
    assert torch.equal(fallback[0], dequantize_4bit_reference(q))
    assert torch.equal(fallback[1], gemv_4bit(x, q, use_native=False))
    if kernels is not None:  # kernel and torch path: the decode bit for bit, the sums to fp32 rounding
        assert torch.equal(fallback[0], compiled[0])
        torch.testing.assert_close(fallback[1], compiled[1], rtol=0, atol=2 * _tolerance(x, q))
        torch.testing.assert_close(fallback[2], compiled[2], rtol=0, atol=2 * _tolerance(x[:1], layer.qweight))


def test_qlorakit_native_0_turns_the_kernels_off(monkeypatch, reload_kernels):
    monkeypatch.setenv("QLORAKIT_NATIVE", "0")
    reload_kernels()
    assert backends.native_cpu() is None
