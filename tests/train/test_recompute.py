"""swiglu_recompute: the MLPs' silu_mul gives bit-identical outputs and gradients to their own forward.

Tolerance: none (``torch.equal``). ``_SiluMul`` runs the same elementwise ops autograd runs for
``act_fn(gate) * up`` (``silu``, the two products, ``silu_backward``), so every value must match exactly.
"""

from __future__ import annotations

import torch

from qlorakit.config import LoraConfig
from qlorakit.lora.model import lora_layers
from qlorakit.train.recompute import silu_mul, swiglu_mlps, swiglu_recompute
from tests.helpers.train import tiny_qlora_model

VOCAB = 96


def _loss_and_grads(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_recompute_gives_bit_identical_loss_and_lora_gradients():
    model = tiny_qlora_model(VOCAB, LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # B != 0, so every adapter (and so every gradient path) is live
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.normal_(std=0.2)
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
    loss_ref, grads_ref = _loss_and_grads(model, ids)
    with swiglu_recompute(model) as n:
        assert n == 2  # both blocks' MLPs
        loss, grads = _loss_and_grads(model, ids)
    assert torch.equal(loss, loss_ref)
    assert grads.keys() == grads_ref.keys()
    assert all(torch.equal(grads[k], grads_ref[k]) for k in grads)
    assert any(float(g.abs().max()) > 0 for k, g in grads.items() if "mlp" in k)


def test_silu_mul_saves_gate_and_up_only():
    gate, up = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    out = silu_mul(gate, up)
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 2 and saved[0] is gate and saved[1] is up
    assert torch.equal(out, torch.nn.functional.silu(gate) * up)


def test_context_restores_the_class_forward_and_can_be_disabled():
    model = tiny_qlora_model(VOCAB, LoraConfig(r=4, alpha=8, dropout=0.0))
    mlps = swiglu_mlps(model)
    with swiglu_recompute(model, enabled=False) as n:
        assert n == 0 and all("forward" not in vars(m) for m in mlps)
    with swiglu_recompute(model):
        assert all("forward" in vars(m) for m in mlps)
    assert all("forward" not in vars(m) for m in mlps)
