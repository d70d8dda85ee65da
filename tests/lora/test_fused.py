"""Fused shared-input LoRA (q/k/v, gate/up) computes what the unfused layers compute, and saves the same adapter.

Tolerance: fp32 ``rtol 1e-5, atol 1e-6`` — one matmul with ``3r`` outputs instead of three with ``r``, and one
``dL/dh`` matmul summing over ``3r`` instead of three summed by autograd, reorder fp32 additions only.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from qlorakit.config import LoraConfig
from qlorakit.lora import (
    add_lora,
    load_adapter,
    lora_layers,
    lora_state_dict,
    save_adapter,
)
from qlorakit.lora import fused as fused_module
from qlorakit.lora.fused import SharedInputA, fuse_shared_inputs, unfuse
from qlorakit.lora.layer import LoraLinear, dropped_down
from tests.helpers.lora import assert_logits_close, randomize_lora_b

RTOL, ATOL = 1e-5, 1e-6


def _adapted(tiny_llama, dropout: float = 0.0):
    model = tiny_llama()
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=dropout, targets="all-linear"))
    randomize_lora_b(model)
    return model


def _loss_and_grads(model, input_ids, checkpointing: bool = False):
    model.zero_grad(set_to_none=True)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    out = model(input_ids=input_ids).logits  # (B, T, V)
    loss = out.float().pow(2).mean()
    loss.backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fuse_groups_qkv_and_gate_up_of_every_block(tiny_llama):
    model = _adapted(tiny_llama)
    groups = fuse_shared_inputs(model)
    assert [g[0].rsplit(".", 1)[-1] for g in groups] == ["q_proj", "gate_proj"] * 2
    assert all(len(g) == {"q_proj": 3, "gate_proj": 2}[g[0].rsplit(".", 1)[-1]] for g in groups)
    assert fuse_shared_inputs(model) == []  # already fused: nothing twice


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_outputs_and_gradients_equal_unfused(tiny_llama, input_ids, checkpointing):
    model = _adapted(tiny_llama)
    ref_out, ref_grads = _loss_and_grads(model, input_ids, checkpointing)
    fuse_shared_inputs(model)
    got_out, got_grads = _loss_and_grads(model, input_ids, checkpointing)
    groups = {id(m._group): m._group for m in model.modules() if isinstance(m, SharedInputA)}.values()
    assert len(groups) == 4 and all(g.products == (2 if checkpointing else 1) for g in groups)  # + recompute
    assert_logits_close(got_out, ref_out, rtol=RTOL)
    assert got_grads.keys() == ref_grads.keys() and len(got_grads) == 2 * 7 * 2
    for name, grad in ref_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=RTOL, atol=ATOL, msg=name)


class _RecordedDropout(torch.nn.Module):
    """Inverted dropout that keeps every mask it draws (the fused run's masks, for the reference)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p, self.masks = p, []

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # h: (..., in)
        mask = (torch.rand_like(h) >= self.p).to(h.dtype) / (1 - self.p)  # (..., in)
        self.masks.append(mask)
        return h * mask


class _FixedMask(torch.nn.Module):
    """The reference's dropout: multiply by one given mask (the same one may be handed to several layers)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.p, self.mask = 0.3, mask

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.mask


def _group_leader(path: str) -> str:
    """The member of a shared-input group whose dropout draws the group's mask (the first caller)."""
    parent, _, child = path.rpartition(".")
    leader = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(child, child)
    return f"{parent}.{leader}"


def test_fused_dropout_draws_one_mask_per_group_and_equals_that_mask_applied_to_each_member(tiny_llama, input_ids):
    """Fused with dropout: q/k/v share one mask and gate/up another; the reference applies the recorded mask
    of each group to each member separately, unfused (forward and every LoRA gradient, fp32 tolerance)."""
    model = _adapted(tiny_llama, dropout=0.3)
    reference = _adapted(tiny_llama, dropout=0.3)
    reference.load_state_dict(model.state_dict())
    layers = lora_layers(model)
    for layer in layers.values():
        layer.lora_dropout["default"] = _RecordedDropout(0.3)
    assert len(fuse_shared_inputs(model)) == 4  # dropout 0.3 everywhere: every group fuses
    got_out, got_grads = _loss_and_grads(model, input_ids)
    drawn = {p: len(layer.lora_dropout["default"].masks) for p, layer in layers.items()}
    assert drawn == {p: int(_group_leader(p) == p) for p in layers}  # one draw per group, none by k/v/up
    for path, layer in lora_layers(reference).items():
        layer.lora_dropout["default"] = _FixedMask(layers[_group_leader(path)].lora_dropout["default"].masks[0])
    ref_out, ref_grads = _loss_and_grads(reference, input_ids)
    assert_logits_close(got_out, ref_out, rtol=RTOL)
    assert got_grads.keys() == ref_grads.keys() and len(got_grads) == 2 * 7 * 2
    for name, grad in ref_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=RTOL, atol=ATOL, msg=name)


