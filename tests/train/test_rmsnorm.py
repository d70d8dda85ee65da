"""fused_rmsnorm: ``_RMSNorm`` against the model's own RMSNorm forward (outputs and gradients).

Tolerance: normwise relative 1e-6 for the op, 1e-5 for a whole model's LoRA gradients (measured up to
1.2e-6: the op's differences pass through every later layer's backward, as ``test_loss``'s 1e-5 allows).
``_RMSNorm`` takes ``r`` from ``vector_norm`` instead of ``pow(2).mean`` and forms ``dL/dx`` in one
expression instead of summing two autograd paths: each is a reordering of fp32 arithmetic (a few ulps,
2**-24 ~ 6e-8 each), while a wrong term (a missing r, the weight gradient's scale, the mean over H) changes
the result by far more than 1e-6.
"""

from __future__ import annotations

import pytest
import torch

from qlorakit.config import LoraConfig
from qlorakit.lora.model import lora_layers
from qlorakit.train.rmsnorm import fused_rmsnorm, rms_norm, rmsnorms
from tests.helpers.train import tiny_qlora_model

transformers = pytest.importorskip("transformers")
VOCAB = 96


def _close(fast: torch.Tensor, reference: torch.Tensor, rtol: float = 1e-6) -> bool:
    return float((fast - reference).norm() / reference.norm()) < rtol


@pytest.mark.parametrize("weight_trains", [False, True])
def test_rms_norm_matches_llama_rmsnorm(weight_trains):
    norm = transformers.models.llama.modeling_llama.LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    norm.weight.requires_grad_(weight_trains)
    x = torch.randn(3, 7, 48) * 3
    g = torch.randn(3, 7, 48)
    runs = []
    for fused in (True, False):
        xg = x.clone().requires_grad_(True)
        out = rms_norm(xg, norm.weight, norm.variance_epsilon) if fused else norm(xg)
        out.backward(g)
        runs.append((out.detach(), xg.grad, norm.weight.grad))
        norm.weight.grad = None
    assert all(_close(f, r) for f, r in zip(runs[0][:2], runs[1][:2], strict=True))
    assert (runs[0][2] is None) == (not weight_trains)
    if weight_trains:
        assert _close(runs[0][2], runs[1][2])


def test_fused_rmsnorm_keeps_loss_and_lora_gradients():
    model = tiny_qlora_model(VOCAB, LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.normal_(std=0.2)
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
    runs = []
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        with fused_rmsnorm(model, enabled=fused) as n:
            assert n == (5 if fused else 0)  # 2 blocks x 2 norms + the final norm
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        runs.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
    assert _close(runs[0][0].reshape(1), runs[1][0].reshape(1))
    assert all(_close(runs[0][1][k], runs[1][1][k], rtol=1e-5) for k in runs[1][1])
    assert all("forward" not in vars(m) for m in rmsnorms(model))


def _hooked_16bit_norm(weight_trains: bool):
    from qlorakit.models.build import keep_norm_outputs_in_input_dtype

    norm = transformers.models.llama.modeling_llama.LlamaRMSNorm(48, eps=1e-5)  # fp32 weight, as the loader keeps
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    norm.weight.requires_grad_(weight_trains)
    assert keep_norm_outputs_in_input_dtype(norm) == 1  # the loader's hook: the output comes back in x's dtype
    return norm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_trains", [False, True])
def test_16bit_norm_output_is_bit_identical_and_its_gradients_within_one_16bit_step(dtype, weight_trains):
    """The 16-bit forward runs the module's ops (torch.equal); backward rounds where the module's autograd does and
    differs from it only in the order of fp32 sums, so every gradient value is within one 16-bit rounding step
    (ulp) of the module's, and no further from an fp64 evaluation. ``g`` leans on ``x`` so that the term through
    ``r^3 sum(w g x) / H`` is large: getting it wrong by 2% moves the gradients by about 5%."""
    norm = _hooked_16bit_norm(weight_trains)
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(3, 7, 48, generator=gen) * 3).to(dtype)
    g = (torch.randn(3, 7, 48, generator=gen) + x.float()).to(dtype)
    runs = []
    for fused in (True, False):
        xg = x.clone().requires_grad_(True)
        with fused_rmsnorm(norm, enabled=fused) as n:
            assert n == int(fused)
            out = norm(xg)
        out.backward(g)
        runs.append((out.detach(), xg.grad, norm.weight.grad))
        norm.weight.grad = None
    assert runs[0][0].dtype == dtype and torch.equal(runs[0][0], runs[1][0])
    x64, w64 = x.double().requires_grad_(True), norm.weight.detach().double().requires_grad_(weight_trains)
    y64 = w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    y64.backward(g.double())
    for slot, exact in [(1, x64.grad)] + ([(2, w64.grad)] if weight_trains else []):
        fast, module = runs[0][slot].double(), runs[1][slot].double()
        step = torch.finfo(runs[1][slot].dtype).eps * module.abs()  # one rounding step of each value
        assert bool(((fast - module).abs() <= step).all())
        assert float((fast - exact).norm()) <= 1.25 * float((module - exact).norm()) + 1e-12 * float(exact.norm())
    assert (runs[0][2] is None) == (not weight_trains)


def test_16bit_input_without_the_loaders_hook_keeps_the_modules_forward():
    """Without the hook the module returns fp32 (``weight * x`` promotes): that is not what the fused one returns."""
    norm = transformers.models.llama.modeling_llama.LlamaRMSNorm(48, eps=1e-5)
    x = torch.randn(2, 48).to(torch.bfloat16)
    with fused_rmsnorm(norm) as n:
        assert n == 1
        out = norm(x)
    assert out.dtype == torch.float32 and torch.equal(out, norm(x))
