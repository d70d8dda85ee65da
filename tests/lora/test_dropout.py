"""``lora.dropout``: the dropped down-projection that keeps ``h`` and a bit-packed mask equals the op-by-op formula.

Tolerance: fp32 ``rtol 1e-5, atol 1e-6``: ``where(keep, h / (1 - p) ...)`` scales before the matmul as the
reference does, and ``dL/dA`` is one matmul over the rows in both; only the order of fp32 sums may differ.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlorakit.config import LoraConfig
from qlorakit.lora import add_lora, lora_layers
from qlorakit.lora.dropout import (
    dropped_down_product,
    keep_mask,
    lean_dropout,
    pack_mask,
    reference_dropped_down,
    reference_pack_mask,
    unpack_mask,
)
from qlorakit.lora.fused import fuse_shared_inputs
from tests.helpers.lora import assert_logits_close, randomize_lora_b

RTOL, ATOL = 1e-5, 1e-6


def test_dropped_down_product_equals_the_formula_with_the_same_mask_forward_and_both_gradients():
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(2, 7, 24, generator=gen, requires_grad=True)  # (B, T, in)
    a = torch.randn(6, 24, generator=gen, requires_grad=True)  # (r, in)
    g = torch.randn(2, 7, 6, generator=gen)  # dL/du
    torch.manual_seed(11)
    u = dropped_down_product(h, a, 0.3)
    grad_h, grad_a = torch.autograd.grad(u, (h, a), g)
    torch.manual_seed(11)
    keep = keep_mask(h, 0.3)  # the same draw from the global generator
    assert keep.dtype == torch.bool and 0 < keep.sum() < keep.numel()
    ref = reference_dropped_down(h, a, keep, 0.3)
    ref_h, ref_a = torch.autograd.grad(ref, (h, a), g)
    torch.testing.assert_close(u, ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(grad_h, ref_h, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(grad_a, ref_a, rtol=RTOL, atol=ATOL)
    assert (grad_h[~keep] == 0).all()  # dropped values get no gradient


def test_dropped_down_product_keeps_the_input_and_a_packed_mask_not_a_dropped_copy_and_a_float_mask():
    h = torch.randn(64, 32, requires_grad=True)  # (N, in)
    a = torch.randn(4, 32, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        dropped_down_product(h, a, 0.1)
    big = [t for t in saved if t.numel() == h.numel()]
    assert [str(t.dtype) for t in big] == ["torch.float32"]
    assert big[0].untyped_storage().data_ptr() == h.untyped_storage().data_ptr()  # h itself
    masks = [t for t in saved if t.dtype == torch.uint8]
    assert [t.numel() for t in masks] == [h.numel() // 8]  # 1 bit a value


def test_pack_mask_equals_its_reference_on_every_byte_pattern_and_round_trips_at_any_length():
    every = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()  # (256, 8): byte p's bits
    assert torch.equal(pack_mask(every), torch.arange(256, dtype=torch.uint8))
    assert torch.equal(reference_pack_mask(every), torch.arange(256, dtype=torch.uint8))
    gen = torch.Generator().manual_seed(0)
    for shape in [(1,), (7,), (8,), (9,), (3, 5, 7), (2, 512, 576)]:
        keep = torch.rand(shape, generator=gen) >= 0.3
        packed = pack_mask(keep)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-keep.numel() // 8)
        assert torch.equal(packed, reference_pack_mask(keep))
        assert torch.equal(unpack_mask(packed, keep.shape), keep)
    keep = torch.rand(6, 10, generator=gen) >= 0.5
    assert torch.equal(unpack_mask(pack_mask(keep.t()), keep.t().shape), keep.t())  # a non-contiguous mask


@pytest.mark.parametrize("flip", range(3))
def test_a_changed_mask_value_changes_the_packed_bytes(flip):
    keep = torch.zeros(3, 8, dtype=torch.bool)
    keep.view(-1)[5 + 8 * flip] = True
    packed = pack_mask(keep)
    assert packed.tolist() == [32 if i == flip else 0 for i in range(3)]


def test_lean_path_only_for_a_training_nn_dropout():
    drop = nn.Dropout(0.2)
    assert lean_dropout(drop) == 0.2
    assert lean_dropout(drop.eval()) is None
    assert lean_dropout(nn.Identity()) is None and lean_dropout(None) is None and lean_dropout(nn.Dropout(0.0)) is None


class _GivenMasks(nn.Module):
    """Reference dropout: multiplies by the next of the masks drawn by the lean run (same order of calls)."""

    def __init__(self, masks: list[torch.Tensor], p: float) -> None:
        super().__init__()
        self.masks, self.p = masks, p

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.masks.pop(0).to(h.dtype) / (1.0 - self.p)


def _model(tiny_llama, dropout: float):
    model = tiny_llama()
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=dropout, targets="all-linear"))
    randomize_lora_b(model)
    return model


def _loss_and_grads(model, input_ids):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids).logits  # (B, T, V)
    out.float().pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_model_with_lean_dropout_equals_plain_autograd_with_the_same_masks(tiny_llama, input_ids, monkeypatch):
    """A whole fused tiny Llama with ``nn.Dropout(0.3)``: forward and every LoRA gradient equal those of the
    same model whose dropouts multiply by the very masks the lean path drew (plain autograd, unfused layers
    in the group's order: each group's mask handed to each of its members)."""
    from qlorakit.lora import dropout as dropout_module

    model = _model(tiny_llama, 0.3)
    reference = _model(tiny_llama, 0.3)
    reference.load_state_dict(model.state_dict())
    assert len(fuse_shared_inputs(model)) == 4
    drawn: list[torch.Tensor] = []
    real = dropout_module.keep_mask
    monkeypatch.setattr(dropout_module, "keep_mask", lambda h, p: drawn.append(real(h, p)) or drawn[-1])
    out, grads = _loss_and_grads(model, input_ids)
    assert len(drawn) == 2 * 4  # per block: q/k/v, o, gate/up, down
    per_layer: list[torch.Tensor] = []
    for path in lora_layers(reference):  # module order: q, k, v, o, gate, up, down of each block
        child = path.rsplit(".", 1)[-1]
        per_layer.append(per_layer[-1] if child in ("k_proj", "v_proj", "up_proj") else drawn.pop(0))
    for layer, mask in zip(lora_layers(reference).values(), per_layer, strict=True):
        layer.lora_dropout["default"] = _GivenMasks([mask], 0.3)
    ref_out, ref_grads = _loss_and_grads(reference, input_ids)
    assert_logits_close(out, ref_out, rtol=RTOL)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 7 * 2
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=RTOL, atol=ATOL, msg=name)


def test_a_bf16_input_is_kept_uncast_and_gives_the_values_of_the_cast_input():
    """bf16 compute with fp32 adapters: the cast happens inside, the saved input stays bf16 (2 bytes a value, not
    the cast's 4), and forward and both gradients are bit-identical to casting first."""
    h = torch.randn(3, 7, 32, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(4, 32, requires_grad=True)
    saved: list[torch.Tensor] = []
    results = []
    for cast_first in (True, False):
        torch.manual_seed(5)  # the same mask both times
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = dropped_down_product(h.to(torch.float32) if cast_first else h, weight, 0.1)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), h.grad.clone(), weight.grad.clone()))
        h.grad = weight.grad = None
        if cast_first:
            saved.clear()
    assert results[1][0].dtype == torch.float32 and results[1][1].dtype == torch.bfloat16
    for got, want in zip(results[1], results[0], strict=True):
        assert torch.equal(got, want)
    inputs = [t for t in saved if t.shape == h.shape and t.is_floating_point()]
    assert [t.dtype for t in inputs] == [torch.bfloat16]
