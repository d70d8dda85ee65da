"""Model-level LoRA on a tiny Llama: wrapping, freezing, named adapters, 4-bit base, gradient checkpointing."""

import pytest
import torch
from torch import nn

from qlorakit.config import LoraConfig
from qlorakit.lora import (
    LoraLinear,
    MergeError,
    adapter_names,
    add_lora,
    count_parameters,
    delete_adapter,
    disable_adapters,
    lora_layers,
    lora_state_dict,
    merge_adapters,
    set_active_adapter,
    set_adapters_enabled,
    trainable_parameters,
    unmerge_adapters,
)
from qlorakit.models import quantize_model
from tests.helpers.lora import LLAMA_PROJECTIONS, randomize_lora_b

CFG = LoraConfig(r=4, alpha=8.0, dropout=0.0)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _quantize_targets(model):
    """Every decoder-block nn.Linear as a Linear4bit (NF4, double quant)."""
    quantize_model(model)
    return model


def test_add_lora_wraps_every_block_linear_and_only_adapters_train(tiny_llama, input_ids):
    model = tiny_llama()
    base_logits = _logits(model, input_ids)
    _, total_before = count_parameters(model)
    paths = add_lora(model, CFG)
    assert len(paths) == 2 * 7 and {p.rsplit(".", 1)[-1] for p in paths} == set(LLAMA_PROJECTIONS)
    assert all(isinstance(model.get_submodule(p), LoraLinear) for p in paths)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, LoraLinear)
    names = set(trainable_parameters(model))
    assert names == {f"{p}.lora_{ab}.default.weight" for p in paths for ab in "AB"}
    expected = sum(4 * (m.in_features + m.out_features) for m in lora_layers(model).values())
    assert count_parameters(model) == (expected, total_before + expected)
    assert torch.equal(_logits(model, input_ids), base_logits)  # B = 0 at init


def test_lora_state_dict_uses_peft_key_names(tiny_llama):
    model = tiny_llama()
    add_lora(model, LoraConfig(r=4, targets=("q_proj",)))
    state = lora_state_dict(model, "default")
    assert sorted(state) == [
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight" for i in (0, 1) for ab in "AB"
    ]
    assert state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert state["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (64, 4)


def _single_adapter_copy(tiny_llama, source, name, config):
    """A fresh base carrying only ``source``'s adapter ``name`` (same weights): the reference model."""
    model = tiny_llama()
    add_lora(model, config)
    with torch.no_grad():
        for path, layer in lora_layers(model).items():
            layer.lora_A["default"].weight.copy_(source.get_submodule(path).lora_A[name].weight)
            layer.lora_B["default"].weight.copy_(source.get_submodule(path).lora_B[name].weight)
    return model


def test_two_named_adapters_switch_disable_and_delete(tiny_llama, input_ids):
    model = tiny_llama()
    base_logits = _logits(model, input_ids)
    config_a = LoraConfig(r=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj"))
    config_b = LoraConfig(r=2, alpha=4.0, dropout=0.0)
    add_lora(model, config_a, name="a")
    add_lora(model, config_b, name="b")  # the newest adapter becomes active
    randomize_lora_b(model, "a", seed=1)
    randomize_lora_b(model, "b", seed=2)
    assert adapter_names(model) == ["a", "b"]
    logits_b = _logits(model, input_ids)
    set_active_adapter(model, "a")
    logits_a = _logits(model, input_ids)
    assert (logits_a - logits_b).abs().max() > 1e-2
    torch.testing.assert_close(logits_a, _logits(_single_adapter_copy(tiny_llama, model, "a", config_a), input_ids))
    set_active_adapter(model, "b")
    torch.testing.assert_close(logits_b, _logits(_single_adapter_copy(tiny_llama, model, "b", config_b), input_ids))
    assert all(".b." in n for n in trainable_parameters(model))
    with disable_adapters(model):
        assert torch.equal(_logits(model, input_ids), base_logits)
    assert torch.equal(_logits(model, input_ids), logits_b)
    set_adapters_enabled(model, False)
    assert torch.equal(_logits(model, input_ids), base_logits)
    set_adapters_enabled(model, True)
    delete_adapter(model, "b")
    assert adapter_names(model) == ["a"] and not trainable_parameters(model)
    assert len(lora_layers(model)) == 4  # layers with only "b" went back to their nn.Linear
    delete_adapter(model, "a")
    assert not lora_layers(model) and torch.equal(_logits(model, input_ids), base_logits)


def test_merge_adapters_gives_the_same_logits_and_unmerge_restores(tiny_llama, input_ids):
    model = tiny_llama()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, CFG)
    randomize_lora_b(model)
    logits = _logits(model, input_ids)
    merge_adapters(model)
    torch.testing.assert_close(_logits(model, input_ids), logits, rtol=1e-5, atol=1e-5)
    unmerge_adapters(model)
    delete_adapter(model, "default")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=1e-6)


def test_merge_adapters_refuses_a_4bit_model(tiny_llama):
    model = _quantize_targets(tiny_llama())
    add_lora(model, CFG)
    with pytest.raises(MergeError, match="merge_and_export"):
        merge_adapters(model)


def test_4bit_base_counts_original_elements_and_grads_reach_only_adapters(tiny_llama, input_ids):
    plain = tiny_llama()
    _, total_plain = count_parameters(plain)
    model = _quantize_targets(tiny_llama())
    add_lora(model, CFG)
    randomize_lora_b(model)
    trainable, total = count_parameters(model)
    assert total == total_plain + trainable
    model(input_ids, labels=input_ids, use_cache=False).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == set(trainable_parameters(model)) and len(grads) == 2 * 14
    assert all(p.grad.abs().sum() > 0 for p in trainable_parameters(model).values())


def _adapter_grads(model, ids):
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids, use_cache=False).loss.backward()
    return {n: p.grad.clone() for n, p in trainable_parameters(model).items()}


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_adapter_gradients(tiny_llama, input_ids, reentrant):
    """Checkpointing recomputes the same fp32 CPU ops, so the gradients should agree exactly; we allow 1e-6."""
    model = _quantize_targets(tiny_llama())
    add_lora(model, CFG)
    randomize_lora_b(model)
    model.train()  # transformers only checkpoints in training mode; dropout is 0 everywhere
    plain = _adapter_grads(model, input_ids)
    calls = []
    model.get_submodule("model.layers.0.mlp.up_proj").register_forward_pre_hook(lambda *_: calls.append(1))
    _adapter_grads(model, input_ids)
    assert len(calls) == 1
    if reentrant:
        model.enable_input_require_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    calls.clear()
    checkpointed = _adapter_grads(model, input_ids)
    assert len(calls) == 2  # the block was recomputed in backward
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-6)
