"""DoRA (``LoraConfig.dora``) held to the real ``peft`` 0.21.2 DoRA: outputs, gradients, files both ways, merge.

Both sides run the same fp32 ops on the same weights (ours on the 4-bit base, peft on its dequantized
weight), so outputs and gradients agree to fp32 rounding; the tolerance is rtol = atol = 1e-5 (the values
are O(1) to O(100); observed: bitwise equal without dropout, <= 6e-8 relative with it). Every adapter gets random
nonzero B and a magnitude moved off its initial norm, and each test checks that the adapter moves the
output, so a dropped magnitude, an undetached norm or a wrong norm axis fails.
"""

import json

import pytest
import torch
from torch import nn

from qlorakit.config import LoraConfig
from qlorakit.errors import StateDictError
from qlorakit.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraLinear,
    add_lora,
    load_adapter,
    lora_layers,
    merge_adapters,
    save_adapter,
    trainable_parameters,
    unmerge_adapters,
)
from qlorakit.lora.fused import fuse_shared_inputs
from qlorakit.models import quantize_model
from qlorakit.models.export import merged_weight
from qlorakit.quant.linear import Linear4bit
from tests.helpers.lora import randomize_lora_b

peft = pytest.importorskip("peft")
from peft.tuners.lora import Linear as PeftLoraLinear  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-5}
IN, OUT, R = 64, 48, 4


def _randomize_magnitudes(named_params, seed: int = 3) -> None:
    """Scale every DoRA magnitude by a random factor in [0.5, 1.5] (in place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in named_params:
            if "lora_magnitude_vector" in name:
                param.mul_(0.5 + torch.rand(param.shape, generator=gen))


def _layer_pair(dropout: float, bias: bool):
    """Ours on a 4-bit base and peft's DoRA Linear on its dequantized weight, with equal adapter weights."""
    torch.manual_seed(0)
    dense = nn.Linear(IN, OUT, bias=bias)
    four_bit = Linear4bit.from_linear(dense)
    reference = nn.Linear(IN, OUT, bias=bias)
    with torch.no_grad():
        reference.weight.copy_(four_bit.dequantize(torch.float32))
        if bias:
            reference.bias.copy_(four_bit.bias)
    ours = LoraLinear(four_bit)
    ours.add_adapter("default", LoraConfig(r=R, alpha=8.0, dropout=dropout, dora=True))
    ours.set_active("default")
    config = peft.LoraConfig(r=R, lora_alpha=8, lora_dropout=dropout, use_dora=True)
    theirs = PeftLoraLinear(reference, "default", config, r=R, lora_alpha=8)
    torch.testing.assert_close(ours.lora_magnitude_vector["default"].weight,
                               theirs.lora_magnitude_vector["default"].weight, **TOL)  # both ||W||_row at init
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ours.lora_B["default"].weight.copy_(torch.randn(OUT, R, generator=gen) * 0.5)
        _randomize_magnitudes(ours.named_parameters())
        for table in ("lora_A", "lora_B", "lora_magnitude_vector"):
            getattr(theirs, table)["default"].weight.copy_(getattr(ours, table)["default"].weight)
    return ours, theirs


@pytest.mark.parametrize("dropout, bias", [(0.0, False), (0.0, True), (0.3, True)])
def test_outputs_and_gradients_equal_peft_dora(dropout, bias):
    ours, theirs = _layer_pair(dropout, bias)
    ours.train(), theirs.train()
    x = torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(2))
    grads, outputs = [], []
    for layer in (ours, theirs):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(11)  # the same dropout mask on both sides
        out = layer(xi)
        out.pow(2).sum().backward()
        params = [getattr(layer, t)["default"].weight.grad for t in ("lora_A", "lora_B", "lora_magnitude_vector")]
        outputs.append(out.detach())
        grads.append([xi.grad, *params])
    torch.testing.assert_close(outputs[0], outputs[1], **TOL)
    for ours_grad, peft_grad in zip(*grads, strict=True):
        assert ours_grad is not None and ours_grad.abs().max() > 0
        torch.testing.assert_close(ours_grad, peft_grad, **TOL)
    with torch.no_grad():
        assert (outputs[0] - ours.base_layer(x)).abs().max() > 1e-2  # the adapter does something


def test_fresh_dora_adapter_leaves_the_output_unchanged():
    torch.manual_seed(0)
    layer = LoraLinear(Linear4bit.from_linear(nn.Linear(IN, OUT)))
    layer.add_adapter("d", LoraConfig(r=R, dora=True, dropout=0.0))
    layer.set_active("d")
    x = torch.randn(4, IN)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x), **TOL)
        expected = torch.linalg.vector_norm(layer.base_layer.dequantize(torch.float32), dim=1)
    torch.testing.assert_close(layer.lora_magnitude_vector["d"].weight.detach(), expected)


def test_bind_equals_forward_and_the_cached_norm_follows_b():
    ours, _ = _layer_pair(0.0, True)
    ours.eval()
    x = torch.randn(1, IN, generator=torch.Generator().manual_seed(4))
    project = ours.bind()
    with torch.no_grad():
        assert torch.equal(project(x), ours(x))
        before = project(x)
        ours.lora_B["default"].weight.mul_(2.0)  # in place: the cached n must be recomputed
        after = project(x)
    with torch.enable_grad():
        fresh = ours(x).detach()
    torch.testing.assert_close(after, fresh, **TOL)
    assert (after - before).abs().max() > 1e-3