def test_fused_dropout_masks_differ_between_steps_and_are_recomputed_under_checkpointing(tiny_llama, input_ids):
    """``nn.Dropout`` fused: a new mask each forward; checkpointing's recompute draws the same one again."""
    model = _adapted(tiny_llama, dropout=0.3)
    fuse_shared_inputs(model)
    torch.manual_seed(5)
    first, grads = _loss_and_grads(model, input_ids)
    second, _ = _loss_and_grads(model, input_ids)
    assert not torch.allclose(first, second)  # dropout is on: another mask
    torch.manual_seed(5)
    again, grads_ckpt = _loss_and_grads(model, input_ids, checkpointing=True)
    torch.testing.assert_close(again, first, rtol=RTOL, atol=ATOL)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=RTOL, atol=ATOL, msg=name)


def test_siblings_with_different_dropout_are_not_fused(tiny_llama):
    model = _adapted(tiny_llama, dropout=0.3)
    for path, layer in lora_layers(model).items():
        if path.endswith("k_proj"):
            layer.lora_dropout["default"] = torch.nn.Dropout(0.1)
    groups = fuse_shared_inputs(model)
    assert [g[0].rsplit(".", 1)[-1] for g in groups] == ["gate_proj"] * 2


def test_fused_dropout_in_eval_mode_equals_unfused(tiny_llama, input_ids):
    model = _adapted(tiny_llama, dropout=0.3)
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=input_ids).logits
        fuse_shared_inputs(model)
        torch.testing.assert_close(model(input_ids=input_ids).logits, ref, rtol=RTOL, atol=ATOL)


def test_fused_model_saves_the_same_peft_adapter_and_loads_back(tiny_llama, input_ids, tmp_path):
    model = _adapted(tiny_llama)
    unfused_state = lora_state_dict(model, "default")
    save_adapter(model, tmp_path / "unfused")
    fuse_shared_inputs(model)
    assert lora_state_dict(model, "default").keys() == unfused_state.keys()
    save_adapter(model, tmp_path / "fused")
    fused, unfused = tmp_path / "fused", tmp_path / "unfused"
    assert (fused / "adapter_config.json").read_text() == (unfused / "adapter_config.json").read_text()
    saved, ref = load_file(fused / "adapter_model.safetensors"), load_file(unfused / "adapter_model.safetensors")
    assert saved.keys() == ref.keys() and all(torch.equal(saved[k], ref[k]) for k in ref)
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "fused")
    fuse_shared_inputs(fresh)
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=input_ids).logits, model(input_ids=input_ids).logits)
    load_adapter(fresh, tmp_path / "unfused", replace=True)  # copies into the fused layers' own parameters
    assert all(torch.equal(lora_state_dict(fresh, "default")[k], ref[k]) for k in ref)


def test_16bit_base_with_fp32_adapters_fuses_and_equals_unfused(tiny_llama, input_ids):
    """The group casts the shared bf16 input to fp32 once; the adapters' fp32 sums are reordered only, so the
    bf16 logits agree within one bf16 rounding (rtol 2^-7) and the fp32 gradients within bf16-propagated error."""
    model = tiny_llama().to(torch.bfloat16)
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, targets="all-linear"), dtype=torch.float32)
    randomize_lora_b(model)
    ref_out, ref_grads = _loss_and_grads(model, input_ids)
    assert len(fuse_shared_inputs(model)) == 4
    got_out, got_grads = _loss_and_grads(model, input_ids)
    torch.testing.assert_close(got_out, ref_out, rtol=2**-7, atol=1e-3)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=2e-2, atol=1e-3, msg=name)


def test_unfuse_restores_plain_linears_around_the_same_parameters(tiny_llama):
    model = _adapted(tiny_llama)
    before = {n: p for n, p in model.named_parameters()}
    fuse_shared_inputs(model)
    assert sum(isinstance(m, SharedInputA) for m in model.modules()) == 2 * 5
    assert {n: p for n, p in model.named_parameters()}.keys() == before.keys()
    assert unfuse(model) == 2 * 5
    assert not any(isinstance(m, SharedInputA) for m in model.modules())
    after = dict(model.named_parameters())
    assert all(after[n] is p for n, p in before.items())
    assert all(type(layer.lora_A["default"]) is torch.nn.Linear for layer in lora_layers(model).values())


def test_fused_layers_share_only_the_a_product(tiny_llama, input_ids, monkeypatch):
    """The group's one product is ``lora.layer.dropped_down`` on the stacked A's, and every layer still adds
    its update through ``LoraLinear.add_delta``: fused.py re-derives neither the A nor the B product."""
    model = _adapted(tiny_llama)
    fuse_shared_inputs(model)
    stacked, updated = [], []
    monkeypatch.setattr(fused_module, "dropped_down",
                        lambda h, w, d: stacked.append(w.shape[0]) or dropped_down(h, w, d))
    add_delta = LoraLinear.add_delta
    monkeypatch.setattr(LoraLinear, "add_delta", lambda self, *args: updated.append(self) or add_delta(self, *args))
    with torch.no_grad():
        model(input_ids=input_ids)
    assert stacked == [3 * 4, 2 * 4] * 2  # q/k/v and gate/up of each block, r = 4
    assert len(updated) == len(lora_layers(model)) == 2 * 7
