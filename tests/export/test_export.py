"""merge_and_export: a plain transformers checkpoint whose logits equal the 4-bit + LoRA model's.

Tolerances: fp32 export vs the unmerged model ~1e-5 (the only difference is the order of
``x W^T + x A^T B^T`` vs ``x (W + BA)^T`` in fp32); bf16 export is compared on the weights, which must
equal the fp32 merged weights rounded once to bf16 (exactly), and on logits within 5e-2 (bf16 compute).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from qlorakit.config import LoraConfig, QuantConfig
from qlorakit.errors import ConfigError
from qlorakit.lora import add_lora, lora_layers
from qlorakit.models import quantize_model
from qlorakit.models.export import merge_and_export, merged_weight
from qlorakit.quant import Linear4bit, dequantize_4bit
from tests.helpers.tiny_llama import tiny_llama_config


def _model(tie: bool = True):
    torch.manual_seed(0)
    config = tiny_llama_config(tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(config)
    quantize_model(model)
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=gen) * 0.3)
    return model.eval()


IDS = torch.tensor([[1, 5, 9, 33, 7, 2, 100, 64]])


@pytest.mark.parametrize("tie", [True, False])
def test_fp32_export_loads_in_plain_transformers_with_equal_logits(tmp_path, tie):
    model = _model(tie)
    report = merge_and_export(model, tmp_path / "out", dtype=torch.float32)
    assert report.merged_layers == 14
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert not any(isinstance(m, Linear4bit) for m in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    from safetensors.torch import load_file

    written = set(load_file(str(tmp_path / "out" / "model.safetensors")))
    plain = set(transformers.LlamaForCausalLM(loaded.config).state_dict())
    assert written == (plain - {"lm_head.weight"} if tie else plain)  # exactly the plain model's keys


def test_bf16_export_holds_the_fp32_merge_rounded_once(tmp_path):
    model = _model()
    merge_and_export(model, tmp_path / "out", dtype=torch.bfloat16)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    q_proj = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    expected = (dequantize_4bit(q_proj.base_layer.qweight, torch.float32)
                + q_proj.delta_weight("default")).to(torch.bfloat16)
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.weight, expected)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits.float(), model(IDS).logits, rtol=5e-2, atol=5e-2)


def test_merged_weight_equals_the_layer_function():
    model = _model()
    layer = lora_layers(model)["model.layers.1.mlp.down_proj"]
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(x @ merged_weight(layer).t(), layer(x), rtol=1e-5, atol=1e-5)


def test_quantized_export_is_explicit_and_reports_the_added_error(tmp_path):
    model = _model()
    report = merge_and_export(model, tmp_path / "q", dtype=torch.float32, quantize=QuantConfig())
    assert len(report.requant_rel_error) == 14
    assert all(0.0 < e < 0.2 for e in report.requant_rel_error.values())  # NF4 error of a merged N(0, .02) weight
    assert "re-quantization added relative error" in report.format()
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
    assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in tensors


def test_export_refuses_a_non_empty_directory_and_leaves_it_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty; pass overwrite=True"):
        merge_and_export(_model(), out)
    assert (out / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_sharded_export_writes_an_index_transformers_reads(tmp_path):
    model = _model()
    report = merge_and_export(model, tmp_path / "out", dtype=torch.float32, max_shard_bytes=64 * 1024)
    assert "model.safetensors.index.json" in report.files
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)
