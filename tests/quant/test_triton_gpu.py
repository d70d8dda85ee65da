"""The Triton kernels on a CUDA device at model shapes, in 16-bit, against the reference and bitsandbytes.

Every test carries ``gpu`` and is skipped without CUDA. Tolerances are the fp32 summation bound of
``tests.helpers.triton_checks`` (plus half an ulp for a 16-bit output); dequantization must be bit-identical to
``dequantize_4bit_reference`` run on the same device (every launch disables fp contraction).
"""

from __future__ import annotations

import pytest
import torch

from qlorakit.quant import Linear4bit
from qlorakit.quant.tensor import QuantizedTensor
from tests.helpers.triton_checks import assert_within_sum_bound, random_weight, reference_weight

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(scope="module")
def ops():
    pytest.importorskip("triton")
    from qlorakit.quant.backends import triton_ops

    return triton_ops


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type,blocksize,double_quant",
                         [("nf4", 64, True), ("fp4", 128, False), ("nf4", 256, True)])
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (1001, 333)])
def test_dequantize_equals_reference_bit_for_bit_on_cuda(ops, dtype, quant_type, blocksize, double_quant, shape):
    q = random_weight(shape, quant_type, blocksize, double_quant, "cuda")
    assert torch.equal(ops.dequantize_4bit(q, dtype), reference_weight(q, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_matches_bitsandbytes_cuda_within_one_ulp(ops, dtype):
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(4096, 4096, device="cuda", dtype=dtype)
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    theirs = bnb_f.dequantize_4bit(packed, state).float()
    q = QuantizedTensor.from_bnb_dict(packed, state.as_dict(packed=True), "bnb")
    ours = ops.dequantize_4bit(q, dtype).float()
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    assert ((ours - theirs).abs() <= ulp * theirs.abs()).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n_out,k_in", [(2048, 4096, 4096), (333, 11008, 4096), (2048, 4096, 11008), (7, 1000, 250)])
def test_fused_forward_and_grad_input_within_bound_on_cuda(ops, dtype, m, n_out, k_in):
    q = random_weight((n_out, k_in), "nf4", 64, True, "cuda")
    w = reference_weight(q, dtype)  # (N, K) as the reference hands it to its matmul
    x = torch.randn(m, k_in, device="cuda", dtype=dtype)
    assert_within_sum_bound(ops.matmul_4bit(x, q), x, w.t())
    dy = torch.randn(m, n_out, device="cuda", dtype=dtype)
    assert_within_sum_bound(ops.grad_input_4bit(dy, q), dy, w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_out,k_in", [(4096, 4096), (11008, 4096), (4096, 11008), (1000, 250)])
def test_gemv_within_bound_on_cuda(ops, dtype, n_out, k_in):
    q = random_weight((n_out, k_in), "nf4", 64, True, "cuda")
    x = torch.randn(1, k_in, device="cuda", dtype=dtype)
    assert_within_sum_bound(ops.gemv_4bit(x, q), x, reference_weight(q, dtype).t())


def test_linear4bit_on_cuda_uses_the_kernels_and_never_builds_the_weight(ops):
    layer = Linear4bit.from_linear(torch.nn.Linear(4096, 4096, bias=False), compute_dtype=torch.bfloat16).cuda()
    x = torch.randn(4, 64, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()  # autotunes both kernels outside the measured window
    x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    y = layer(x)
    y.float().square().sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    weight_bytes = 4096 * 4096 * 2  # the bf16 weight the reference path would materialize
    assert extra < weight_bytes / 2, f"{extra} bytes beyond the inputs: a full weight was built?"
    w = reference_weight(layer.qweight, torch.bfloat16)
    assert_within_sum_bound(y.detach().reshape(-1, 4096), x.detach().reshape(-1, 4096), w.t())
    assert_within_sum_bound(x.grad.reshape(-1, 4096), 2 * y.detach().reshape(-1, 4096), w)  # dL/dy = 2 y, exact
