"""The Triton kernels held to the reference on small shapes: on CPU under ``TRITON_INTERPRET=1``, compiled on CUDA.

Without CUDA, ``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before anything imports triton (the
interpreter must be on when triton's own library functions are decorated). The interpreter runs ``tl.dot`` with
numpy on fp32 inputs, so the matmul tests use fp32 activations. Its fp32 -> bfloat16 conversion
truncates instead of rounding to nearest even (Triton 3.9 interpreter), so bfloat16 dequantization is
held within one bfloat16 ulp here and bit-for-bit on the GPU (``test_triton_gpu.py``).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from qlorakit.errors import QuantizationError
from qlorakit.quant import Linear4bit
from tests.helpers.triton_checks import assert_within_sum_bound, random_weight, reference_weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _import_ops():
    why = "triton was imported before TRITON_INTERPRET=1 was set; run through pytest (tests/conftest.py sets it)"
    try:
        from qlorakit.quant.backends import triton_ops
    except ImportError as exc:
        pytest.skip(f"{why}: {exc}", allow_module_level=True)
    if DEVICE == "cpu" and not triton_ops.INTERPRETED:
        pytest.skip(why, allow_module_level=True)
    return triton_ops


ops = _import_ops()

FORMATS = [("nf4", 64, True), ("nf4", 32, False), ("fp4", 128, True), ("int4", 64, False)]


@pytest.mark.parametrize("quant_type,blocksize,double_quant", FORMATS)
@pytest.mark.parametrize("shape", [(48, 96), (7, 33), (37,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequantize_equals_reference_bit_for_bit(quant_type, blocksize, double_quant, shape, dtype):
    q = random_weight(shape, quant_type, blocksize, double_quant, DEVICE)
    assert torch.equal(ops.dequantize_4bit(q, dtype), reference_weight(q, dtype))


@pytest.mark.parametrize("blocksize", [256, 4096])
def test_dequantize_large_and_partial_blocks(blocksize):
    q = random_weight((3, 3001), "nf4", blocksize, True, DEVICE)  # odd count, a partial last block
    assert torch.equal(ops.dequantize_4bit(q, torch.float32), reference_weight(q, torch.float32))


def test_dequantize_spans_several_nested_blocks():
    q = random_weight((160, 128), "nf4", 64, True, DEVICE)  # 320 blocks: two nested (256-block) scales
    assert q.nested.absmax.numel() == 2
    assert torch.equal(ops.dequantize_4bit(q, torch.float32), reference_weight(q, torch.float32))


def test_dequantize_bfloat16_within_one_ulp_of_reference():
    q = random_weight((48, 96), "nf4", 64, True, DEVICE)
    got = ops.dequantize_4bit(q, torch.bfloat16).float()
    want = reference_weight(q, torch.bfloat16).float()
    exact = reference_weight(q, torch.float32)
    if DEVICE == "cuda":
        assert torch.equal(got, want)
    assert ((got - exact).abs() <= 2.0**-7 * exact.abs()).all()  # one bf16 ulp (truncation in the interpreter)


# K = 128 is a multiple of every block size used here: the kernels' one-scale-per-row path; the others
# straddle blocks and take the per-element path.
MATMUL_SHAPES = [((3, 5), 48, 96), ((17,), 40, 72), ((2, 3), 9, 33), ((4,), 24, 128)]


@pytest.mark.parametrize("quant_type,blocksize,double_quant", FORMATS[:3])
@pytest.mark.parametrize("lead,n_out,k_in", MATMUL_SHAPES)
def test_fused_forward_within_fp32_summation_bound(quant_type, blocksize, double_quant, lead, n_out, k_in):
    q = random_weight((n_out, k_in), quant_type, blocksize, double_quant, DEVICE)
    x = torch.randn(*lead, k_in, device=DEVICE)
    y = ops.matmul_4bit(x, q)
    assert y.shape == (*lead, n_out) and y.dtype == x.dtype
    assert_within_sum_bound(y.reshape(-1, n_out), x.reshape(-1, k_in), reference_weight(q, x.dtype).t())


@pytest.mark.parametrize("quant_type,blocksize,double_quant", FORMATS[:3])
@pytest.mark.parametrize("lead,n_out,k_in", MATMUL_SHAPES)
def test_fused_grad_input_within_fp32_summation_bound(quant_type, blocksize, double_quant, lead, n_out, k_in):
    q = random_weight((n_out, k_in), quant_type, blocksize, double_quant, DEVICE)
    dy = torch.randn(*lead, n_out, device=DEVICE)
    dx = ops.grad_input_4bit(dy, q)
    assert dx.shape == (*lead, k_in)
    assert_within_sum_bound(dx.reshape(-1, k_in), dy.reshape(-1, n_out), reference_weight(q, dy.dtype))


def test_fused_forward_reads_strided_input():
    q = random_weight((48, 96), "nf4", 64, True, DEVICE)
    x = torch.randn(96, 10, device=DEVICE).t()  # (10, 96) with strides (1, 10): not contiguous
    assert_within_sum_bound(ops.matmul_4bit(x, q), x, reference_weight(q, x.dtype).t())


@pytest.mark.parametrize("quant_type,blocksize,double_quant", FORMATS)
# K = 256: every block size here divides it (a scale per row and block; blocks of 128 span two of the
# interpreter's 32-byte steps); 96 only for blocks of 32 (two blocks per step); 72 never (a scale per byte).
@pytest.mark.parametrize("n_out,k_in", [(40, 96), (9, 72), (24, 256)])
def test_gemv_within_fp32_summation_bound(quant_type, blocksize, double_quant, n_out, k_in):
    q = random_weight((n_out, k_in), quant_type, blocksize, double_quant, DEVICE)
    x = torch.randn(1, 1, k_in, device=DEVICE)
    y = ops.gemv_4bit(x, q)
    assert y.shape == (1, 1, n_out)
    assert_within_sum_bound(y.reshape(1, n_out), x.reshape(1, k_in), reference_weight(q, x.dtype).t())
    assert torch.equal(ops.matmul_4bit(x, q), y)  # one row goes to the GEMV


def test_one_row_with_odd_features_uses_the_fused_matmul():
    q = random_weight((9, 33), "nf4", 32, True, DEVICE)
    x = torch.randn(1, 33, device=DEVICE)
    assert_within_sum_bound(ops.matmul_4bit(x, q), x, reference_weight(q, x.dtype).t())
    with pytest.raises(QuantizationError, match="even feature count"):
        ops.gemv_4bit(x, q)


def test_empty_batch_gives_an_empty_result():
    q = random_weight((16, 32), "nf4", 32, True, DEVICE)
    assert ops.matmul_4bit(torch.randn(0, 32, device=DEVICE), q).shape == (0, 16)
    assert ops.grad_input_4bit(torch.randn(2, 0, 16, device=DEVICE), q).shape == (2, 0, 32)


def test_float64_or_oversized_activations_stay_on_the_reference_path():
    q = random_weight((16, 32), "nf4", 32, True, DEVICE)
    assert ops.is_supported(q, torch.zeros(2, 32, device=DEVICE))
    assert not ops.is_supported(q, torch.zeros(2, 32, dtype=torch.float64, device=DEVICE))
    wide = random_weight((128, 32), "nf4", 32, True, DEVICE)
    rows = torch.empty(2**25, 32, device="meta")  # 2**30 inputs fit int32 offsets, 2**25 x 128 outputs do not
    assert not ops.is_supported(wide, rows) and ops.is_supported(q, rows)


def test_kernels_name_a_feature_mismatch():
    q = random_weight((16, 32), "nf4", 32, True, DEVICE)
    with pytest.raises(QuantizationError, match="31 features"):
        ops.matmul_4bit(torch.randn(4, 31, device=DEVICE), q)
    with pytest.raises(QuantizationError, match="dtype torch.float64"):
        ops.grad_input_4bit(torch.randn(4, 16, dtype=torch.float64, device=DEVICE), q)


class _CountingBackend:
    """Delegates to ``ops`` and counts the calls, to prove the hook used the kernels."""

    def __init__(self):
        self.calls = []

    def is_supported(self, q, t):
        return ops.is_supported(q, t)

    def matmul_4bit(self, x, q):
        self.calls.append("forward")
        return ops.matmul_4bit(x, q)

    def grad_input_4bit(self, dy, q):
        self.calls.append("grad_input")
        return ops.grad_input_4bit(dy, q)


def test_linear4bit_forward_and_backward_through_the_backend_hook(monkeypatch):
    """The dispatch in ``_Matmul4bit`` (CUDA only in use) routed to the kernels on this test's device."""
    from qlorakit.quant import backends

    layer = Linear4bit.from_linear(torch.nn.Linear(96, 48, bias=False)).to(DEVICE)
    x = torch.randn(2, 7, 96, device=DEVICE, requires_grad=True)
    backend = _CountingBackend()
    monkeypatch.setattr(backends, "select", lambda device: backend)
    y = layer(x)  # (2, 7, 48)
    (dx,) = torch.autograd.grad(y.square().sum(), x)  # dL/dy = 2 y
    assert backend.calls == ["forward", "grad_input"]
    w = reference_weight(layer.qweight, torch.float32)  # (48, 96)
    assert_within_sum_bound(y.detach().reshape(-1, 48), x.detach().reshape(-1, 96), w.t())
    assert_within_sum_bound(dx.reshape(-1, 96), 2 * y.detach().reshape(-1, 48), w)
