"""``quantize_model``: an in-memory model's target linears become Linear4bit, bit-identical to quantize_4bit."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from qlorakit.config import QuantConfig
from qlorakit.errors import ConfigError, ModelLoadError
from qlorakit.models import quantize_model
from qlorakit.quant import Linear4bit, quantize_4bit
from tests.helpers.tiny_llama import tiny_llama_config


def _llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=96)
    return transformers.LlamaForCausalLM(config)


def test_every_block_linear_is_quantized_and_lm_head_is_not():
    model = _llama()
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is nn.Linear}
    paths = quantize_model(model, QuantConfig(quant_type="fp4", blocksize=128, double_quant=False))
    assert len(paths) == 2 * 7 and "lm_head" not in paths
    assert isinstance(model.lm_head, nn.Linear)
    for path in paths:
        layer = model.get_submodule(path)
        assert isinstance(layer, Linear4bit)
        expected = quantize_4bit(weights[path], "fp4", 128, False)
        assert torch.equal(layer.qweight.packed, expected.packed)
        assert torch.equal(layer.qweight.absmax, expected.absmax)
    assert not any(p.requires_grad for p in model.parameters())


def test_quantized_model_output_stays_close_to_the_original():
    model = _llama()
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
        quantize_model(model)
        after = model(ids).logits
    # NF4 on random N(0, 0.02) weights: a few percent relative error in the logits, never a blow-up.
    rel = (after - before).norm() / before.norm()
    assert 0 < rel < 0.2


def test_quantizing_twice_or_an_unknown_target_is_refused():
    model = _llama()
    with pytest.raises(ConfigError, match="embed_tokens"):
        quantize_model(model, targets=["embed_tokens"])
    quantize_model(model, targets=["q_proj"])
    with pytest.raises(ModelLoadError, match="is a Linear4bit, not an nn.Linear"):
        quantize_model(model, targets=["q_proj"])