def _dora_model(tiny_llama, dropout: float = 0.0):
    model = tiny_llama()
    torch.manual_seed(6)  # the same A in every copy
    add_lora(model, LoraConfig(r=R, alpha=8.0, dropout=dropout, dora=True))
    randomize_lora_b(model)
    _randomize_magnitudes(model.named_parameters())
    return model


def test_fused_shared_input_groups_equal_unfused(tiny_llama, input_ids):
    results = []
    for fuse in (False, True):
        model = _dora_model(tiny_llama)
        if fuse:
            assert fuse_shared_inputs(model)
        loss = model(input_ids=input_ids, use_cache=False).logits.pow(2).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in trainable_parameters(model).items()}))
    torch.testing.assert_close(results[0][0], results[1][0], **TOL)
    assert any("lora_magnitude_vector" in n for n in results[0][1])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, **TOL)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_ours_saved_loads_in_peft_with_the_same_logits(tiny_llama, input_ids, tmp_path):
    base_logits = _logits(tiny_llama(), input_ids)
    ours = _dora_model(tiny_llama, dropout=0.05).eval()
    assert len([n for n in trainable_parameters(ours) if "lora_magnitude_vector" in n]) == 14
    expected = _logits(ours, input_ids)
    assert (expected - base_logits).abs().max() > 1e-2
    save_adapter(ours, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    assert theirs.peft_config["default"].use_dora
    torch.testing.assert_close(_logits(theirs, input_ids), expected, **TOL)
    back = tiny_llama()
    load_adapter(back, tmp_path / "adapter")
    torch.testing.assert_close(_logits(back.eval(), input_ids), expected, **TOL)


def test_peft_saved_loads_here_with_the_same_logits(tiny_llama, input_ids, tmp_path):
    config = peft.LoraConfig(r=R, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                             use_dora=True, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(tiny_llama(), config).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    _randomize_magnitudes(theirs.named_parameters())
    expected = _logits(theirs, input_ids)
    theirs.save_pretrained(tmp_path / "peft")
    ours = tiny_llama()
    paths = load_adapter(ours, tmp_path / "peft")
    assert len(paths) == 6 and all(m.configs["default"].dora for m in lora_layers(ours).values())
    torch.testing.assert_close(_logits(ours.eval(), input_ids), expected, **TOL)


def test_dora_4bit_model_equals_peft_on_the_dequantized_model(tiny_llama, input_ids, tmp_path):
    ours = tiny_llama()
    quantize_model(ours)
    add_lora(ours, LoraConfig(r=R, alpha=8.0, dropout=0.0, dora=True))
    randomize_lora_b(ours)
    _randomize_magnitudes(ours.named_parameters())
    expected = _logits(ours.eval(), input_ids)
    save_adapter(ours, tmp_path / "adapter")
    reference = tiny_llama()
    with torch.no_grad():
        for path, layer in lora_layers(ours).items():
            reference.get_submodule(path).weight.copy_(layer.base_layer.dequantize(torch.float32))
    theirs = peft.PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(theirs, input_ids), expected, **TOL)


def test_merge_equals_unmerged_and_unmerge_restores(tiny_llama, input_ids):
    model = _dora_model(tiny_llama).eval()
    weights = {p: m.base_layer.weight.detach().clone() for p, m in lora_layers(model).items()}
    expected = _logits(model, input_ids)
    merge_adapters(model)
    torch.testing.assert_close(_logits(model, input_ids), expected, **TOL)
    unmerge_adapters(model)
    for path, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.base_layer.weight, weights[path], **TOL)
    torch.testing.assert_close(_logits(model, input_ids), expected, **TOL)


def test_export_merged_weight_of_a_4bit_base_equals_the_dora_forward():
    ours, _ = _layer_pair(0.0, True)
    x = torch.randn(6, IN, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        merged = merged_weight(ours)  # (out, in) fp32: m/n (W + s B A)
        torch.testing.assert_close(x @ merged.T + ours.bias, ours(x), **TOL)


def test_use_dora_without_magnitudes_is_refused(tiny_llama, tmp_path):
    model = tiny_llama()
    add_lora(model, LoraConfig(r=R, targets=("q_proj",)))
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    (tmp_path / "a" / ADAPTER_CONFIG).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(StateDictError, match="has no DoRA magnitude.*lora_magnitude_vector is missing"):
        load_adapter(tiny_llama(), tmp_path / "a")
    assert (tmp_path / "a" / ADAPTER_WEIGHTS).exists()


def test_llama_cpp_adapter_export_refuses_dora(tiny_llama, tmp_path):
    pytest.importorskip("gguf")
    from qlorakit.errors import ConfigError
    from qlorakit.export.gguf_adapter import export_gguf_adapter

    model = _dora_model(tiny_llama)
    with pytest.raises(ConfigError, match="DoRA adapter; llama.cpp's LoRA GGUF has no magnitude"):
        export_gguf_adapter(model, tmp_path / "a.gguf", progress=False)
    assert not (tmp_path / "a.gguf").exists()
